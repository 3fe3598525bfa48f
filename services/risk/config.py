"""Risk's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_fields, env_str

__all__ = ["RiskConfig"]


@dataclass(frozen=True, slots=True)
class RiskConfig:
    """
    reload_interval_s: how often each process polls PostgreSQL for changed limits,
        kill switches and reference prices: the backstop (a process sees its own
        changes at once, and other replicas' by NOTIFY at once).
    prices: follow match events on JetStream for the last trade price (needs NATS).
    consumer_name: durable name of that JetStream consumer (shared by replicas).
    redis_timeout_s: a rate-limit call slower than this uses the local bucket (and
        Redis is then left alone for a second).
    redis_prefix: key prefix of the token buckets (the order gateway, which runs
        the order checks in its own process, reads the same two settings).
    rules_heartbeat_s: how often WatchRules sends the rules when nothing changed.
    """

    reload_interval_s: float = 0.5
    prices: bool = True
    consumer_name: str = "risk-prices"
    redis_timeout_s: float = 1.0
    redis_prefix: str = "risk:rl:"
    rules_heartbeat_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RiskConfig:
        env = os.environ if env is None else env
        return cls(
            consumer_name=env_str(env, "RISK_CONSUMER", "risk-prices") or "risk-prices",
            **env_fields(
                cls,
                env,
                "RISK_",
                "reload_interval_s",
                "prices",
                "redis_timeout_s",
                "redis_prefix",
                "rules_heartbeat_s",
            ),
        )
