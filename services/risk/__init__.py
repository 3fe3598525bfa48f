"""risk: limits, kill switches and rate-limit counters."""
