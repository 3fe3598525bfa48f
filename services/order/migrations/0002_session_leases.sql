-- Sessions that several order replicas share (issue 20, ADR 0008 "Replicas").
--
-- Every stream session is a row now (not only cancel-on-disconnect ones): its
-- execution reports are numbered and stored here by whichever replica stores the
-- events (`session_reports`), so a session resumes on any replica after a
-- disconnect or a replica's crash, from the last sequence its client processed.
--
-- A live session is held by one process (`owner`: the replica's name and a random
-- incarnation), whose lease is a row of `replicas`, renewed while it lives. A
-- session whose owner's lease lapsed is claimed by a conditional UPDATE (one
-- claimer wins), its cancel-on-disconnect orders cancelled, and it is detached:
-- `owner` NULL, resumable until `detach_time` + the resume window, then closed.
ALTER TABLE sessions
    ADD COLUMN markets text[] NOT NULL DEFAULT '{}',
    ADD COLUMN owner text,
    ADD COLUMN last_sequence bigint NOT NULL DEFAULT 0,
    ADD COLUMN detach_time timestamptz;

-- Sessions left open by the single-process order of before: detached now, so the
-- first replica to start cancels what they placed (as the old start-up did).
UPDATE sessions SET owner = 'before-leases' WHERE open;

CREATE INDEX sessions_open_account ON sessions (account_id) WHERE open;
CREATE INDEX sessions_owned ON sessions (owner) WHERE owner IS NOT NULL;

CREATE TABLE replicas (
    owner text PRIMARY KEY,            -- <replica>/<incarnation>
    lease_until timestamptz NOT NULL,
    start_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE session_reports (
    session_id text NOT NULL,
    sequence bigint NOT NULL,
    report bytea NOT NULL,             -- cex.order.v1.ExecutionReport, sequence included
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, sequence)
);
CREATE INDEX session_reports_age ON session_reports (create_time);
