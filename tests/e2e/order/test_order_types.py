"""Every order type through OrderService on the real stack (Envoy, order, risk,
ledger, match): market (by quantity and by quote budget), stop-limit,
stop-market, FOK, GTD and post-only, each with what it leaves held.

The book is shared: these tests trade BTC-USDT within 95..105 (see conftest)
and leave nothing working.
"""

from __future__ import annotations

import time
from decimal import Decimal

import grpc
from google.protobuf import timestamp_pb2

from cex.type.v1 import types_pb2 as t
from tests.e2e.order.support import BUY, SELL, Exchange, error_of

D = Decimal


async def _last_trade_at(exchange: Exchange, price: str) -> None:
    """Make the market's last trade price `price` (what stop orders trigger on)."""
    seller = await exchange.trader({"BTC": "1"}, "last-seller")
    buyer = await exchange.trader({"USDT": "1000"}, "last-buyer")
    await seller.place(side=SELL, price=price, quantity="0.1")
    assert (await buyer.place(side=BUY, price=price, quantity="0.1")).state == (
        t.ORDER_STATE_FILLED
    )


async def test_a_market_buy_by_quantity_fills_and_releases_its_protection_hold(
    exchange: Exchange,
) -> None:
    seller = await exchange.trader({"BTC": "1"}, "mkt-seller")
    buyer = await exchange.trader({"USDT": "1000"}, "mkt-buyer")
    # 96: below any protection price (the reference, 95..105 here, + 5 %).
    await seller.place(side=SELL, price="96", quantity="0.1")
    order = await buyer.place(side=BUY, type=t.ORDER_TYPE_MARKET, quantity="0.1")
    assert order.state == t.ORDER_STATE_FILLED
    assert D(order.filled_quantity) == D("0.1")
    # Held at the protection price until done, then every unspent unit returns:
    # 9.6 USDT spent, the fee is taken from the BTC received.
    balances = await exchange.hold_settles(buyer.account_id, {"USDT": ("990.4", "0")})
    assert balances == {"USDT": (D("990.4"), D("0"))}


async def test_a_market_buy_by_quote_budget_spends_at_most_the_budget(
    exchange: Exchange,
) -> None:
    seller = await exchange.trader({"BTC": "1"}, "budget-seller")
    buyer = await exchange.trader({"USDT": "1000"}, "budget-buyer")
    await seller.place(side=SELL, price="100", quantity="0.05")
    await seller.place(side=SELL, price="101", quantity="0.05")
    order = await buyer.place(side=BUY, type=t.ORDER_TYPE_MARKET, quote_quantity="7.02")
    # 5.00 at 100 buys 0.05; the 2.02 left buys 0.02 at 101.
    assert D(order.filled_quantity) == D("0.07")
    assert order.state in (t.ORDER_STATE_FILLED, t.ORDER_STATE_CANCELLED)
    settled = await exchange.hold_settles(buyer.account_id, {"USDT": ("992.98", "0")})
    assert settled == {"USDT": (D("992.98"), D("0"))}


async def test_a_stop_limit_waits_untriggered_then_trades_after_the_trigger(
    exchange: Exchange,
) -> None:
    maker = await exchange.trader({"BTC": "1"}, "stop-maker")
    taker = await exchange.trader({"USDT": "1000"}, "stop-taker")
    stopper = await exchange.trader({"USDT": "1000"}, "stop-owner")
    await _last_trade_at(exchange, "100")
    stop = await stopper.place(
        side=BUY,
        type=t.ORDER_TYPE_STOP_LIMIT,
        stop_price="101",
        price="102",
        quantity="0.1",
    )
    assert stop.state == t.ORDER_STATE_UNTRIGGERED
    # Held at its limit price while it waits.
    assert await exchange.held(stopper.account_id, "USDT", D("10.2")) == D("10.2")
    await maker.place(side=SELL, price="101", quantity="0.1")
    await maker.place(side=SELL, price="101.5", quantity="0.1")
    await taker.place(side=BUY, price="101", quantity="0.1")  # trades at 101: the trigger
    filled = await stopper.settled(stop.order_id, t.ORDER_STATE_FILLED)
    assert D(filled.average_price) == D("101.5")
    # 10.15 spent; the 0.05 of the hold above the fill price returns.
    settled = await exchange.hold_settles(stopper.account_id, {"USDT": ("989.85", "0")})
    assert settled == {"USDT": (D("989.85"), D("0"))}


