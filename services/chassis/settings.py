"""Settings read once from the environment into frozen dataclasses.

`env_fields(Config, env, "FUNDING_", "lease_s", ...)` reads a config dataclass's
plain fields, their defaults written once (in the dataclass), each from
`<PREFIX><FIELD>` (upper case) by its annotated type: `int` and `float` parsed
(a malformed value is a ValueError naming the variable), `str` as given (unset
or blank: the default), and `bool` on unless the value is "off". Fields named
otherwise, or built from several variables, stay written out in `from_env`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChassisSettings",
    "env_fields",
    "env_float",
    "env_int",
    "env_str",
    "require",
]


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name, "").strip()
    return value if value else default


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env_str(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env_str(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True, slots=True)
class ChassisSettings:
    """What every service process needs, whatever it does.

    `mesh_addr` is Envoy's listener: service-to-service calls go through it so
    that the mesh sees (and measures) every hop.
    """

    service: str
    host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int = 0
    database_url: str | None = None
    nats_url: str | None = None
    redis_url: str | None = None
    mesh_addr: str | None = None
    # auth's JWKS (for services that declare an authentication policy).
    jwks_url: str | None = None
    # The secret a service derives its `svc:<name>` credential from (authn.py).
    service_secret: str | None = field(default=None, repr=False)
    shutdown_grace_s: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    keepalive_time_s: int = 30
    log_level: str = "INFO"
    # How often the copy of auth's frozen accounts is reloaded when no change
    # pushed on NATS asked for it sooner (the backstop; account_states.py).
    account_states_reload_s: float = 5.0

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> ChassisSettings:
        env = os.environ if env is None else env
        return cls(
            service=service,
            host=env_str(env, "CEX_HOST", "127.0.0.1") or "127.0.0.1",
            grpc_port=env_int(env, "CEX_GRPC_PORT", 0),
            metrics_port=env_int(env, "CEX_METRICS_PORT", 0),
            database_url=env_str(env, "DATABASE_URL"),
            nats_url=env_str(env, "NATS_URL"),
            redis_url=env_str(env, "REDIS_URL"),
            mesh_addr=env_str(env, "CEX_MESH_ADDR"),
            jwks_url=env_str(env, "CEX_JWKS_URL"),
            service_secret=env_str(env, "CEX_SERVICE_SECRET"),
            shutdown_grace_s=env_float(env, "CEX_SHUTDOWN_GRACE_S", 5.0),
            max_message_bytes=env_int(env, "CEX_MAX_MESSAGE_BYTES", 4 * 1024 * 1024),
            keepalive_time_s=env_int(env, "CEX_KEEPALIVE_TIME_S", 30),
            log_level=(env_str(env, "CEX_LOG_LEVEL", "INFO") or "INFO").upper(),
            account_states_reload_s=env_float(env, "CEX_ACCOUNT_STATES_RELOAD_S", 5.0),
        )


def require(value: str | None, name: str) -> str:
    """A setting this service cannot start without."""
    if not value:
        raise ValueError(f"{name} is not set")
    return value


def _read(env: Mapping[str, str], name: str, kind: str, default: Any) -> Any:
    if kind == "bool":
        return (env_str(env, name) or ("on" if default else "off")) != "off"
    if kind == "int":
        return env_int(env, name, default)
    if kind == "float":
        return env_float(env, name, default)
    if kind in ("str", "str | None"):
        return env_str(env, name, default) or default
    raise TypeError(f"{name}: a {kind} field is not read by env_fields")


def env_fields(cls: type, env: Mapping[str, str], prefix: str, *names: str) -> dict[str, Any]:
    """The fields `names` of dataclass `cls` as the environment sets them, as keyword
    arguments of `cls` (each one's dataclass default where its variable is unset)."""
    found = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name in names:
        spec = found[name]
        if spec.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{name} has no plain default")
        kind = (
            spec.type
            if isinstance(spec.type, str)
            else getattr(spec.type, "__name__", str(spec.type))
        )
        values[name] = _read(env, prefix + name.upper(), kind, spec.default)
    return values
