-- Risk: limits (the exchange defaults and per-account overrides), kill switches
-- with their audit log, withdrawal checks (the rolling 24 h velocity window and
-- the idempotency of CheckWithdrawal), idempotent admin requests, and the last
-- trade price per market (the reference for price bands).

-- Every change bumps change_seq; each risk process polls it and reloads its
-- in-memory copy of limits and kill switches when it moves.
CREATE TABLE meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    change_seq bigint NOT NULL
);
INSERT INTO meta (change_seq) VALUES (1);

-- account_id '' is the exchange defaults. doc: the limits as JSON, amounts as
-- decimal strings (services/risk/limits.py, Limits.to_json).
CREATE TABLE limits (
    account_id text PRIMARY KEY,
    doc jsonb NOT NULL,
    version bigint NOT NULL,
    updated_by text NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);
-- The defaults shipped with the exchange (docs/adr/0007-risk.md); operators
-- change them with SetLimits.
INSERT INTO limits (account_id, doc, version, updated_by) VALUES (
    '',
    '{"max_orders_per_second": 100, "max_open_orders": 1000,
      "markets": [{"market": "*", "max_order_quantity": "", "max_order_notional": "",
                   "price_band": "0.1", "max_open_orders": 0}],
      "withdrawals": []}',
    1,
    'migration');

-- scope: 1 global, 2 market, 3 account (proto KillSwitchScope); the fields a
-- scope does not use are ''.
CREATE TABLE kill_switches (
    scope smallint NOT NULL CHECK (scope IN (1, 2, 3)),
    market text NOT NULL,
    account_id text NOT NULL,
    engaged boolean NOT NULL,
    block_withdrawals boolean NOT NULL,
    reason text NOT NULL,
    updated_by text NOT NULL,
    update_time timestamptz NOT NULL,
    PRIMARY KEY (scope, market, account_id)
);

CREATE TABLE kill_switch_log (
    id bigserial PRIMARY KEY,
    request_id text NOT NULL,
    scope smallint NOT NULL,
    market text NOT NULL,
    account_id text NOT NULL,
    engaged boolean NOT NULL,
    block_withdrawals boolean NOT NULL,
    cancel_open_orders boolean NOT NULL,
    reason text NOT NULL,
    updated_by text NOT NULL,
    update_time timestamptz NOT NULL
);

-- Admin calls by request_id: the same id and body returns the stored response.
CREATE TABLE requests (
    method text NOT NULL,
    request_id text NOT NULL,
    body_hash bytea NOT NULL,
    response bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, request_id)
);

-- One row per withdrawal checked (funding's id): the answer is remembered, so
-- a retried check neither counts twice nor changes its mind. amount in the
-- asset's minor units; only allowed rows count towards the 24 h limits.
CREATE TABLE withdrawal_checks (
    withdrawal_id text PRIMARY KEY,
    account_id text NOT NULL,
    asset text NOT NULL,
    amount numeric(40, 0) NOT NULL,
    allowed boolean NOT NULL,
    body_hash bytea NOT NULL,
    response bytea NOT NULL,
    check_time timestamptz NOT NULL
);
CREATE INDEX withdrawal_checks_window ON withdrawal_checks (account_id, asset, check_time)
    WHERE allowed;

-- The last trade per market, from match events (price in the market's ticks).
CREATE TABLE reference_prices (
    market text PRIMARY KEY,
    price_ticks bigint NOT NULL,
    seq bigint NOT NULL,
    trade_time timestamptz NOT NULL
);
