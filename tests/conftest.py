"""Fixtures shared by every test tier.

`stack` starts the real thing once per session on a free range of ports:
PostgreSQL, NATS with JetStream, Redis, every service and Envoy, from the
pip-installed wheels. Later tests reuse it through `database_url`, `nats_url`,
`redis_url` and `edge`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.stack.supervisor import Stack
from services.stack.topology import free_ports


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    state: Path = tmp_path_factory.mktemp("cex-state")
    # The tests bring up their own embedded parts, whatever the shell points at.
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL", "REDIS_URL")
    }
    running = Stack(state, free_ports(), env)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="session")
def database_url(stack: Stack) -> str:
    return stack.database_url


@pytest.fixture(scope="session")
def nats_url(stack: Stack) -> str:
    return stack.nats_url


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.redis_url


@pytest.fixture(scope="session")
def edge(stack: Stack) -> str:
    return stack.edge
