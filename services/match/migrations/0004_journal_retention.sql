-- Journal retention (ADR 0013, "Retention"): a group's rows at or below
-- `compacted_through` (a group_seq) have been deleted (after being archived,
-- when an archive is set), in the same transaction as this row moved. A
-- standby behind it reloads from the latest snapshot; ReplayEvents for events
-- of those rows is FAILED_PRECONDITION MATCH_EVENTS_COMPACTED. The ledger's
-- tables are never compacted: they are the book of record.
CREATE TABLE journal_retention (
    writer_group      text        PRIMARY KEY,
    compacted_through bigint      NOT NULL CHECK (compacted_through >= 0),
    update_time       timestamptz NOT NULL DEFAULT now()
);
