"""The ledger's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_float, env_int, env_str

__all__ = ["LedgerConfig"]


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """
    max_group_items: transfers per group commit (one transaction, one fsync).
    audit_interval_s: period of the background auditor (0 = off).
    expiry_interval_s: period of the hold-expiry sweeper (0 = off).
    settlement: run the JetStream settlement consumer (needs NATS).
    consumer_name: durable name of that consumer.
    match_target: where ReplayEvents is called; default the mesh (CEX_MESH_ADDR)
        with :authority "match".
    """

    max_group_items: int = 4000
    audit_interval_s: float = 30.0
    expiry_interval_s: float = 1.0
    settlement: bool = True
    consumer_name: str = "ledger-settlement"
    match_target: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerConfig:
        env = os.environ if env is None else env
        return cls(
            max_group_items=env_int(env, "LEDGER_MAX_GROUP_ITEMS", 4000),
            audit_interval_s=env_float(env, "LEDGER_AUDIT_INTERVAL_S", 30.0),
            expiry_interval_s=env_float(env, "LEDGER_EXPIRY_INTERVAL_S", 1.0),
            settlement=env_str(env, "LEDGER_SETTLEMENT", "on") != "off",
            consumer_name=env_str(env, "LEDGER_CONSUMER", "ledger-settlement")
            or "ledger-settlement",
            match_target=env_str(env, "LEDGER_MATCH_TARGET"),
        )
