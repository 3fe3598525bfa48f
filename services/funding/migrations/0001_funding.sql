-- Funding: sagas and their append-only step logs, the outbox, withdrawals,
-- deposit addresses, deposits and the chain watcher's cursor. Amounts are
-- integers in the asset's minor units.

CREATE TABLE sagas (
    saga_id text PRIMARY KEY,
    kind text NOT NULL,                 -- deposit | withdrawal
    reference_id text NOT NULL,         -- deposit_id / withdrawal_id
    account_id text NOT NULL,
    state text NOT NULL CHECK (state IN ('RUNNING', 'COMPENSATING', 'COMPLETED',
                                         'COMPENSATED', 'STUCK')),
    step_index integer NOT NULL,        -- forward: the next step; compensating: the one undone
    attempt integer NOT NULL,
    current_step text NOT NULL,
    data jsonb NOT NULL,                -- inputs and step outputs
    failure bytea,                      -- google.rpc.Status that made it compensate
    deadline timestamptz NOT NULL,
    next_run_at timestamptz NOT NULL,
    lease_owner text,
    lease_until timestamptz,
    lease_epoch bigint NOT NULL DEFAULT 0,  -- fences writes of a replica that lost its lease
    log_count integer NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    UNIQUE (kind, reference_id)
);
CREATE INDEX sagas_due ON sagas (next_run_at) WHERE state IN ('RUNNING', 'COMPENSATING');
CREATE INDEX sagas_newest ON sagas (create_time DESC, saga_id DESC);
CREATE INDEX sagas_account ON sagas (account_id, create_time DESC);

CREATE TABLE saga_steps (
    saga_id text NOT NULL REFERENCES sagas,
    idx integer NOT NULL,
    name text NOT NULL,
    compensation boolean NOT NULL,
    state text NOT NULL CHECK (state IN ('STARTED', 'SUCCEEDED', 'RETRYING', 'FAILED')),
    attempt integer NOT NULL,
    error bytea,
    outputs jsonb NOT NULL,
    record_time timestamptz NOT NULL,
    PRIMARY KEY (saga_id, idx)
);

-- Events are written here in the transaction that makes them true, and relayed
-- to JetStream (Nats-Msg-Id funding:<id>) afterwards: at least once, in order.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    payload jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    publish_time timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE publish_time IS NULL;

CREATE TABLE withdrawals (
    withdrawal_id text PRIMARY KEY,
    request_id text NOT NULL,
    account_id text NOT NULL,
    fingerprint text NOT NULL,          -- of the request's fields, for idempotent retries
    asset text NOT NULL,
    network text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    fee bigint NOT NULL CHECK (fee >= 0),
    address text NOT NULL,
    memo text NOT NULL,
    state text NOT NULL CHECK (state IN ('PENDING', 'BROADCAST', 'COMPLETED', 'CANCELLED',
                                         'REJECTED', 'FAILED')),
    cancel_requested boolean NOT NULL DEFAULT false,
    broadcast_started boolean NOT NULL DEFAULT false,  -- from here on: not cancellable
    txid text NOT NULL DEFAULT '',
    confirmations integer NOT NULL DEFAULT 0,
    required_confirmations integer NOT NULL,
    failure bytea,
    saga_id text NOT NULL,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    complete_time timestamptz,
    UNIQUE (account_id, request_id),
    -- a cancelled withdrawal was never handed to custody
    CHECK (state <> 'CANCELLED' OR NOT broadcast_started)
);
CREATE INDEX withdrawals_account ON withdrawals (account_id, create_time DESC, withdrawal_id DESC);

CREATE TABLE cancel_requests (
    account_id text NOT NULL,
    request_id text NOT NULL,
    withdrawal_id text NOT NULL REFERENCES withdrawals,
    PRIMARY KEY (account_id, request_id)
);

CREATE TABLE deposit_addresses (
    account_id text NOT NULL,
    asset text NOT NULL,
    network text NOT NULL,
    address text NOT NULL,
    memo text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, asset, network),
    UNIQUE (network, address, memo)
);

CREATE TABLE deposits (
    deposit_id text PRIMARY KEY,
    txid text NOT NULL,
    output_index integer NOT NULL,
    account_id text NOT NULL,
    asset text NOT NULL,
    network text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    address text NOT NULL,
    memo text NOT NULL DEFAULT '',
    confirmations integer NOT NULL,
    required_confirmations integer NOT NULL,
    state text NOT NULL CHECK (state IN ('PENDING', 'CREDITED', 'CANCELLED', 'REJECTED')),
    reverted boolean NOT NULL DEFAULT false,
    ledger_transfer_id text NOT NULL DEFAULT '',
    saga_id text NOT NULL,
    detect_time timestamptz NOT NULL,
    credit_time timestamptz,
    update_time timestamptz NOT NULL,
    UNIQUE (network, txid, output_index),  -- each output credited at most once
    -- a reverted output is never credited
    CHECK (NOT (reverted AND state = 'CREDITED'))
);
CREATE INDEX deposits_account ON deposits (account_id, detect_time DESC, deposit_id DESC);

CREATE TABLE chain_cursor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq bigint NOT NULL
);
INSERT INTO chain_cursor (seq) VALUES (0);
