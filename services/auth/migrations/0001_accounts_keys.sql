-- Accounts, API keys (secrets only as scrypt hashes) and token signing keys.
CREATE TABLE accounts (
    account_id   text PRIMARY KEY,
    request_id   text NOT NULL UNIQUE,
    request_hash text NOT NULL,
    display_name text NOT NULL,
    email        text UNIQUE,
    type         smallint NOT NULL,
    state        smallint NOT NULL,
    fee_tier     text NOT NULL,
    create_time  timestamptz NOT NULL,
    update_time  timestamptz NOT NULL
);

CREATE TABLE api_keys (
    api_key_id     text PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (account_id),
    request_id     text NOT NULL,
    request_hash   text NOT NULL,
    label          text NOT NULL,
    scopes         text[] NOT NULL,
    allowed_cidrs  text[] NOT NULL,
    state          smallint NOT NULL,
    secret_prefix  text NOT NULL,
    secret_hash    text NOT NULL,
    create_time    timestamptz NOT NULL,
    expire_time    timestamptz,
    revoke_time    timestamptz,
    revoke_reason  text,
    last_used_time timestamptz,
    UNIQUE (account_id, request_id)
);
CREATE INDEX api_keys_by_account ON api_keys (account_id, create_time DESC, api_key_id DESC);

-- The private half stays here (in production: a KMS or sealed secret instead).
CREATE TABLE signing_keys (
    kid           text PRIMARY KEY,
    private_pem   bytea NOT NULL,
    create_time   timestamptz NOT NULL,
    activate_time timestamptz NOT NULL,
    retire_time   timestamptz
);

-- Revocations and other key events, for audit.
CREATE TABLE api_key_events (
    id          bigserial PRIMARY KEY,
    api_key_id  text NOT NULL REFERENCES api_keys (api_key_id),
    event       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    event_time  timestamptz NOT NULL
);
