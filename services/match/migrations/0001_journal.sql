-- The command journal: one row per command, written in group-commit batches.
-- A command's events are stored beside it (they are a pure function of the
-- journal, kept so that ReplayEvents is a range read, and checked again on
-- every recovery). Events of a command are first_seq..last_seq (empty when
-- last_seq = first_seq - 1).
CREATE TABLE journal (
    market      text   NOT NULL,
    command_seq bigint NOT NULL,
    command_id  text   NOT NULL,
    ts          bigint NOT NULL,  -- ns since the epoch, the time the book saw
    command     bytea  NOT NULL,  -- cex.match.v1.Command
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL,
    events      bytea  NOT NULL,  -- cex.match.v1.ReplayEventsResponse
    PRIMARY KEY (market, command_seq),
    UNIQUE (market, command_id)
);

CREATE INDEX journal_last_seq ON journal (market, last_seq);

-- Periodic snapshots of each market's engine; recovery starts from the latest.
CREATE TABLE snapshots (
    market      text        NOT NULL,
    command_seq bigint      NOT NULL,
    seq         bigint      NOT NULL,
    state       bytea       NOT NULL,
    state_hash  text        NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (market, command_seq)
);
