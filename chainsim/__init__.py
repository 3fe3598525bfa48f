"""chainsim: a deterministic chain and custody simulator (an external system's stand-in)."""
