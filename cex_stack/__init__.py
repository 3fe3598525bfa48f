"""The embedded stack: every component of the exchange as local processes."""
