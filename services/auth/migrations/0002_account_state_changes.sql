-- Every account state change (suspend, reactivate, close), keyed by the
-- operator's request id: the idempotency record and the audit trail.
CREATE TABLE account_state_changes (
    request_id   text PRIMARY KEY,
    request_hash text NOT NULL,
    account_id   text NOT NULL REFERENCES accounts (account_id),
    state        smallint NOT NULL,
    reason       text NOT NULL,
    changed_by   text NOT NULL,
    change_time  timestamptz NOT NULL
);

CREATE INDEX account_state_changes_account ON account_state_changes (account_id, change_time);
