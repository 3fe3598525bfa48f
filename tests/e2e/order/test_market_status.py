"""A market's status changed at runtime, without a restart (ADR 0015), on the real
stack: halted with open orders and a StreamOrderBook subscriber watching (places
refused with MATCH_MARKET_HALTED through order, the subscriber sees the status),
resumed, CANCEL_ONLY letting a cancel through (set over REST), DELISTED (set with
the `cex` CLI) cancelling the open orders and returning their funds; the ledger
audit passes and the journal replays to the writer's state.

The stack is this module's own: a delisting is final, and the session's stack
keeps trading BTC-USDT for every other test.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from tests.cli import cex
from tests.e2e.order.support import (
    BUY,
    MARKET,
    SELL,
    Exchange,
    error_of,
    exchange_of,
    journal_replays,
    uid,
)

HALTED, TRADING = t.MARKET_STATUS_HALTED, t.MARKET_STATUS_TRADING
CANCEL_ONLY, DELISTED = t.MARKET_STATUS_CANCEL_ONLY, t.MARKET_STATUS_DELISTED


@pytest.fixture(scope="module")
async def own_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(
        tmp_path_factory.mktemp("cex-market-status"), free_ports(), embedded_env()
    ) as stack:
        yield stack


@pytest.fixture
async def exchange(own_stack: Stack) -> AsyncIterator[Exchange]:
    async with exchange_of(own_stack) as exchange:
        yield exchange


class Watcher:
    """A StreamOrderBook subscriber, read in the background: the status it was told."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
        self.call = stub.StreamOrderBook(md.StreamOrderBookRequest(market=MARKET, depth=10))
        self.statuses: list[int] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            kind = message.WhichOneof("kind")
            status = getattr(message, kind or "snapshot").status
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)

    async def sees(self, status: int, within_s: float = 15.0) -> None:
        async with asyncio.timeout(within_s):
            while not self.statuses or self.statuses[-1] != status:
                assert not self.task.done(), self.task
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _set(exchange: Exchange, status: int, reason: str) -> match_pb2.SetMarketStatusResponse:
    stub = match_pb2_grpc.MatchServiceStub(exchange.channel)
    request = match_pb2.SetMarketStatusRequest(
        market=MARKET, status=status, reason=reason, request_id=uid("st")
    )
    reply = await stub.SetMarketStatus(request, metadata=exchange.svc, timeout=20)
    again = await stub.SetMarketStatus(request, metadata=exchange.svc, timeout=20)
    assert again == reply  # idempotent by request_id
    return reply


async def _market(exchange: Exchange, status: int, within_s: float = 15.0) -> t.Market:
    stub = marketdata_pb2_grpc.MarketDataServiceStub(exchange.channel)
    async with asyncio.timeout(within_s):
        while True:
            found = (await stub.GetMarket(md.GetMarketRequest(market=MARKET), timeout=10)).market
            if found.status == status:
                return found
            await asyncio.sleep(0.1)


def _rest(stack: Stack, token: str, body: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://{stack.edge}/v1/admin/markets/{MARKET}/status",
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        data=json.dumps(body).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


async def test_halt_resume_cancel_only_and_delist_with_orders_and_a_watcher(
    own_stack: Stack, exchange: Exchange
) -> None:
    seller = await exchange.trader({"BTC": "5"}, "seller")
    buyer = await exchange.trader({"USDT": "1000"}, "buyer")
    ask = await seller.place(side=SELL, price="105", quantity="1")
    bid = await buyer.place(side=BUY, price="95", quantity="1")
    watcher = Watcher(exchange.channel)
    try:
        await watcher.sees(TRADING)

        # HALTED: places refused with the writer's reason, passed through by order.
        halted = await _set(exchange, HALTED, "incident 7: bad prints")
        assert halted.change.previous_status == TRADING and halted.change.status == HALTED
        assert halted.change.updated_by == "svc:tests"
        await watcher.sees(HALTED)
        market = await _market(exchange, HALTED)
        assert market.status_reason == "incident 7: bad prints"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await buyer.place(side=BUY, price="96", quantity="0.1")
        details = error_of(refused.value)
        assert details.code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.reason == "MATCH_MARKET_HALTED", details
        assert details.metadata.get("status") == "HALTED"

        # Resumed: trading again.
        await _set(exchange, TRADING, "resolved")
        await watcher.sees(TRADING)
        late = await buyer.place(side=BUY, price="96", quantity="0.1")

        # CANCEL_ONLY, over REST: a cancel goes through, a place does not.
        body = {"status": "MARKET_STATUS_CANCEL_ONLY", "reason": "winding down"}
        answer = await asyncio.to_thread(
            _rest, own_stack, exchange.service_token, {**body, "request_id": uid("rest")}
        )
        change = answer["change"]
        assert isinstance(change, dict) and change["status"] == "MARKET_STATUS_CANCEL_ONLY"
        await watcher.sees(CANCEL_ONLY)
        cancelled = await buyer.cancel(late.order_id)
        assert cancelled.state == t.ORDER_STATE_CANCELLED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await seller.place(side=SELL, price="104", quantity="0.1")
        assert error_of(refused.value).reason == "MATCH_MARKET_CANCEL_ONLY"

        # DELISTED, with the CLI: the open orders cancelled, their funds released.
        printed = await asyncio.to_thread(
            cex, own_stack, "market", "status", MARKET, "delisted", "--reason", "gone"
        )
        assert "CANCEL_ONLY -> DELISTED" in printed and "2 open orders cancelled" in printed
        await watcher.sees(DELISTED)
        await _market(exchange, DELISTED)
        for trader, order in ((seller, ask), (buyer, bid)):
            done = await trader.settled(order.order_id, t.ORDER_STATE_CANCELLED)
            assert done.state == t.ORDER_STATE_CANCELLED, done
        assert await exchange.hold_settles(seller.account_id, {"BTC": ("5", "0")}) == {
            "BTC": (Decimal(5), Decimal(0))
        }
        assert await exchange.hold_settles(buyer.account_id, {"USDT": ("1000", "0")}) == {
            "USDT": (Decimal(1000), Decimal(0))
        }
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await buyer.place(side=BUY, price="95", quantity="0.1")
        assert error_of(refused.value).reason == "MATCH_MARKET_DELISTED"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _set(exchange, TRADING, "relist")
        assert error_of(refused.value).reason == "MATCH_MARKET_DELISTED"
    finally:
        await watcher.close()
    await exchange.assert_balanced()
    await journal_replays(exchange)
