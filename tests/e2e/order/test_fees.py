"""Fees are visible (issue 18): GetFees / `GET /v1/fees` through Envoy answer the
rates and withdrawal terms the exchange applies, and a fill and a withdrawal are
charged exactly what they say."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from cex.auth.v1 import auth_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from tests.e2e.order.support import BUY, SELL, Exchange
from tests.rest import rest


async def test_fees_are_readable_and_are_what_a_fill_is_charged(
    stack: Stack, exchange: Exchange
) -> None:
    maker = await exchange.trader({"USDT": "1000"}, name="maker")
    taker = await exchange.trader({"BTC": "1"}, name="taker")
    fees = await exchange.auth.GetFees(auth_pb2.GetFeesRequest(), metadata=maker.md, timeout=10)
    assert fees.fee_tier == "default"
    status, answer = await asyncio.to_thread(rest, stack, "/v1/fees", maker.token)
    assert status == 200, answer
    assert answer["maker_fee_rate"] == fees.maker_fee_rate == "0.001"
    assert answer["taker_fee_rate"] == fees.taker_fee_rate == "0.002"
    markets = {m["market"]: m for m in answer["markets"]}
    assert markets["BTC-USDT"]["buy_fee_asset"] == "BTC"
    assert markets["BTC-USDT"]["sell_fee_asset"] == "USDT"
    assets = {a["asset"]: a for a in answer["assets"]}
    assert (assets["USDT"]["withdrawal_fee"], assets["USDT"]["min_withdrawal"]) == ("1", "1")
    assert assets["USDT"]["network"] == "ethereum"
    # no token, no fees: the edge's 401
    assert (await asyncio.to_thread(rest, stack, "/v1/fees", None))[0] == 401
    # A fill is charged the rates shown, in the assets shown.
    bid = await maker.place(side=BUY, price="100", quantity="0.1")
    hit = await taker.place(side=SELL, price="100", quantity="0.1")
    assert hit.state == t.ORDER_STATE_FILLED, hit
    assert hit.fee_asset == markets["BTC-USDT"]["sell_fee_asset"]
    assert Decimal(hit.cumulative_fee) == Decimal("10") * Decimal(fees.taker_fee_rate)
    made = await maker.settled(bid.order_id, t.ORDER_STATE_FILLED)
    assert made.fee_asset == markets["BTC-USDT"]["buy_fee_asset"]
    assert Decimal(made.cumulative_fee) == Decimal("0.1") * Decimal(fees.maker_fee_rate)
