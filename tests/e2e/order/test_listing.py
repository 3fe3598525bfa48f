"""A market listed at runtime, without a restart (ADR 0018), on the real stack:
refused when malformed (a field violation per bad field) or asked for by a
non-admin; listed by gRPC (a retry with its request_id is the first answer), a
second listing of the symbol refused over REST, another market listed with the
`cex` CLI; the new market shows in market data (ListMarkets, GetMarket, the
order book stream), trades through order, is still there and tradable after
match and then order are killed (-9), and is halted, resumed and delisted; the
ledger audit passes and the journal replays to the writer's state.

The stack is this module's own: a listing is permanent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from tests.cli import cex
from tests.e2e.order.support import (
    BUY,
    SELL,
    BookWatcher,
    Exchange,
    Trader,
    error_of,
    fields,
    journal_replays,
    kill,
    uid,
)
from tests.rest import rest

NEW = "BTC-ETH"  # both assets are in the catalog; the market is not
HALTED, TRADING = t.MARKET_STATUS_HALTED, t.MARKET_STATUS_TRADING
DELISTED = t.MARKET_STATUS_DELISTED
T = TypeVar("T")


def _request(**overrides: str) -> match_pb2.CreateMarketRequest:
    fields_: dict[str, str] = {
        "symbol": NEW, "base": "BTC", "quote": "ETH", "tick_size": "0.001",
        "lot_size": "0.00001", "max_quantity": "1000", "min_notional": "0.001",
        "price_band": "0.5", "reason": "new pair (issue 21)", "request_id": uid("list"),
    }  # fmt: skip
    fields_.update(overrides)
    return match_pb2.CreateMarketRequest(**fields_)


pytestmark = pytest.mark.own_stack


async def _retried(call: Callable[[], Awaitable[T]], within_s: float = 30.0) -> T:
    """`call` until it is not UNAVAILABLE (a killed service's callers reconnecting)."""
    async with asyncio.timeout(within_s):
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.2)


async def _market(exchange: Exchange, status: int, within_s: float = 20.0) -> t.Market:
    stub = marketdata_pb2_grpc.MarketDataServiceStub(exchange.channel)
    async with asyncio.timeout(within_s):
        while True:
            listed = await stub.ListMarkets(md.ListMarketsRequest(page_size=100), timeout=10)
            found = [m for m in listed.markets if m.symbol == NEW]
            if found and found[0].status == status:
                return found[0]
            await asyncio.sleep(0.1)


async def _set(exchange: Exchange, status: int, reason: str) -> match_pb2.SetMarketStatusResponse:
    stub = match_pb2_grpc.MatchServiceStub(exchange.channel)
    request = match_pb2.SetMarketStatusRequest(
        market=NEW, status=status, reason=reason, request_id=uid("st")
    )
    return await stub.SetMarketStatus(request, metadata=exchange.svc, timeout=20)


async def _place(trader: Trader, **fields_: object) -> order_pb2.Order:
    return await _retried(lambda: trader.place(market=NEW, **fields_))


