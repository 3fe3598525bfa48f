"""Fixtures of market data's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Trust
from tests.integration.marketdata.support import MatchInProcess


@pytest.fixture
async def match(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> AsyncIterator[MatchInProcess]:
    """The match writer in this process, on a database and NATS of the test's own."""
    running = MatchInProcess(fresh_database_url, private_nats, trust)
    yield running
    await running.stop()
