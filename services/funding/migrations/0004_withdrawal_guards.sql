-- Withdrawal protections (issue 21): an address allowlist per account, and an
-- operator's approval of withdrawals above their asset's threshold.

-- An account's withdrawal addresses. An address is usable from usable_time
-- (its cooling period after being added); removing one sets remove_time, and
-- adding it again makes a new row with a new cooling period.
CREATE TABLE withdrawal_addresses (
    address_id text PRIMARY KEY,
    account_id text NOT NULL,
    asset text NOT NULL,
    network text NOT NULL,
    address text NOT NULL,
    label text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL,
    usable_time timestamptz NOT NULL,
    remove_time timestamptz
);
CREATE UNIQUE INDEX withdrawal_addresses_listed ON withdrawal_addresses (account_id, asset, address)
    WHERE remove_time IS NULL;
CREATE INDEX withdrawal_addresses_account ON withdrawal_addresses (account_id, create_time DESC, address_id DESC);

-- Whether an account's withdrawals go only to its allowed addresses. Enabled
-- at once; a turn-off sets disable_time (now + the cooling period) and the
-- allowlist applies until then. No row: off.
CREATE TABLE withdrawal_allowlists (
    account_id text PRIMARY KEY,
    enabled boolean NOT NULL,
    disable_time timestamptz,
    update_time timestamptz NOT NULL
);

-- Idempotency keys (ADR 0003) of the allowlist and review calls: the same key
-- with the same body returns the first result, with another ALREADY_EXISTS.
CREATE TABLE keyed_requests (
    actor text NOT NULL,                -- the account, or the operator's key / service
    request_id text NOT NULL,
    method text NOT NULL,
    fingerprint text NOT NULL,
    target text NOT NULL,               -- the address_id / withdrawal_id / account it acted on
    PRIMARY KEY (actor, request_id)
);

-- Approval: decided at the request from the asset's threshold; the review is
-- the operator's decision (or EXPIRED, written by the saga at the deadline),
-- set once.
ALTER TABLE withdrawals
    ADD COLUMN approval_required boolean NOT NULL DEFAULT false,
    ADD COLUMN approval_deadline timestamptz,
    ADD COLUMN review text NOT NULL DEFAULT ''
        CHECK (review IN ('', 'APPROVED', 'REJECTED', 'EXPIRED')),
    ADD COLUMN reviewed_by text NOT NULL DEFAULT '',
    ADD COLUMN review_reason text NOT NULL DEFAULT '',
    ADD COLUMN review_time timestamptz,
    -- only an approved withdrawal that needed approval is ever handed to custody
    ADD CONSTRAINT withdrawals_broadcast_approved
        CHECK (NOT (approval_required AND broadcast_started) OR review = 'APPROVED');
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_state_check;
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_state_check
    CHECK (state IN ('PENDING', 'AWAITING_APPROVAL', 'BROADCAST', 'COMPLETED', 'CANCELLED',
                     'REJECTED', 'FAILED'));
