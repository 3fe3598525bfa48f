"""ledger: double-entry accounts, transfers, holds and balances."""
