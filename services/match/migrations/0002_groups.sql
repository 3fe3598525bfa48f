-- One writer per group of markets (ADR 0013): its commands are numbered by
-- one sequence, group_seq, in the order the writer decided them, which is the
-- order recovery replays them in (a market's own command_seq still numbers
-- its commands, and its events keep their own seq). Rows written before groups
-- existed belong to the default group 'main', numbered in time order.
ALTER TABLE journal ADD COLUMN writer_group text, ADD COLUMN group_seq bigint;

UPDATE journal AS j
SET writer_group = 'main', group_seq = o.n
FROM (
    SELECT market, command_seq, row_number() OVER (ORDER BY ts, market, command_seq) AS n
    FROM journal
) AS o
WHERE j.market = o.market AND j.command_seq = o.command_seq;

ALTER TABLE journal
    ALTER COLUMN writer_group SET NOT NULL,
    ALTER COLUMN group_seq SET NOT NULL;

CREATE UNIQUE INDEX journal_group_seq ON journal (writer_group, group_seq);

-- A snapshot is now the whole group's state at a group_seq (every market's
-- engine); recovery loads the latest and replays the journal after it. The
-- per-market snapshots of before are dropped: recovery replays from the start
-- once instead.
DROP TABLE snapshots;

CREATE TABLE snapshots (
    writer_group text        NOT NULL,
    group_seq    bigint      NOT NULL,
    state        bytea       NOT NULL,
    state_hash   text        NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (writer_group, group_seq)
);
