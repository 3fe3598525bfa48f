-- What the chain did that no saga may settle by itself, for an operator:
-- CHAIN_BEHIND_CURSOR (the chain's notification log ends before the watcher's
-- cursor: a reorg deeper than anything we had read, or custody lost its state)
-- and DEPOSIT_REVERTED_AFTER_CREDIT (a reorg deeper than the confirmations
-- required). Append-only; `resolve_time` is set by the operator who handled it.
CREATE TABLE chain_anomalies (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    deposit_id text NOT NULL DEFAULT '',
    cursor_seq bigint NOT NULL,         -- the watcher's position when it was seen
    chain_seq bigint NOT NULL,          -- the chain's last notification then
    chain_height bigint NOT NULL,
    detail text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    resolve_time timestamptz
);
CREATE INDEX chain_anomalies_open ON chain_anomalies (create_time) WHERE resolve_time IS NULL;
