"""auth's settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.chassis.settings import env_float, env_int, env_str

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
            jwks_port=env_int(env, "CEX_JWKS_PORT", 0),
            token_ttl_s=env_int(env, "CEX_AUTH_TOKEN_TTL_S", 300),
            token_ttl_max_s=env_int(env, "CEX_AUTH_TOKEN_TTL_MAX_S", 900),
            key_rotate_s=env_int(env, "CEX_AUTH_KEY_ROTATE_S", 7 * 24 * 3600),
            service_secret=env_str(env, "CEX_SERVICE_SECRET"),
            fee_volume_interval_s=env_float(env, "AUTH_FEE_VOLUME_INTERVAL_S", 3600.0),
            fee_volume_days=env_int(env, "AUTH_FEE_VOLUME_DAYS", 30),
            fee_volume_asset=env_str(env, "AUTH_FEE_VOLUME_ASSET", "USDT") or "USDT",
            order_target=env_str(env, "AUTH_ORDER_TARGET"),
        )