async def test_list_trade_restart_halt_and_delist_a_new_market(
    own_stack: Stack, exchange: Exchange
) -> None:
    stub = match_pb2_grpc.MatchServiceStub(exchange.channel)
    seller = await exchange.trader({"BTC": "2"}, "seller")
    buyer = await exchange.trader({"ETH": "100"}, "buyer")

    # Malformed: every bad field named; not an admin: refused; nothing listed.
    bad = _request(symbol="btc-eth", tick_size="0.0x", lot_size="", max_quantity="-1",
                   price_band="2", reason="")  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateMarket(bad, metadata=exchange.svc, timeout=20)
    details = error_of(refused.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields(details)) >= {
        "symbol", "tick_size", "lot_size", "max_quantity", "price_band", "reason"
    }, details  # fmt: skip
    unknown = _request(symbol="DOGE-ETH", base="DOGE")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateMarket(unknown, metadata=exchange.svc, timeout=20)
    assert fields(error_of(refused.value)) == ["base"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateMarket(_request(), metadata=seller.md, timeout=20)
    assert error_of(refused.value).code == grpc.StatusCode.PERMISSION_DENIED

    # Listed; the same request again is the first answer; another listing is refused.
    request = _request()
    listed = await stub.CreateMarket(request, metadata=exchange.svc, timeout=20)
    assert listed.seq == 1 and listed.listing.market.symbol == NEW
    assert listed.listing.market.tick_size == "0.001" and listed.listing.listed_by == "svc:tests"
    assert await stub.CreateMarket(request, metadata=exchange.svc, timeout=20) == listed
    body = {"symbol": NEW, "base": "BTC", "quote": "ETH", "tickSize": "0.01",
            "lotSize": "0.0001", "maxQuantity": "10", "minNotional": "1",
            "reason": "again", "requestId": uid("rest")}  # fmt: skip
    code, answer = await asyncio.to_thread(
        rest, own_stack, "/v1/admin/markets", exchange.service_token, body
    )
    assert code == 409, answer
    assert "MATCH_MARKET_EXISTS" in json.dumps(answer)
    static = _request(symbol="BTC-USDT", quote="USDT", tick_size="0.01")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateMarket(static, metadata=exchange.svc, timeout=20)
    assert error_of(refused.value).reason == "MATCH_MARKET_EXISTS"
    printed = await asyncio.to_thread(
        cex, own_stack, "market", "list-new", "USDT-ETH", "--tick-size", "0.000001",
        "--lot-size", "0.01", "--max-quantity", "100000", "--min-notional", "0.001",
        "--reason", "by the CLI",
    )  # fmt: skip
    assert printed.startswith("USDT-ETH listed at seq 1"), printed

    # Market data shows it (ListMarkets, GetMarket, the stream); order trades it.
    market = await _market(exchange, TRADING)
    assert (market.base_asset, market.quote_asset, market.tick_size) == ("BTC", "ETH", "0.001")
    watcher = BookWatcher(exchange.channel, NEW)
    try:
        await watcher.sees(lambda: watcher.statuses == [TRADING])
        ask = await _place(seller, side=SELL, price="20", quantity="1")
        taken = await _place(buyer, side=BUY, price="20", quantity="0.4")
        done = await buyer.settled(taken.order_id, t.ORDER_STATE_FILLED)
        assert done.state == t.ORDER_STATE_FILLED, done
        await watcher.sees(lambda: "20" in watcher.asks)

        # kill -9 match (the writer recovers the market from its table and journal),
        # then order (it loads the listed markets at start): still tradable.
        await kill(own_stack, "match")
        more = await _place(buyer, side=BUY, price="20", quantity="0.1")
        assert (await buyer.settled(more.order_id, t.ORDER_STATE_FILLED)).state == (
            t.ORDER_STATE_FILLED
        )
        await kill(own_stack, "order")
        bid = await _place(buyer, side=BUY, price="19.5", quantity="0.1")
        assert bid.state in (t.ORDER_STATE_OPEN, t.ORDER_STATE_PENDING_NEW), bid

        # Halted: places refused; resumed; delisted: the open orders cancelled.
        await _set(exchange, HALTED, "incident on the new pair")
        await watcher.sees_status(HALTED)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await buyer.place(market=NEW, side=BUY, price="19", quantity="0.1")
        assert error_of(refused.value).reason == "MATCH_MARKET_HALTED"
        await _set(exchange, TRADING, "resolved")
        await watcher.sees_status(TRADING)
        delisted = await _set(exchange, DELISTED, "wound down")
        assert delisted.cancelled_orders == 2  # what is left of the ask, and the bid
        await watcher.sees_status(DELISTED)
        await _market(exchange, DELISTED)
        for trader, order in ((seller, ask), (buyer, bid)):
            gone = await trader.settled(order.order_id, t.ORDER_STATE_CANCELLED)
            assert gone.state == t.ORDER_STATE_CANCELLED, gone
        balances = await exchange.balances(seller.account_id)
        assert balances["BTC"] == (Decimal("1.5"), Decimal(0)), balances
    finally:
        await watcher.close()
    await exchange.assert_balanced()
    await journal_replays(exchange)
