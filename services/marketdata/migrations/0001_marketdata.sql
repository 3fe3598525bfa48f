-- Market data: the public trade tape and candles, built from match events.
-- `cursors` is the last match event seq whose trades are in these tables; it
-- moves in the same transaction as them, so a restart resumes exactly after it.

CREATE TABLE cursors (
    market text PRIMARY KEY,
    seq bigint NOT NULL CHECK (seq >= 0)
);

CREATE TABLE trades (
    market text NOT NULL,
    seq bigint NOT NULL,
    trade_id text NOT NULL,
    price numeric NOT NULL,
    quantity numeric NOT NULL,
    quote_quantity numeric NOT NULL,
    taker_side smallint NOT NULL,
    trade_time timestamptz NOT NULL,
    PRIMARY KEY (market, seq)
);

CREATE INDEX trades_by_time ON trades (market, trade_time DESC, seq DESC);

CREATE TABLE candles (
    market text NOT NULL,
    width_s integer NOT NULL,
    open_time timestamptz NOT NULL,
    open numeric NOT NULL,
    high numeric NOT NULL,
    low numeric NOT NULL,
    close numeric NOT NULL,
    volume numeric NOT NULL,
    quote_volume numeric NOT NULL,
    trade_count bigint NOT NULL,
    PRIMARY KEY (market, width_s, open_time)
);
