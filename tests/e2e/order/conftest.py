"""Fixtures of the trading tests.

The stack's books and risk's reference prices are shared by every test of the
session: these tests trade BTC-USDT only within 95..105 and ETH-USDT within
1900..2100 (inside risk's default 10% band around the prices other tests use
for those markets, 100 and 2000), and cancel what they leave working.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from cex_stack.supervisor import Stack
from services.chassis.authn import ServiceCredentials
from tests.e2e.order.support import Exchange, exchange_on


@pytest.fixture
async def exchange(
    stack: Stack, service_credentials: ServiceCredentials
) -> AsyncIterator[Exchange]:
    async with (
        grpc.aio.insecure_channel(stack.edge) as channel,
        exchange_on(stack, service_credentials, channel) as exchange,
    ):
        yield exchange