async def test_a_stop_market_sell_fires_and_sells_at_the_book(exchange: Exchange) -> None:
    bidder = await exchange.trader({"USDT": "1000"}, "stopm-bidder")
    seller = await exchange.trader({"BTC": "1"}, "stopm-seller")
    trader = await exchange.trader({"BTC": "1"}, "stopm-owner")
    await _last_trade_at(exchange, "100")
    stop = await trader.place(
        side=SELL, type=t.ORDER_TYPE_STOP_MARKET, stop_price="99", quantity="0.1"
    )
    assert stop.state == t.ORDER_STATE_UNTRIGGERED
    assert await exchange.held(trader.account_id, "BTC", D("0.1")) == D("0.1")
    await bidder.place(side=BUY, price="99", quantity="0.1")
    await bidder.place(side=BUY, price="98.5", quantity="0.1")
    await seller.place(side=SELL, price="99", quantity="0.1")  # trades at 99: the trigger
    filled = await trader.settled(stop.order_id, t.ORDER_STATE_FILLED)
    assert D(filled.average_price) == D("98.5")
    assert await exchange.held(trader.account_id, "BTC", D(0)) == 0


async def test_fill_or_kill_fills_whole_or_not_at_all(exchange: Exchange) -> None:
    maker = await exchange.trader({"BTC": "1"}, "fok-maker")
    taker = await exchange.trader({"USDT": "1000"}, "fok-taker")
    resting = await maker.place(side=SELL, price="100", quantity="0.1")
    killed = await taker.place(
        side=BUY, price="100", quantity="0.2", time_in_force=t.TIME_IN_FORCE_FOK
    )
    assert killed.state == t.ORDER_STATE_CANCELLED
    assert killed.cancel_reason == t.CANCEL_REASON_FILL_OR_KILL
    assert D(killed.filled_quantity) == 0
    assert (await maker.get(resting.order_id)).state == t.ORDER_STATE_OPEN
    filled = await taker.place(
        side=BUY, price="100", quantity="0.1", time_in_force=t.TIME_IN_FORCE_FOK
    )
    assert filled.state == t.ORDER_STATE_FILLED
    settled = await exchange.hold_settles(taker.account_id, {"USDT": ("990", "0")})
    assert settled == {"USDT": (D("990"), D("0"))}


async def test_post_only_is_refused_when_it_would_take(exchange: Exchange) -> None:
    maker = await exchange.trader({"BTC": "1"}, "po-maker")
    poster = await exchange.trader({"USDT": "1000"}, "po-poster")
    await maker.place(side=SELL, price="101", quantity="0.1")
    try:
        refused = await poster.place(side=BUY, price="101", quantity="0.1", post_only=True)
    except grpc.aio.AioRpcError as error:
        assert error_of(error).reason == "MATCH_POST_ONLY_WOULD_TAKE"
    else:
        assert refused.state == t.ORDER_STATE_REJECTED
        assert refused.reject_reason == "MATCH_POST_ONLY_WOULD_TAKE"
    resting = await poster.place(side=BUY, price="100.99", quantity="0.1", post_only=True)
    assert resting.state == t.ORDER_STATE_OPEN
    # Nothing of the refused one stays held: only the resting order's 10.099.
    assert await exchange.held(poster.account_id, "USDT", D("10.099")) == D("10.099")


async def test_a_gtd_order_in_an_idle_market_expires_on_time_and_its_funds_return(
    exchange: Exchange,
) -> None:
    buyer = await exchange.trader({"USDT": "1000"}, "gtd-buyer")
    expire_at = time.time() + 1.5
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(expire_at * 1e9))
    order = await buyer.place(
        side=BUY,
        price="96",
        quantity="0.1",
        time_in_force=t.TIME_IN_FORCE_GTD,
        expire_time=stamp,
    )
    assert order.state == t.ORDER_STATE_OPEN
    assert await exchange.held(buyer.account_id, "USDT", D("9.6")) == D("9.6")
    # Nothing else happens in the market: match's own clock expires it.
    expired = await buyer.settled(order.order_id, t.ORDER_STATE_EXPIRED, within_s=10)
    seen = time.time()
    assert expired.state == t.ORDER_STATE_EXPIRED
    assert expired.cancel_reason == t.CANCEL_REASON_EXPIRED
    assert seen - expire_at < 1.0  # within a second of its time
    assert await exchange.held(buyer.account_id, "USDT", D(0)) == 0
