"""Fixtures of the trading tests.

The stack's books and risk's reference prices are shared by every test of the
session: these tests trade BTC-USDT only within 95..105 and ETH-USDT within
1900..2100 (inside risk's default 10% band around the prices other tests use
for those markets, 100 and 2000), and cancel what they leave working.

`exchange` is on the stack `target` names: a test marked `replicas` runs on the
session's stack and again on the one with 2 replicas of each stateless service,
where its traders are spread over both order replicas (`Exchange.trader`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.e2e.order.support import Exchange, exchange_on
from tests.replicas import Target


@pytest.fixture
async def exchange(target: Target) -> AsyncIterator[Exchange]:
    async with (
        grpc.aio.insecure_channel(target.stack.edge) as channel,
        exchange_on(target.stack, target.credentials, channel) as exchange,
    ):
        yield exchange
