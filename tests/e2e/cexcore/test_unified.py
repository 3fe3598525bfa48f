"""Every unified method of `cexcore` with the real ccxt package against the real
stack, each result checked against CCXT's documented structure
(tests/e2e/cexcore/structures.py) and against what the test itself did.

- the round trip, async: deposits through the chain simulator, a resting
  limit order, a fill with its maker and taker fees, an amend, a cancel, a
  withdrawal to completion, the balances to the unit, the ledger audit;
- public market data and order types, sync (CCXT's blocking class, run in a
  worker thread as a bot's own thread would run it);
- `has` names exactly what the class implements.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ccxt
import pytest

import cex_ccxt
from cex_ccxt import async_support, cexcore
from cex_ccxt.base import UNIFIED
from tests.e2e.cexcore import structures as check
from tests.e2e.cexcore.conftest import MakeUser

BTC = "BTC/USDT"
ADDRESS = "0x1111111111111111111111111111111111111111"
approx = pytest.approx


async def _until(
    read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], within_s: float = 30
) -> Any:
    """`read()` once `done` says so (projections follow the engine by moments)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = await read()
        if done(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_a_round_trip_through_the_async_class(
    make_user: MakeUser, audit: Callable[[], Awaitable[bool]]
) -> None:
    alice = await make_user({"USDT": "1000"}, withdraw=True)
    bob = await make_user({"BTC": "1"})
    a, b = alice.aio(), bob.aio()
    try:
        await a.load_markets()
        await b.load_markets()
        # The deposit the fixture made through the chain, as CCXT sees it.
        (deposit,) = await a.fetch_deposits("USDT")
        check.transaction(a, deposit, "deposit")
        assert (deposit["status"], deposit["amount"], deposit["currency"]) == ("ok", 1000, "USDT")
        address = await a.fetch_deposit_address("USDT")
        check.deposit_address(a, address, "USDT")
        assert deposit["address"] == address["address"] and deposit["txid"]
        balance = await a.fetch_balance()
        check.balance(a, balance)
        assert balance["USDT"] == {"free": 1000, "used": 0, "total": 1000}

        fees = await a.fetch_trading_fees()
        check.trading_fee(a, fees[BTC], BTC)
        maker, taker = fees[BTC]["maker"], fees[BTC]["taker"]

        client_id = f"rt-{uuid.uuid4().hex[:12]}"
        bid = await a.create_order(BTC, "limit", "buy", 0.5, 100, {"clientOrderId": client_id})
        check.order(a, bid, BTC)
        assert (bid["status"], bid["clientOrderId"], bid["price"], bid["amount"]) == (
            "open", client_id, 100, 0.5)  # fmt: skip
        assert (await a.fetch_balance())["USDT"]["used"] == 50  # the bid's hold

        sold = await b.create_order(BTC, "market", "sell", 0.2)
        check.order(b, sold, BTC)
        assert (sold["status"], sold["filled"], sold["average"]) == ("closed", 0.2, 100)
        assert sold["fee"] == {"cost": approx(20 * taker), "currency": "USDT"}

        bought = await _until(lambda: a.fetch_order(bid["id"], BTC), lambda o: o["filled"] > 0)
        check.order(a, bought, BTC)
        assert (bought["status"], bought["filled"], bought["remaining"]) == ("open", 0.2, 0.3)
        assert bought["fee"] == {"cost": approx(0.2 * maker), "currency": "BTC"}
        same = await a.fetch_order(None, BTC, {"clientOrderId": client_id})
        assert same["id"] == bid["id"]

        (mine,) = await a.fetch_my_trades(BTC)
        check.my_trade(a, mine, BTC)
        assert (mine["order"], mine["side"], mine["takerOrMaker"], mine["amount"]) == (
            bid["id"], "buy", "maker", 0.2)  # fmt: skip
        assert mine["fee"] == {"cost": approx(0.2 * maker), "currency": "BTC"}
        (theirs,) = await _until(lambda: b.fetch_my_trades(BTC), lambda fills: len(fills) == 1)
        assert (theirs["id"], theirs["takerOrMaker"]) == (mine["id"], "taker")
        assert await a.fetch_order_trades(bid["id"], BTC) == [mine]

        amended = await a.edit_order(bid["id"], BTC, "limit", "buy", 0.4, 99)
        check.order(a, amended, BTC)
        assert (amended["id"], amended["price"], amended["amount"], amended["remaining"]) == (
            bid["id"], 99, 0.4, approx(0.2))  # fmt: skip
        assert [o["id"] for o in await a.fetch_open_orders(BTC)] == [bid["id"]]

        cancelled = await a.cancel_order(bid["id"], BTC)
        check.order(a, cancelled, BTC)
        assert (cancelled["status"], cancelled["filled"]) == ("canceled", 0.2)
        closed = await _until(lambda: a.fetch_closed_orders(BTC), lambda os: len(os) == 1)
        assert [(o["id"], o["status"]) for o in closed] == [(bid["id"], "canceled")]
        assert await a.fetch_open_orders(BTC) == []
        assert [o["id"] for o in await a.fetch_orders(BTC)] == [bid["id"]]

        withdrawal = await a.withdraw("USDT", 100, ADDRESS)
        check.transaction(a, withdrawal, "withdrawal")
        assert (withdrawal["amount"], withdrawal["fee"]["cost"], withdrawal["address"]) == (
            100, a.currencies["USDT"]["fee"], ADDRESS)  # fmt: skip
        done = await _until(
            lambda: a.fetch_withdrawal(withdrawal["id"]), lambda w: w["status"] == "ok"
        )
        assert done["status"] == "ok" and done["txid"], done
        assert [w["id"] for w in await a.fetch_withdrawals("USDT")] == [withdrawal["id"]]

        # 1000 - 20 (the fill) - 100 - 1 (the withdrawal and its fee); 0.2 BTC less the
        # maker fee; nothing held once the rest of the bid is cancelled.
        balance = await a.fetch_balance()
        assert balance["USDT"] == {"free": 879, "used": 0, "total": 879}
        assert balance["BTC"] == {"free": approx(0.2 - 0.2 * maker), "used": 0,
                                  "total": approx(0.2 - 0.2 * maker)}  # fmt: skip
        assert (await b.fetch_balance())["USDT"]["free"] == approx(20 - 20 * taker)
        assert await audit()
    finally:
        await a.close()
        await b.close()


def _public_data(exchange: cexcore, trade_id: str) -> None:
    """The public methods (no key at all), on the sync class."""
    markets = exchange.load_markets()
    assert set(markets) >= {BTC, "ETH/USDT", "ETH/BTC"}
    for market in exchange.fetch_markets():
        check.market(exchange, market)
    for currency in exchange.fetch_currencies().values():
        check.currency(exchange, currency)
    spec = markets[BTC]
    assert spec["info"]["tick_size"] == "0.01" and spec["precision"]["price"] == 0.01
    assert spec["precision"]["amount"] == float(spec["info"]["lot_size"])
    assert spec["limits"]["cost"]["min"] == float(spec["info"]["min_notional"])

    ticker = exchange.fetch_ticker(BTC)
    check.ticker(exchange, ticker, BTC)
    assert ticker["last"] == 101 and ticker["bid"] == 96 and ticker["ask"] == 104
    tickers = exchange.fetch_tickers()
    assert set(tickers) == set(markets)
    for one in tickers.values():
        check.ticker(exchange, one)
    assert list(exchange.fetch_tickers([BTC])) == [BTC]

    book = exchange.fetch_order_book(BTC, 5)
    check.order_book(exchange, book, BTC)
    assert [96, 0.1] in book["bids"] and [104, 0.1] in book["asks"]
    assert len(book["bids"]) <= 5 and len(book["asks"]) <= 5

    trades = exchange.fetch_trades(BTC, limit=20)
    for trade in trades:
        check.trade(exchange, trade, BTC)
    ours = [t for t in trades if t["id"] == trade_id]
    assert [(t["price"], t["amount"], t["side"]) for t in ours] == [(101, 0.1, "sell")]
    since = ours[0]["timestamp"]
    assert exchange.fetch_trades(BTC, since=since)[0]["id"] == trade_id

    for timeframe in exchange.timeframes:
        rows = exchange.fetch_ohlcv(BTC, timeframe, limit=10)
        check.ohlcv(exchange, rows, timeframe)
        last = rows[-1]
        assert last[0] <= since < last[0] + check.TIMEFRAMES_MS[timeframe]
        assert last[4] == 101 and last[5] >= 0.1
    with pytest.raises(ccxt.BadRequest, match="timeframe '2m'"):
        exchange.fetch_ohlcv(BTC, "2m")


async def test_public_market_data_through_the_sync_class(make_user: MakeUser) -> None:
    maker = await make_user({"USDT": "100", "BTC": "0.5"})
    taker = await make_user({"BTC": "0.5"})
    m, t = maker.aio(), taker.aio()
    try:
        await m.create_order(BTC, "limit", "buy", 0.1, 96)
        await m.create_order(BTC, "limit", "sell", 0.1, 104)
        await m.create_order(BTC, "limit", "buy", 0.1, 101)
        sold = await t.create_order(BTC, "limit", "sell", 0.1, 101, {"timeInForce": "IOC"})
        assert sold["status"] == "closed"
        (fill,) = await _until(lambda: t.fetch_my_trades(BTC), lambda fills: len(fills) == 1)
        # market data follows the engine by moments
        await _until(lambda: m.fetch_ticker(BTC), lambda x: x["bid"] == 96 and x["last"] == 101)
        public = cexcore({"hostname": maker.edge})  # no key: public methods only
        await asyncio.to_thread(_public_data, public, fill["id"])
        assert public.currencies["USDT"]["fee"] is None  # withdrawal fees need a key
        keyed = await asyncio.to_thread(lambda: maker.sync().fetch_currencies())
        assert keyed["USDT"]["fee"] == 1 and keyed["USDT"]["limits"]["withdraw"]["min"] == 1
        assert list(keyed["BTC"]["networks"]) == ["bitcoin"]
    finally:
        await m.close()
        await t.close()


def _order_types(exchange: cexcore) -> None:
    """Limit (GTC, IOC, post-only), market by cost, stop-limit; get, list, cancel-all."""
    exchange.load_markets()
    stop = exchange.create_order(BTC, "limit", "buy", 0.1, 104, {"triggerPrice": 103})
    check.order(exchange, stop, BTC)
    assert (stop["type"], stop["triggerPrice"], stop["price"], stop["status"]) == (
        "limit", 103, 104, "open")  # fmt: skip
    assert stop["info"]["type"] == "ORDER_TYPE_STOP_LIMIT"
    assert stop["info"]["state"] == "ORDER_STATE_UNTRIGGERED"
    resting = exchange.create_order(BTC, "limit", "buy", 0.1, 95.5, {"postOnly": True})
    assert (resting["postOnly"], resting["timeInForce"], resting["status"]) == (True, "PO", "open")
    ioc = exchange.create_order(BTC, "limit", "buy", 0.1, 95.01, {"timeInForce": "IOC"})
    assert (ioc["timeInForce"], ioc["status"], ioc["filled"]) == ("IOC", "canceled", 0)
    spent = exchange.create_market_buy_order_with_cost(BTC, 10)
    check.order(exchange, spent, BTC)
    assert spent["type"] == "market" and spent["cost"] <= 10 and spent["info"]["quote_quantity"]
    open_ids = {stop["id"], resting["id"]}
    for _ in range(100):  # the order list is projected from the engine's events
        if {o["id"] for o in exchange.fetch_open_orders(BTC)} == open_ids:
            break
        time.sleep(0.1)
    assert {o["id"] for o in exchange.fetch_open_orders(BTC)} == open_ids
    assert exchange.fetch_order(stop["id"], BTC)["status"] == "open"
    cancelled = exchange.cancel_all_orders(BTC)
    assert {o["id"] for o in cancelled} == open_ids
    assert {o["status"] for o in cancelled} == {"canceled"}
    assert exchange.fetch_open_orders(BTC) == []
    assert {o["id"] for o in exchange.fetch_orders(BTC)} >= open_ids | {ioc["id"]}


async def test_order_types_through_the_sync_class(make_user: MakeUser) -> None:
    user = await make_user({"USDT": "100"})
    await asyncio.to_thread(_order_types, user.sync())


async def test_has_names_exactly_what_the_class_implements(make_user: MakeUser) -> None:
    for cls in (cexcore, async_support.cexcore):
        exchange = cls()
        claimed = {k for k, v in exchange.has.items() if v}
        for name in UNIFIED:
            camel = exchange.id and getattr(exchange, name).__name__
            assert camel == name
            assert name in cls.__dict__, f"{name} is not cexcore's own"
        implemented = {
            "".join(p if i == 0 else p.capitalize() for i, p in enumerate(n.split("_")))
            for n in UNIFIED
        }
        implemented = {n.replace("Ohlcv", "OHLCV") for n in implemented}
        # what CCXT builds on create_order and fetch_order_book works by them
        derived = {"createLimitOrder", "createMarketOrder", "createPostOnlyOrder",
                   "createStopLimitOrder", "createStopMarketOrder", "createStopOrder",
                   "createTriggerOrder", "fetchL2OrderBook"}  # fmt: skip
        assert claimed == implemented | derived | {"spot", "publicAPI", "privateAPI"}
        assert exchange.has["fetchPositions"] is False and exchange.has["margin"] is False
        if cls is async_support.cexcore:
            await exchange.close()


def test_one_line_registers_it_with_ccxt() -> None:
    cex_ccxt.register()
    assert "cexcore" in ccxt.exchanges and "cexcore" in ccxt.async_support.exchanges
    assert ccxt.cexcore is cexcore and ccxt.async_support.cexcore is async_support.cexcore
    assert ccxt.cex is not cexcore  # ccxt's own `cex` (CEX.IO) is untouched
