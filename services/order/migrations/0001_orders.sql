-- Orders as the client sees them. Event-derived columns (state, filled_*,
-- remaining, fee, last_seq) are written by the match-event consumer; the flow
-- writes the order when it is recorded and its `phase` as it moves on.
CREATE TABLE orders (
    order_id text PRIMARY KEY,
    account_id text NOT NULL,
    client_order_id text NOT NULL,
    market text NOT NULL,
    side smallint NOT NULL,
    type smallint NOT NULL,
    time_in_force smallint NOT NULL,
    self_trade_prevention smallint NOT NULL,
    price numeric,
    stop_price numeric,
    quantity numeric,
    quote_quantity numeric,
    post_only boolean NOT NULL DEFAULT false,
    expire_time timestamptz,
    -- the price sent to match for a market order (its worst price)
    protection_price numeric,
    -- sha256 of the request body: a retry with another body is refused
    fingerprint text NOT NULL,
    -- the ledger hold hold:<order_id>, in minor units of hold_asset
    hold_asset text NOT NULL,
    hold_amount bigint NOT NULL CHECK (hold_amount > 0),
    -- recorded -> placed (match journaled it) | failed (never reached match)
    phase text NOT NULL DEFAULT 'recorded',
    state smallint NOT NULL,
    filled_quantity numeric NOT NULL DEFAULT 0,
    filled_quote_quantity numeric NOT NULL DEFAULT 0,
    cumulative_fee numeric NOT NULL DEFAULT 0,
    fee_asset text NOT NULL DEFAULT '',
    remaining_quantity numeric,
    reject_reason text NOT NULL DEFAULT '',
    reject_code integer NOT NULL DEFAULT 0,
    reject_message text NOT NULL DEFAULT '',
    reject_domain text NOT NULL DEFAULT '',
    cancel_reason smallint NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    trigger_time timestamptz,
    version bigint NOT NULL DEFAULT 1,
    -- the last match event (per market seq) applied to this order
    last_seq bigint NOT NULL DEFAULT 0,
    -- the stream session that placed it (cancel-on-disconnect)
    session_id text NOT NULL DEFAULT '',
    UNIQUE (account_id, client_order_id)
);

CREATE INDEX orders_by_account ON orders (account_id, create_time DESC, order_id DESC);
-- working orders: PENDING_NEW, UNTRIGGERED, OPEN, PARTIALLY_FILLED
CREATE INDEX orders_working ON orders (account_id, market) WHERE state IN (1, 2, 3, 4);
CREATE INDEX orders_unplaced ON orders (create_time) WHERE phase = 'recorded';
CREATE INDEX orders_by_session ON orders (session_id) WHERE session_id <> '' AND state IN (1, 2, 3, 4);

CREATE TABLE fills (
    order_id text NOT NULL,
    trade_id text NOT NULL,
    market text NOT NULL,
    account_id text NOT NULL,
    client_order_id text NOT NULL,
    side smallint NOT NULL,
    price numeric NOT NULL,
    quantity numeric NOT NULL,
    quote_quantity numeric NOT NULL,
    fee numeric NOT NULL,
    fee_asset text NOT NULL,
    liquidity smallint NOT NULL,
    trade_time timestamptz NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (order_id, trade_id)
);

CREATE INDEX fills_by_account ON fills (account_id, trade_time DESC, seq DESC, order_id);

-- How far the consumer has applied each market's events (durable cursor).
CREATE TABLE market_cursors (
    market text PRIMARY KEY,
    seq bigint NOT NULL
);

-- Idempotency of amend / cancel / cancel-all / cancel-all-after by request_id.
CREATE TABLE requests (
    account_id text NOT NULL,
    request_id text NOT NULL,
    kind text NOT NULL,
    fingerprint text NOT NULL,
    response bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, request_id)
);

-- Stream sessions with cancel-on-disconnect, so that a crash of the process
-- that held them still cancels their orders (on the next start).
CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    account_id text NOT NULL,
    cancel_on_disconnect boolean NOT NULL,
    open boolean NOT NULL DEFAULT true,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- Armed dead man's switches (CancelAllAfter), so a restart keeps them.
CREATE TABLE deadman (
    account_id text NOT NULL,
    market text NOT NULL,          -- '' = all markets
    trigger_time timestamptz NOT NULL,
    PRIMARY KEY (account_id, market)
);
