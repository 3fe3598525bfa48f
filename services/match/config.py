"""The match service's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_float, env_int, env_str

__all__ = ["MatchSettings"]


@dataclass(frozen=True, slots=True)
class MatchSettings:
    """`group` names the writer group this replica writes, `markets` its markets
    (empty: every market in the catalog); markets are spread across replicas by
    giving each group its own name and list (ADR 0013: one writer per group).
    `events_max_age_s`: how long the MATCH_EVENTS stream keeps events (0: forever);
    the journal keeps them all, and ReplayEvents serves what the stream dropped.
    `ownership_wait_s`: how long a starting writer waits for its locks (its
    group's, and the balances': a standby takes over when they are released)."""

    group: str = "main"
    markets: tuple[str, ...] = ()
    max_batch: int = 500
    snapshot_every: int = 5_000
    max_commands_per_request: int = 1_000
    events_max_age_s: float = 86_400.0
    ownership_wait_s: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MatchSettings:
        env = os.environ if env is None else env
        markets = env_str(env, "CEX_MATCH_MARKETS", "") or ""
        return cls(
            group=env_str(env, "CEX_MATCH_GROUP", "main") or "main",
            markets=tuple(m.strip() for m in markets.split(",") if m.strip()),
            max_batch=env_int(env, "CEX_MATCH_MAX_BATCH", 500),
            snapshot_every=env_int(env, "CEX_MATCH_SNAPSHOT_EVERY", 5_000),
            max_commands_per_request=env_int(env, "CEX_MATCH_MAX_COMMANDS", 1_000),
            events_max_age_s=env_float(env, "CEX_MATCH_EVENTS_MAX_AGE_S", 86_400.0),
            ownership_wait_s=env_float(env, "CEX_MATCH_OWNERSHIP_WAIT_S", 15.0),
        )
