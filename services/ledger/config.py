"""The ledger's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_float, env_str

__all__ = ["LedgerConfig"]


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """
    audit_interval_s: period of the background auditor (0 = off).
    match_target: where the balance owner (the match group's writer) is called;
        default the mesh (CEX_MESH_ADDR) with :authority "match".
    """

    audit_interval_s: float = 30.0
    match_target: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerConfig:
        env = os.environ if env is None else env
        return cls(
            audit_interval_s=env_float(env, "LEDGER_AUDIT_INTERVAL_S", 30.0),
            match_target=env_str(env, "LEDGER_MATCH_TARGET"),
        )
