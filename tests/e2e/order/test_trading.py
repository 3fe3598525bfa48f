"""Two funded accounts trade through Envoy on the real stack: orders, fills,
balances, fees and holds add up exactly."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import grpc
import pytest

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from tests.e2e.order.support import BUY, SELL, Exchange, error_of, uid

D = Decimal


@pytest.mark.replicas
async def test_a_resting_order_fills_partially_then_fully_and_the_money_adds_up(
    exchange: Exchange,
) -> None:
    alice = await exchange.trader({"BTC": "1"}, "alice")
    bob = await exchange.trader({"USDT": "1000"}, "bob")
    ask = await alice.place(side=SELL, price="100", quantity="0.5")
    assert ask.state == t.ORDER_STATE_OPEN
    assert await exchange.hold_settles(alice.account_id, {"BTC": ("0.5", "0.5")}) == {
        "BTC": (D("0.5"), D("0.5"))
    }

    first = await bob.place(side=BUY, price="100", quantity="0.2")
    assert first.state == t.ORDER_STATE_FILLED
    assert (first.filled_quantity, first.average_price, first.cumulative_fee) == (
        "0.2",
        "100",
        "0.0004",  # 0.2% taker fee, in the BTC bob receives
    )
    partial = await alice.settled(ask.order_id, t.ORDER_STATE_PARTIALLY_FILLED)
    assert (partial.filled_quantity, partial.remaining_quantity) == ("0.2", "0.3")

    second = await bob.place(side=BUY, price="101", quantity="0.3")
    assert second.state == t.ORDER_STATE_FILLED
    assert second.average_price == "100"  # the maker's price
    done = await alice.settled(ask.order_id, t.ORDER_STATE_FILLED)
    assert (done.filled_quantity, done.filled_quote_quantity, done.cumulative_fee) == (
        "0.5",
        "50",
        "0.05",  # 0.1% maker fee, in the USDT alice receives
    )
    assert done.fee_asset == "USDT"

    # Alice: 0.5 BTC out, 50 USDT in less the maker fee. Bob: 50 USDT out (the
    # 0.3 USDT his 101 limit held beyond the fill is released), 0.5 BTC in less
    # the taker fees. Nothing stays held.
    assert await exchange.hold_settles(
        alice.account_id, {"BTC": ("0.5", "0"), "USDT": ("49.95", "0")}
    ) == {"BTC": (D("0.5"), D(0)), "USDT": (D("49.95"), D(0))}
    assert await exchange.hold_settles(
        bob.account_id, {"BTC": ("0.499", "0"), "USDT": ("950", "0")}
    ) == {"BTC": (D("0.499"), D(0)), "USDT": (D("950"), D(0))}

    fills = await alice.orders.ListFills(
        order_pb2.ListFillsRequest(order_id=ask.order_id), metadata=alice.md, timeout=10
    )
    assert [(f.quantity, f.price, f.fee, f.liquidity) for f in fills.fills] == [
        ("0.3", "100", "0.03", t.LIQUIDITY_MAKER),
        ("0.2", "100", "0.02", t.LIQUIDITY_MAKER),
    ]
    bob_fills = await bob.orders.ListFills(
        order_pb2.ListFillsRequest(page_size=1), metadata=bob.md, timeout=10
    )
    assert len(bob_fills.fills) == 1 and bob_fills.next_page_token
    rest = await bob.orders.ListFills(
        order_pb2.ListFillsRequest(page_size=1, page_token=bob_fills.next_page_token),
        metadata=bob.md,
        timeout=10,
    )
    assert [f.order_id for f in (*bob_fills.fills, *rest.fills)] == [
        second.order_id,
        first.order_id,
    ]
    audit = await exchange.audit()
    assert audit.balanced, audit


@pytest.mark.replicas
async def test_cancel_releases_the_hold(exchange: Exchange) -> None:
    bob = await exchange.trader({"USDT": "500"}, "bob")
    bid = await bob.place(side=BUY, price="98", quantity="1.5")
    assert bid.state == t.ORDER_STATE_OPEN
    assert await exchange.hold_settles(bob.account_id, {"USDT": ("353", "147")}) == {
        "USDT": (D(353), D(147))
    }
    cancelled = await bob.cancel(bid.order_id)
    assert cancelled.state == t.ORDER_STATE_CANCELLED
    assert cancelled.cancel_reason == t.CANCEL_REASON_USER_REQUESTED
    assert await exchange.hold_settles(bob.account_id, {"USDT": ("500", "0")}) == {
        "USDT": (D(500), D(0))
    }
    again = await bob.cancel(bid.order_id)  # cancelling a cancelled order returns it
    assert again.state == t.ORDER_STATE_CANCELLED


async def test_an_ioc_remainder_is_cancelled_and_its_hold_released(exchange: Exchange) -> None:
    maker = await exchange.trader({"ETH": "1"}, "maker")
    taker = await exchange.trader({"USDT": "1000"}, "taker")
    await maker.place(market="ETH-USDT", side=SELL, price="2000", quantity="0.1")
    ioc = await taker.place(
        market="ETH-USDT",
        side=BUY,
        price="2000",
        quantity="0.3",
        time_in_force=t.TIME_IN_FORCE_IOC,
    )
    assert ioc.state == t.ORDER_STATE_CANCELLED
    assert ioc.cancel_reason == t.CANCEL_REASON_IMMEDIATE_OR_CANCEL
    assert (ioc.filled_quantity, ioc.remaining_quantity) == ("0.1", "0")
    assert await exchange.hold_settles(taker.account_id, {"USDT": ("800", "0")}) == {
        "USDT": (D(800), D(0))
    }


async def test_self_trade_prevention_stops_a_self_trade(exchange: Exchange) -> None:
    both = await exchange.trader({"BTC": "1", "USDT": "1000"}, "both")
    resting = await both.place(side=SELL, price="102", quantity="0.1")
    crossing = await both.place(
        side=BUY,
        price="102",
        quantity="0.1",
        self_trade_prevention=t.SELF_TRADE_PREVENTION_CANCEL_NEWEST,
    )
    assert crossing.state == t.ORDER_STATE_CANCELLED
    assert crossing.cancel_reason == t.CANCEL_REASON_SELF_TRADE_PREVENTION
    assert crossing.filled_quantity == "0"
    assert (await both.get(resting.order_id)).state == t.ORDER_STATE_OPEN
    assert await exchange.hold_settles(
        both.account_id, {"USDT": ("1000", "0"), "BTC": ("0.9", "0.1")}
    ) == {"USDT": (D(1000), D(0)), "BTC": (D("0.9"), D("0.1"))}


@pytest.mark.replicas
async def test_a_retried_place_is_not_duplicated(exchange: Exchange) -> None:
    bob = await exchange.trader({"USDT": "100"}, "bob")
    request = dict(client_order_id=uid(), side=BUY, price="96", quantity="0.1")
    first = await bob.place(**request)
    again = await bob.place(**request)
    assert again.order_id == first.order_id
    listed = await bob.orders.ListOrders(order_pb2.ListOrdersRequest(), metadata=bob.md, timeout=10)
    assert [o.order_id for o in listed.orders] == [first.order_id]
    assert await exchange.hold_settles(bob.account_id, {"USDT": ("90.4", "9.6")}) == {
        "USDT": (D("90.4"), D("9.6"))
    }
    with pytest.raises(grpc.aio.AioRpcError) as other_body:
        await bob.place(**{**request, "price": "97"})
    assert other_body.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_thousand_orders_for_the_whole_balance_exactly_one_is_accepted(
    exchange: Exchange,
) -> None:
    """Concurrent orders that each need all of an account's USDT: one reservation
    wins, every other order is refused for funds, nothing is reserved twice."""
    buyer = await exchange.trader({"USDT": "10"}, "whole-balance")
    await exchange.lift_limits(buyer, per_second=100_000)
    await asyncio.sleep(0.5)  # the order gateway's copy of the rules (pushed at once)
    answers = await asyncio.gather(
        *(buyer.place(side=BUY, price="100", quantity="0.1") for _ in range(1_000)),
        return_exceptions=True,
    )
    accepted = [a for a in answers if isinstance(a, order_pb2.Order)]
    refused = [error_of(a).reason for a in answers if not isinstance(a, order_pb2.Order)]
    assert len(accepted) == 1, (len(accepted), set(refused))
    assert accepted[0].state == t.ORDER_STATE_OPEN
    assert set(refused) == {"LEDGER_INSUFFICIENT_FUNDS"}
    assert await exchange.hold_settles(buyer.account_id, {"USDT": ("0", "10")}) == {
        "USDT": (Decimal(0), Decimal(10))
    }
    await buyer.cancel(accepted[0].order_id)
    assert await exchange.hold_settles(buyer.account_id, {"USDT": ("10", "0")}) == {
        "USDT": (Decimal(10), Decimal(0))
    }
