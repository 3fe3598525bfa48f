-- Ledger: accounts per (account_id, asset), immutable transfers, durable
-- idempotency (transfer ids, remembered failures, settled trades) and the
-- auditor's halt flag. Amounts are integers in the asset's minor units.

CREATE TABLE meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_sequence bigint NOT NULL
);
INSERT INTO meta (last_sequence) VALUES (0);

CREATE TABLE accounts (
    account_id text NOT NULL,
    asset text NOT NULL,
    is_system boolean NOT NULL,
    debits_posted bigint NOT NULL DEFAULT 0,
    credits_posted bigint NOT NULL DEFAULT 0,
    debits_pending bigint NOT NULL DEFAULT 0,
    credits_pending bigint NOT NULL DEFAULT 0,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, asset),
    -- User accounts never go below zero (TigerBeetle's debits_must_not_exceed_credits).
    CONSTRAINT user_not_negative CHECK (
        is_system OR debits_posted + debits_pending <= credits_posted)
) WITH (fillfactor = 70);  -- room for HOT updates: balances change, keys never do

-- op: 1 single-phase, 2 pending (hold), 3 post, 4 void, 5 partial post (settlement
-- consumes part of a hold and keeps the rest pending).
-- state: 1 pending, 2 posted, 3 voided, 4 expired (proto TransferState).
CREATE TABLE transfers (
    id text PRIMARY KEY,
    sequence bigint NOT NULL UNIQUE,
    op smallint NOT NULL,
    debit_account_id text NOT NULL,
    credit_account_id text NOT NULL,
    asset text NOT NULL,
    amount bigint NOT NULL CHECK (amount >= 0),
    pending_id text,
    linked boolean NOT NULL,
    timeout_ns bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    kind smallint NOT NULL,
    reference text NOT NULL,
    state smallint NOT NULL,
    remaining bigint NOT NULL DEFAULT 0,
    fingerprint text NOT NULL,
    create_time timestamptz NOT NULL
);
CREATE INDEX transfers_debit ON transfers (debit_account_id, sequence);
CREATE INDEX transfers_credit ON transfers (credit_account_id, sequence);
CREATE INDEX transfers_reference ON transfers (reference, sequence);
CREATE INDEX transfers_open_expiring ON transfers (expires_at)
    WHERE op = 2 AND state = 1 AND expires_at IS NOT NULL;

-- An id that failed keeps its failure (TigerBeetle's id_already_failed).
CREATE TABLE failed_transfers (
    id text PRIMARY KEY,
    fingerprint text NOT NULL,
    code integer NOT NULL,
    reason text NOT NULL,
    message text NOT NULL,
    metadata text NOT NULL DEFAULT '{}',  -- JSON, key order kept
    create_time timestamptz NOT NULL DEFAULT now()
);

-- Settlement: each trade once; the last applied match event per market.
CREATE TABLE settled_trades (
    market text NOT NULL,
    trade_id text NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (market, trade_id)
);
CREATE TABLE market_cursors (
    market text PRIMARY KEY,
    last_seq bigint NOT NULL
);
CREATE TABLE settlement_anomalies (
    id bigserial PRIMARY KEY,
    market text NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    order_id text NOT NULL,
    asset text NOT NULL,
    amount bigint NOT NULL,
    detail text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- The auditor's halt flag: set on any violation, cleared only by an operator.
-- While set, the ledger refuses new WITHDRAWAL transfers (LEDGER_HALTED).
CREATE TABLE halt (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    halted boolean NOT NULL DEFAULT false,
    reason text NOT NULL DEFAULT '',
    since timestamptz
);
INSERT INTO halt DEFAULT VALUES;
