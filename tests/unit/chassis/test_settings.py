import dataclasses

import pytest

from services.chassis import ChassisSettings


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
