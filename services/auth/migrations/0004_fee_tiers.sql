-- Fee schedules (issue 21, ADR 0016). The schedule's tiers, each account's tier
-- (accounts.fee_tier: the one an operator assigned when fee_tier_assigned, else
-- the one its last measured 30-day volume gives), and every change numbered by
-- the fee-tier change sequence (one more per committed change, in commit order,
-- no gaps: the counter row in fee_meta is locked by each change's transaction)
-- and published on auth.events.fee_tier after its commit (`published`: the
-- outbox flag). The order gateways follow them (chassis' fee_tiers.py).
CREATE TABLE fee_tiers (
    name          text PRIMARY KEY,
    maker_fee_bps numeric NOT NULL,
    taker_fee_bps numeric NOT NULL,
    min_volume    numeric NOT NULL UNIQUE
);

-- One row: the change sequence, when the schedule was last set by an operator
-- (NULL: still the catalog's), and when volumes were last measured.
CREATE TABLE fee_meta (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    change_seq    bigint NOT NULL,
    schedule_time timestamptz,
    measure_time  timestamptz
);
INSERT INTO fee_meta (change_seq) VALUES (0);

-- Every change: a schedule (account_id NULL, the tiers in `schedule`) or one
-- account's tier. An operator's change carries its request id (idempotency);
-- a volume measurement's does not.
CREATE TABLE fee_tier_changes (
    seq          bigint PRIMARY KEY,
    request_id   text UNIQUE,
    request_hash text,
    account_id   text REFERENCES accounts (account_id),
    fee_tier     text NOT NULL DEFAULT '',
    assigned     boolean NOT NULL DEFAULT false,
    schedule     jsonb,
    reason       text NOT NULL,
    changed_by   text NOT NULL,
    change_time  timestamptz NOT NULL,
    published    boolean NOT NULL DEFAULT false
);
CREATE INDEX fee_tier_changes_unpublished ON fee_tier_changes (seq) WHERE NOT published;
CREATE INDEX fee_tier_changes_account ON fee_tier_changes (account_id, seq);

ALTER TABLE accounts ADD COLUMN fee_tier_assigned boolean NOT NULL DEFAULT false;
ALTER TABLE accounts ADD COLUMN fee_tier_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN traded_volume numeric;
-- What GetFeeTiers lists and a measurement re-evaluates besides the traders.
CREATE INDEX accounts_fee_tier ON accounts (account_id) WHERE fee_tier <> 'default' OR fee_tier_assigned;
