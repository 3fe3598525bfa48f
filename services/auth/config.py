"""auth's settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.chassis.settings import env_fields

__all__ = ["AuthConfig"]


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwks_port: int = 0  # HTTP port of the JWKS (0: any free port)
    token_ttl_s: int = 300  # default access token lifetime
    token_ttl_max_s: int = 900  # cap on a requested lifetime: the revocation window
    service_token_ttl_s: int = 300
    key_rotate_s: int = 7 * 24 * 3600  # a new signing key this often
    key_publish_ahead_s: int = 600  # in the JWKS this long before it signs (> JWKS caches)
    key_check_s: float = 60.0  # how often the keyring is reloaded and rotation checked
    scrypt_n: int = 2**14
    service_secret: str | None = field(default=None, repr=False)
    # Fee tiers by volume (ADR 0016): how often every account's traded volume is
    # measured (0: only on demand, EvaluateFeeTiers), over how many days, in
    # which asset (the quote amount of fills in markets quoted in it), and where
    # order is (default: the mesh).
    fee_volume_interval_s: float = 3600.0
    fee_volume_days: int = 30
    fee_volume_asset: str = "USDT"
    order_target: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthConfig:
        env = os.environ if env is None else env
        return cls(
            **env_fields(cls, env, "CEX_", "jwks_port", "service_secret"),
            **env_fields(cls, env, "CEX_AUTH_", "token_ttl_s", "token_ttl_max_s", "key_rotate_s"),
            **env_fields(
                cls,
                env,
                "AUTH_",
                "fee_volume_interval_s",
                "fee_volume_days",
                "fee_volume_asset",
                "order_target",
            ),
        )
