"""kill -9 of PostgreSQL, NATS and Redis during a trading burst, on a stack of its own.

Two accounts place crossing orders at 100 on BTC-USDT and cancel some of them
while the test SIGKILLs PostgreSQL's postmaster, the NATS server and Redis, each
several times (the supervisor restarts them). What the error model and the
journal promise, checked afterwards:
- no call is ever answered INTERNAL or UNKNOWN: a refusal while a dependency is
  away is UNAVAILABLE with an ErrorInfo reason (retryable);
- services reconnect by themselves: every place that was retried is answered;
- within seconds of NATS returning every committed event reaches order's read
  model (the publisher resumes from the journal): order's working set equals
  match's book, no acknowledged order stays PENDING_NEW, and every acknowledged
  cancel is final (CANCELLED);
- the ledger audit passes and each account's held amount is what its working
  orders still need.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis import ErrorDetails
from tests.e2e.order.support import (
    BUY,
    SELL,
    Exchange,
    Trader,
    agreed,
    exchange_on,
    kill,
    settled_and_balanced,
    uid,
)

D = Decimal
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.fixture
async def own_exchange(tmp_path: Path) -> AsyncIterator[Exchange]:
    """A stack of the test's own: killing its PostgreSQL must not touch other tests."""
    env = embedded_env()
    stack = Stack(tmp_path / "state", free_ports(), env)
    await stack.start()
    try:
        credentials = stack.credentials("tests")
        async with (
            grpc.aio.insecure_channel(stack.edge) as channel,
            exchange_on(stack, credentials, channel) as exchange,
        ):
            yield exchange
    finally:
        await stack.stop()


class Outcomes:
    """Every answer of the burst: the failures by code and reason, what was acked."""

    def __init__(self) -> None:
        self.failures: Counter[tuple[str, str]] = Counter()
        self.placed: list[order_pb2.Order] = []
        self.cancelled: list[order_pb2.Order] = []

    def failed(self, error: grpc.aio.AioRpcError) -> None:
        details = ErrorDetails.from_rpc_error(error)
        self.failures[(error.code().name, details.reason)] += 1
        if error.code() not in RETRYABLE:
            raise error

    async def retried(self, call):  # type: ignore[no-untyped-def]
        """The call's answer, retried with the same ids while it is refused as retryable."""
        for _ in range(300):
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                self.failed(error)
                await asyncio.sleep(0.2)
        pytest.fail("a call was never answered")


async def _trade(trader: Trader, side: int, out: Outcomes, stop: asyncio.Event) -> None:
    """Place crossing orders; cancel every third one (each retried with its own ids)."""
    n = 0
    while not stop.is_set():
        request = dict(client_order_id=uid(), side=side, price="100", quantity="0.1")
        order = await out.retried(lambda request=request: trader.place(**request))
        out.placed.append(order)
        n += 1
        if n % 3 == 0 and order.state in (t.ORDER_STATE_OPEN, t.ORDER_STATE_PARTIALLY_FILLED):
            try:
                cancelled = await out.retried(lambda oid=order.order_id: trader.cancel(oid))
            except grpc.aio.AioRpcError as error:
                # It filled before the cancel reached it: closed, not cancellable.
                assert ErrorDetails.from_rpc_error(error).reason == "ORDER_ALREADY_CLOSED"
            else:
                if cancelled.state == t.ORDER_STATE_CANCELLED:  # (else it had filled first)
                    out.cancelled.append(cancelled)


@pytest.mark.chaos
async def test_kill_9_of_postgres_nats_and_redis_during_a_burst(own_exchange: Exchange) -> None:
    exchange = own_exchange
    seller = await exchange.trader({"BTC": "10000"}, "infra-seller")
    buyer = await exchange.trader({"USDT": "1000000"}, "infra-buyer")
    await exchange.lift_limits(seller, buyer)
    out = Outcomes()
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(_trade(seller if i % 2 else buyer, SELL if i % 2 else BUY, out, stop))
        for i in range(6)
    ]
    victims = ["postgres", "nats", "redis"] * 3
    random.Random(7).shuffle(victims)
    try:
        for name in victims:
            await asyncio.sleep(2.0)
            await kill(exchange.stack, name)
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(out.placed) > 20, "the burst placed almost nothing"
    # Never INTERNAL or UNKNOWN (Outcomes.failed raised on those); every refusal
    # names its reason.
    assert all(reason for (_, reason) in out.failures), out.failures

    # NATS is back: the read model catches up with match's journal.
    book, working = await agreed(exchange, seller, buyer, within_s=30)
    for order in out.placed:
        latest = await (seller if order.side == SELL else buyer).get(order.order_id)
        assert latest.state != t.ORDER_STATE_PENDING_NEW, order.order_id
        assert (latest.order_id in book) == (latest.state not in _CLOSED), order.order_id
    for order in out.cancelled:
        latest = await (seller if order.side == SELL else buyer).get(order.order_id)
        assert latest.state == t.ORDER_STATE_CANCELLED, order.order_id

    await settled_and_balanced(exchange, seller, buyer, working)


_CLOSED = {t.ORDER_STATE_FILLED, t.ORDER_STATE_CANCELLED, t.ORDER_STATE_REJECTED}
