"""Fixtures of the ledger's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Trust
from tests.integration.ledger.support import Ledger, running_ledger


@pytest.fixture
async def ledger(fresh_database_url: str, trust: Trust, private_nats: str) -> AsyncIterator[Ledger]:
    """The ledger and its balance owner (the writer) in this process, on a database
    and NATS of the test's own."""
    async with running_ledger(fresh_database_url, trust, private_nats) as running:
        yield running
