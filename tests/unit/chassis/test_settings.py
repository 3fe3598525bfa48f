import dataclasses
from dataclasses import dataclass, field

import pytest

from services.chassis import ChassisSettings, env_fields


def test_reads_the_environment_once_into_a_frozen_value() -> None:
    settings = ChassisSettings.from_env(
        "order",
        {
            "CEX_GRPC_PORT": "50061",
            "DATABASE_URL": "postgresql://db/cex",
            "CEX_SHUTDOWN_GRACE_S": "2.5",
            "CEX_LOG_LEVEL": "debug",
        },
    )
    assert settings.service == "order"
    assert settings.grpc_port == 50061
    assert settings.database_url == "postgresql://db/cex"
    assert settings.nats_url is None
    assert settings.shutdown_grace_s == 2.5
    assert settings.log_level == "DEBUG"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grpc_port = 1  # type: ignore[misc]


def test_defaults_apply_when_unset_or_blank() -> None:
    settings = ChassisSettings.from_env("risk", {"CEX_GRPC_PORT": "  "})
    assert settings.grpc_port == 0
    assert settings.host == "127.0.0.1"


def test_a_malformed_number_names_the_variable() -> None:
    with pytest.raises(ValueError, match="CEX_GRPC_PORT must be an integer"):
        ChassisSettings.from_env("risk", {"CEX_GRPC_PORT": "fifty"})


# A config's plain fields from the environment: the dataclass keeps the one copy
# of each default.


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
