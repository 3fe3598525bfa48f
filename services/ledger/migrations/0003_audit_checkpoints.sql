-- The auditor's checkpoints (issue 17: the audit's cost must not grow with
-- history). A checkpoint is the posted columns of every account as of a
-- transfer sequence, written by an audit that passed; the next audit replays
-- only the transfers after it. Only the auditor writes these tables; the
-- balance owner (match's writer, which also runs these migrations) never
-- reads them.

-- One row per passed audit that had new transfers. `hash` chains them:
-- sha256 of the previous checkpoint's hash, this one's id, sequence and
-- transfer count, and `segment_hash` (sha256 of the immutable fields of the
-- transfers in (previous sequence, sequence], in sequence order).
CREATE TABLE audit_checkpoints (
    id bigint PRIMARY KEY,
    sequence bigint NOT NULL UNIQUE,
    transfers bigint NOT NULL,
    segment_hash bytea NOT NULL,
    hash bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- Every account's posted columns as of the latest checkpoint (one copy,
-- moved forward by each checkpoint for the accounts its transfers touched).
CREATE TABLE audit_balances (
    account_id text NOT NULL,
    asset text NOT NULL,
    debits_posted bigint NOT NULL,
    credits_posted bigint NOT NULL,
    PRIMARY KEY (account_id, asset)
);

-- Where the rolling re-verification of older checkpoints' segments stands:
-- the last checkpoint whose transfers were hashed again.
CREATE TABLE audit_cursor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    reverified_id bigint NOT NULL DEFAULT 0
);
INSERT INTO audit_cursor DEFAULT VALUES;

-- The open holds, which the audit sums every time (and the writer loads at
-- start), found without a scan of every transfer ever made.
CREATE INDEX transfers_open_holds ON transfers (asset) WHERE op = 2 AND state = 1;
