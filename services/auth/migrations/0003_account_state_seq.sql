-- The account-state change sequence (issue 21): one more for every committed
-- state change, in commit order and without gaps (the counter row is locked by
-- each change's transaction), so a service following the changes on NATS can
-- tell that it missed one and reload (GetFrozenAccounts). `published` is the
-- outbox flag: the change is published on auth.events.account_state after its
-- commit, then marked.
CREATE TABLE account_state_meta (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    change_seq bigint NOT NULL
);

ALTER TABLE account_state_changes ADD COLUMN seq bigint UNIQUE;
ALTER TABLE account_state_changes ADD COLUMN published boolean NOT NULL DEFAULT true;
ALTER TABLE accounts ADD COLUMN state_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN state_reason text NOT NULL DEFAULT '';

-- The changes made before: numbered in the order they were made (already
-- published: every follower loads the whole set when it starts).
UPDATE account_state_changes c SET seq = n.seq
FROM (
    SELECT request_id, row_number() OVER (ORDER BY change_time, request_id) AS seq
    FROM account_state_changes
) n
WHERE c.request_id = n.request_id;

UPDATE accounts a SET state_seq = l.seq, state_reason = l.reason
FROM (
    SELECT DISTINCT ON (account_id) account_id, seq, reason
    FROM account_state_changes ORDER BY account_id, seq DESC
) l
WHERE a.account_id = l.account_id;

INSERT INTO account_state_meta (change_seq)
SELECT coalesce(max(seq), 0) FROM account_state_changes;

ALTER TABLE account_state_changes ALTER COLUMN seq SET NOT NULL;
ALTER TABLE account_state_changes ALTER COLUMN published SET DEFAULT false;

CREATE INDEX account_state_changes_unpublished ON account_state_changes (seq) WHERE NOT published;
CREATE INDEX accounts_frozen ON accounts (account_id) WHERE state <> 1;
