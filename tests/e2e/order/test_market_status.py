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
from decimal import Decimal

import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from tests.cli import cex
from tests.e2e.order.support import (
    BUY,
    MARKET,
    SELL,
    BookWatcher,
    Exchange,
    error_of,
    journal_replays,
    uid,
)
from tests.rest import rest_ok

HALTED, TRADING = t.MARKET_STATUS_HALTED, t.MARKET_STATUS_TRADING
CANCEL_ONLY, DELISTED = t.MARKET_STATUS_CANCEL_ONLY, t.MARKET_STATUS_DELISTED


pytestmark = pytest.mark.own_stack


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


async def test_halt_resume_cancel_only_and_delist_with_orders_and_a_watcher(
    own_stack: Stack, exchange: Exchange
) -> None:
    seller = await exchange.trader({"BTC": "5"}, "seller")
    buyer = await exchange.trader({"USDT": "1000"}, "buyer")
    ask = await seller.place(side=SELL, price="105", quantity="1")
    bid = await buyer.place(side=BUY, price="95", quantity="1")
    watcher = BookWatcher(exchange.channel, MARKET)
    try:
        await watcher.sees_status(TRADING)

        # HALTED: places refused with the writer's reason, passed through by order.
        halted = await _set(exchange, HALTED, "incident 7: bad prints")
        assert halted.change.previous_status == TRADING and halted.change.status == HALTED
        assert halted.change.updated_by == "svc:tests"
        await watcher.sees_status(HALTED)
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
        await watcher.sees_status(TRADING)
        late = await buyer.place(side=BUY, price="96", quantity="0.1")

        # CANCEL_ONLY, over REST: a cancel goes through, a place does not.
        body = {"status": "MARKET_STATUS_CANCEL_ONLY", "reason": "winding down"}
        answer = await asyncio.to_thread(
            rest_ok,
            own_stack,
            f"/v1/admin/markets/{MARKET}/status",
            exchange.service_token,
            {**body, "request_id": uid("rest")},
        )
        change = answer["change"]
        assert isinstance(change, dict) and change["status"] == "MARKET_STATUS_CANCEL_ONLY"
        await watcher.sees_status(CANCEL_ONLY)
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
        await watcher.sees_status(DELISTED)
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
