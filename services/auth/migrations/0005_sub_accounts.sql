-- Master and sub-accounts (issue 21, ADR 0017). A sub-account is an account
-- whose master_account_id names its master; set at creation, never changed.
-- One level only: a master has no master (checked by auth's domain under the
-- master's row lock). Tokens issued to a master list its subs (the `subs`
-- claim), read through the index.
ALTER TABLE accounts ADD COLUMN master_account_id text REFERENCES accounts (account_id);
CREATE INDEX accounts_by_master ON accounts (master_account_id, create_time, account_id)
    WHERE master_account_id IS NOT NULL;
