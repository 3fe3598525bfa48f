"""A config dataclass's plain fields read from the environment, their defaults
written once: in the dataclass.

`env_fields(Config, env, "FUNDING_", "lease_s", ...)` reads each named field from
`FUNDING_LEASE_S` (the prefix and the field's name in upper case) by the
field's annotated type, as settings.py's readers do: `int` and `float` parsed
(a malformed value is a ValueError naming the variable), `str` as given (unset
or blank: the default), and `bool` on unless the value is "off". Fields named
otherwise, or built from several variables, stay written out in `from_env`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .settings import env_float, env_int, env_str

__all__ = ["env_fields"]


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
        kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
        values[name] = _read(env, prefix + name.upper(), kind, spec.default)
    return values
