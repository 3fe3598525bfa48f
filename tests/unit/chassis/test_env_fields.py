"""A config's plain fields from the environment (chassis/env_fields.py): the
dataclass keeps the one copy of each default."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.chassis import env_fields


@dataclass(frozen=True, slots=True)
class _Config:
    count: int = 3
    wait_s: float = 0.5
    name: str = "x"
    target: str | None = None
    enabled: bool = True
    tags: list[str] = field(default_factory=list)


_NAMES = ("count", "wait_s", "name", "target", "enabled")


def test_unset_or_blank_variables_keep_the_dataclass_defaults() -> None:
    assert _Config(**env_fields(_Config, {"T_NAME": "  "}, "T_", *_NAMES)) == _Config()


def test_each_field_is_read_by_its_type_from_prefix_and_name() -> None:
    env = {"T_COUNT": "7", "T_WAIT_S": "1.5", "T_NAME": "y", "T_TARGET": "h:1", "T_ENABLED": "off"}
    assert env_fields(_Config, env, "T_", *_NAMES) == {
        "count": 7,
        "wait_s": 1.5,
        "name": "y",
        "target": "h:1",
        "enabled": False,
    }


def test_a_malformed_number_names_its_variable() -> None:
    with pytest.raises(ValueError, match="T_COUNT"):
        env_fields(_Config, {"T_COUNT": "1.5"}, "T_", "count")


def test_a_field_without_a_plain_default_is_not_read() -> None:
    with pytest.raises(TypeError):
        env_fields(_Config, {}, "T_", "tags")
