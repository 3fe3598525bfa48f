-- Markets listed at runtime (ADR 0018): written by the writer in the same
-- commit as the journal entry of their listing (the market's first command),
-- so a market is listed exactly when its journal entry exists. Loaded at start
-- on top of the static catalog (a snapshot may be later than the listing, and
-- the journal's retention may drop the entry); `listing` is the MarketListed
-- event (cex.match.v1), the market's whole definition.
CREATE TABLE markets (
    symbol       text PRIMARY KEY,
    writer_group text NOT NULL,
    group_seq    int8 NOT NULL,
    listing      bytea NOT NULL,
    ts           int8 NOT NULL
);
