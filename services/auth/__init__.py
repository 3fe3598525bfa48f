"""auth: accounts, API keys (hashed) and signing keys."""
