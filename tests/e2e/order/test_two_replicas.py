"""Every RPC of order and market data, its streams, cancel-on-disconnect and
CancelAllAfter on a stack with 2 replicas of every stateless service (issue 20).

`replicated_stack` (tests/conftest.py) runs auth, risk, ledger, market data,
order and funding twice each, match (the single writer) with its standby, and
the reflection server once. The tests marked `replicas` run on the session's stack and again
on that one (`[replicated_stack]`, at the end of the session: one start of it).
On it, a test's traders take turns on the two order replicas (the edge hashes
accounts to replicas; `Exchange.trader` makes accounts until one lands where
wanted, and the `exchange` fixture checks at the end that none moved), and
market data calls are made until each replica answered (`served`, from each
replica's own metrics): the requests really spread.

Which test covers which RPC there (modules of tests/e2e/order/, and
tests/e2e/test_marketdata.py):

order
- PlaceOrder: nearly every test; test_trading.py::
  test_a_resting_order_fills_partially_then_fully_and_the_money_adds_up (fills),
  test_a_retried_place_is_not_duplicated (the same client_order_id)
- CancelOrder: test_trading.py::test_cancel_releases_the_hold
- AmendOrder: test_orders_api.py::
  test_amend_down_keeps_priority_and_an_amend_beyond_the_hold_is_refused,
  test_an_amend_refused_by_match_keeps_the_working_orders_hold
- BatchPlaceOrders: test_orders_api.py::test_batch_place_answers_each_item
- GetOrder: test_orders_api.py::test_batch_place_answers_each_item (by
  client_order_id), test_a_user_acts_only_on_their_own_account; `Trader.settled`
- ListOrders: test_orders_api.py::test_list_orders_pages_and_filters (pages,
  filters), test_mass_cancel_by_market_then_everything
- ListFills: test_trading.py::
  test_a_resting_order_fills_partially_then_fully_and_the_money_adds_up (pages);
  here test_market_data_rpcs_and_streams
- CancelAllOrders: test_orders_api.py::test_mass_cancel_by_market_then_everything
- CancelAllAfter: test_orders_api.py::
  test_cancel_all_after_cancels_everything_unless_renewed; here
  test_sessions_and_dead_mans_switches_on_both_order_replicas (both replicas)
- StreamOrders: test_streams.py::test_acks_sequenced_execution_reports_and_heartbeats,
  test_a_session_resumes_from_the_last_report_its_client_saw,
  test_several_commands_in_one_message_are_each_answered
- cancel-on-disconnect: test_streams.py::test_cancel_on_disconnect_leaves_no_open_orders;
  here test_sessions_and_dead_mans_switches_on_both_order_replicas (each replica
  cancels its own sessions' orders only)
- REST through the edge: test_orders_api.py::test_rest_place_lookup_and_cancel_through_envoy
- a kill switch that cancels open orders (order's shared kill-switch consumer):
  test_orders_api.py::test_a_kill_switch_that_cancels_open_orders_cancels_them.
  Not test_every_risk_refusal_has_its_reason: it expects a kill switch at the very
  next order, and with 2 risk replicas one set on the replica order does not follow
  (order watches risk's first replica) reaches order's checks a NOTIFY and a
  WatchRules push later (ADR 0007), not by the time SetKillSwitch answers

market data
- ListMarkets, GetMarket, ListTrades, StreamTrades, GetTicker, ListTickers,
  StreamTickers, GetCandles: here test_market_data_rpcs_and_streams (each asked of
  both replicas, a stream on each)
- GetOrderBook, StreamOrderBook, and ListMarkets and REST: test_marketdata.py::
  test_market_data_is_public_through_envoy

every stateless service: both replicas serve through the edge (round robin; order
by account): here test_every_stateless_service_runs_twice_and_the_edge_uses_both
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import timestamp_pb2

from cex.auth.v1 import auth_pb2
from cex.funding.v1 import funding_pb2, funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2
from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.order.v1 import order_pb2
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES
from tests.e2e.order.support import (
    BUY,
    SELL,
    Exchange,
    Session,
    exchange_on,
    session_owners,
    uid,
    writer_of,
)
from tests.replicas import REPLICATED, Target, grew, replica_names, served

D = Decimal
T = TypeVar("T")
MARKET = "BTC-USDT"
NEW, CANCELLED = 1, 3  # execution types
PRICE, QUANTITY = "101.37", "0.05234"  # the market data test's trade (no other test's)


async def _on_each_replica(
    stack: Stack, service: str, method: str, call: Callable[[], Awaitable[T]]
) -> dict[str, T]:
    """`call` made until every replica of `service` has answered one: replica -> its
    first answer. Fails if the edge keeps sending it to the same replicas."""
    names = replica_names(stack, service)
    answers: dict[str, T] = {}
    for _ in range(4 * len(names)):
        before = await served(stack, service, method)
        answer = await call()
        moved = grew(before, await served(stack, service, method))
        if len(moved) == 1:  # else someone else called it too (an edge's retry): again
            answers.setdefault(moved.pop(), answer)
        if len(answers) == len(names):
            return answers
    pytest.fail(f"{method}: only {sorted(answers)} of {names} answered")


async def _until_each_replica(
    stack: Stack,
    service: str,
    method: str,
    call: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    within_s: float = 15.0,
) -> dict[str, T]:
    """`_on_each_replica` again until every replica's answer is `done` (each one's view
    catches up on its own)."""
    async with asyncio.timeout(within_s):
        while True:
            answers = await _on_each_replica(stack, service, method, call)
            if all(done(a) for a in answers.values()):
                return answers
            await asyncio.sleep(0.1)


async def _stream_on_each_replica(
    stack: Stack, method: str, open_call: Callable[[], Any]
) -> dict[str, Any]:
    """Market data's server streams opened until each replica serves one: replica ->
    its stream (an extra one is cancelled)."""
    names = replica_names(stack, "marketdata")
    streams: dict[str, Any] = {}
    for _ in range(4 * len(names)):
        before = await served(stack, "marketdata", method)
        call = open_call()
        async with asyncio.timeout(10):  # it reaches a replica before any message
            while True:
                moved = grew(before, await served(stack, "marketdata", method))
                if moved:
                    break
                await asyncio.sleep(0.02)
        where = moved.pop() if len(moved) == 1 else None
        if where is None or where in streams:
            call.cancel()
        else:
            streams[where] = call
        if len(streams) == len(names):
            return streams
    for call in streams.values():
        call.cancel()
    pytest.fail(f"{method}: only {sorted(streams)} of {names} served a stream")


async def _caught_up(stack: Stack, stub: marketdata_pb2_grpc.MarketDataServiceStub) -> None:
    """Every market data replica's feed of the market has caught up with match (on a
    fresh stack it follows match through the edge, which starts last): a trade made
    before would be in its first book, not on its streams."""
    ready: set[str] = set()
    async with asyncio.timeout(30):
        while len(ready) < len(replica_names(stack, "marketdata")):
            before = await served(stack, "marketdata", "GetOrderBook")
            try:
                await stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET), timeout=5)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                await asyncio.sleep(0.2)
                continue
            ready |= grew(before, await served(stack, "marketdata", "GetOrderBook"))


async def _first(stream: Any, found: Callable[[Any], list[T]], within_s: float = 15.0) -> T:
    """The first item `found` picks from the stream's next messages."""
    async with asyncio.timeout(within_s):
        while True:
            message = await stream.read()
            assert message is not grpc.aio.EOF, "the stream ended"
            if picked := found(message):
                return picked[0]


def _minute(ts: timestamp_pb2.Timestamp) -> tuple[timestamp_pb2.Timestamp, ...]:
    start = ts.seconds - ts.seconds % 60
    return timestamp_pb2.Timestamp(seconds=start), timestamp_pb2.Timestamp(seconds=start + 60)


async def _tape(
    stub: marketdata_pb2_grpc.MarketDataServiceStub,
    start: timestamp_pb2.Timestamp,
    end: timestamp_pb2.Timestamp,
) -> list[md.Trade]:
    """Every stored trade of MARKET in [start, end), all pages."""
    trades: list[md.Trade] = []
    token = ""
    while True:
        page = await stub.ListTrades(
            md.ListTradesRequest(
                market=MARKET, start_time=start, end_time=end, page_size=1000, page_token=token
            ),
            timeout=10,
        )
        trades += page.trades
        token = page.next_page_token
        if not token:
            return trades


@pytest.mark.replicas
async def test_market_data_rpcs_and_streams(exchange: Exchange) -> None:
    """A trade reaches every StreamTrades and StreamTickers stream, one per market data
    replica, and every replica's ListTrades, GetTicker, ListTickers and GetCandles; the
    candle of its minute counts each trade of the tape once (both replicas persist the
    same events)."""
    stack = exchange.stack
    stub = marketdata_pb2_grpc.MarketDataServiceStub(exchange.channel)
    await _caught_up(stack, stub)
    trade_streams = await _stream_on_each_replica(
        stack, "StreamTrades", lambda: stub.StreamTrades(md.StreamTradesRequest(markets=[MARKET]))
    )
    ticker_streams = await _stream_on_each_replica(
        stack,
        "StreamTickers",
        lambda: stub.StreamTickers(md.StreamTickersRequest(markets=[MARKET])),
    )
    try:
        seller = await exchange.trader({"BTC": "1"}, "md-seller")
        buyer = await exchange.trader({"USDT": "100"}, "md-buyer")
        await seller.place(side=SELL, price=PRICE, quantity=QUANTITY)
        bought = await buyer.place(
            side=BUY, price=PRICE, quantity=QUANTITY, time_in_force=t.TIME_IN_FORCE_IOC
        )
        assert (bought.state, bought.filled_quantity) == (t.ORDER_STATE_FILLED, QUANTITY)
        fills = await buyer.orders.ListFills(
            order_pb2.ListFillsRequest(order_id=bought.order_id), metadata=buyer.md, timeout=10
        )
        (fill,) = fills.fills
        assert (fill.price, fill.quantity) == (PRICE, QUANTITY)

        # Streams: the trade and the ticker after it, from every replica.
        for where, stream in trade_streams.items():
            trade = await _first(
                stream, lambda m: [x for x in m.trades if x.trade_id == fill.trade_id]
            )
            assert (trade.market, D(trade.price), D(trade.quantity), trade.taker_side) == (
                MARKET, D(PRICE), D(QUANTITY), BUY,
            ), where  # fmt: skip
        for where, stream in ticker_streams.items():
            ticker = await _first(
                stream,
                lambda m: [x for x in m.tickers if x.market == MARKET and x.seq >= trade.seq],
            )
            assert D(ticker.last_price) == D(PRICE), (where, ticker)
    finally:
        for stream in (*trade_streams.values(), *ticker_streams.values()):
            stream.cancel()

    # Every replica's queries. The tape is shared (whichever replica persists first).
    def has_trade(reply: md.ListTradesResponse) -> bool:
        return fill.trade_id in {x.trade_id for x in reply.trades}

    await _until_each_replica(
        stack,
        "marketdata",
        "ListTrades",
        lambda: stub.ListTrades(md.ListTradesRequest(market=MARKET, page_size=50), timeout=10),
        has_trade,
    )
    tickers = await _until_each_replica(
        stack,
        "marketdata",
        "GetTicker",
        lambda: stub.GetTicker(md.GetTickerRequest(market=MARKET), timeout=10),
        lambda r: r.ticker.seq >= trade.seq,
    )
    for where, reply in tickers.items():
        assert D(reply.ticker.last_price) == D(PRICE), (where, reply.ticker)
        assert int(reply.ticker.trade_count) >= 1
    listed = await _until_each_replica(
        stack,
        "marketdata",
        "ListTickers",
        lambda: stub.ListTickers(md.ListTickersRequest(), timeout=10),
        lambda r: any(x.market == MARKET and x.seq >= trade.seq for x in r.tickers),
    )
    for where, reply in listed.items():
        ours = next(x for x in reply.tickers if x.market == MARKET)
        assert D(ours.last_price) == D(PRICE), (where, ours)

    # The candle of the trade's minute holds each trade of that minute's tape once.
    start, end = _minute(trade.trade_time)
    async with asyncio.timeout(15):
        while True:
            tape = await _tape(stub, start, end)
            candles = await _on_each_replica(
                stack,
                "marketdata",
                "GetCandles",
                lambda: stub.GetCandles(
                    md.GetCandlesRequest(
                        market=MARKET,
                        interval=md.CANDLE_INTERVAL_ONE_MINUTE,
                        start_time=start,
                        end_time=end,
                    ),
                    timeout=10,
                ),
            )
            want = (len(tape), sum((D(x.quantity) for x in tape), D(0)))
            got = {w: [(c.trade_count, D(c.volume)) for c in r.candles] for w, r in candles.items()}
            if fill.trade_id in {x.trade_id for x in tape} and all(
                g == [want] for g in got.values()
            ):
                break
            await asyncio.sleep(0.2)

    markets = await _on_each_replica(
        stack,
        "marketdata",
        "ListMarkets",
        lambda: stub.ListMarkets(md.ListMarketsRequest(), timeout=10),
    )
    for reply in markets.values():
        assert MARKET in [m.symbol for m in reply.markets]
    market = await _on_each_replica(
        stack,
        "marketdata",
        "GetMarket",
        lambda: stub.GetMarket(md.GetMarketRequest(market=MARKET), timeout=10),
    )
    for reply in market.values():
        assert (reply.market.symbol, reply.market.tick_size) == (MARKET, "0.01")


@pytest.mark.replicas(only=True)
async def test_sessions_and_dead_mans_switches_on_both_order_replicas(target: Target) -> None:
    """A market maker on each order replica: its cancel-on-disconnect session is held
    by that replica, which cancels the session's quote when it ends and nothing else;
    then CancelAllAfter armed by both fires once each (whichever replica's poller takes
    the switch). A second session of each account hears every report once, in order."""
    stack = target.stack
    async with (
        grpc.aio.insecure_channel(stack.edge) as channel,
        exchange_on(stack, target.credentials, channel) as exchange,
    ):
        mms = [await exchange.trader({"USDT": "100"}, f"mm-{i}") for i in range(2)]
        assert sorted(exchange.homes.values()) == replica_names(stack, "order")
        watchers: list[Session] = []
        sessions: list[Session] = []
        quoted: dict[str, str] = {}
        kept: dict[str, str] = {}
        try:
            for mm in mms:
                watcher = Session(mm, mm.orders)
                watchers.append(watcher)
                await watcher.subscribe()
                session = Session(mm, mm.orders)
                sessions.append(session)
                subscribed = await session.subscribe(cancel_on_disconnect=True)
                owners = await session_owners(stack.database_url)
                assert owners[subscribed.session_id] == exchange.homes[mm.account_id]
                quoted[mm.account_id] = await session.quote(BUY, "95", "0.1")
                kept[mm.account_id] = (
                    await mm.place(side=BUY, price="96", quantity="0.1")
                ).order_id

            for session in sessions:  # both clients go away
                session.call.cancel()
            for mm in mms:
                gone = await mm.settled(quoted[mm.account_id], t.ORDER_STATE_CANCELLED)
                assert (gone.state, gone.cancel_reason) == (
                    t.ORDER_STATE_CANCELLED,
                    t.CANCEL_REASON_CANCEL_ON_DISCONNECT,
                )
                assert (await mm.get(kept[mm.account_id])).state == t.ORDER_STATE_OPEN

            for mm in mms:
                armed = await mm.orders.CancelAllAfter(
                    order_pb2.CancelAllAfterRequest(
                        request_id=uid("dm"), timeout_seconds=1, market=MARKET
                    ),
                    metadata=mm.md,
                    timeout=10,
                )
                assert armed.HasField("trigger_time")
            for mm in mms:
                fired = await mm.settled(kept[mm.account_id], t.ORDER_STATE_CANCELLED, within_s=15)
                assert (fired.state, fired.cancel_reason) == (
                    t.ORDER_STATE_CANCELLED,
                    t.CANCEL_REASON_CANCEL_ALL_AFTER,
                )

            for watcher, mm in zip(watchers, mms, strict=True):
                await watcher.wait_for("execution_report", 4)
                await asyncio.sleep(0.5)  # nothing more comes
                reports = watcher.reports()
                assert [r.sequence for r in reports] == [1, 2, 3, 4]
                quote, other = quoted[mm.account_id], kept[mm.account_id]
                assert sorted(
                    (r.order_id, r.execution_type, r.cancel_reason) for r in reports
                ) == sorted(
                    [
                        (quote, NEW, t.CANCEL_REASON_UNSPECIFIED),
                        (other, NEW, t.CANCEL_REASON_UNSPECIFIED),
                        (quote, CANCELLED, t.CANCEL_REASON_CANCEL_ON_DISCONNECT),
                        (other, CANCELLED, t.CANCEL_REASON_CANCEL_ALL_AFTER),
                    ]
                )
                assert await exchange.hold_settles(mm.account_id, {"USDT": ("100", "0")}) == {
                    "USDT": (D(100), D(0))
                }
        finally:
            for session in (*watchers, *sessions):
                await session.close()


@pytest.mark.replicas(only=True)
async def test_every_stateless_service_runs_twice_and_the_edge_uses_both(target: Target) -> None:
    """2 processes of each stateless service, the writer and its standby, 1 reflection
    server; the edge sends calls to both replicas of each stateless service: round
    robin, and for order by account (an account's calls all go to its replica); and
    to the writer only, never to its standby."""
    stack = target.stack
    running = {c.name for c in stack.components()}
    for spec in SERVICES:
        names = replica_names(stack, spec.name)
        assert len(names) == REPLICATED.get(spec.name, 1), spec.name
        assert set(names) <= running
    assert set(REPLICATED) == {s.name for s in SERVICES} - {"reflection"}

    async with (
        grpc.aio.insecure_channel(stack.edge) as channel,
        exchange_on(stack, target.credentials, channel) as exchange,
    ):
        first, second = [await exchange.trader(name=f"spread-{i}") for i in range(2)]
        risk = risk_pb2_grpc.RiskServiceStub(channel)
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        marketdata = marketdata_pb2_grpc.MarketDataServiceStub(channel)
        calls: dict[str, tuple[str, Callable[[], Awaitable[Any]]]] = {
            "auth": (
                "GetAccount",
                lambda: exchange.auth.GetAccount(
                    auth_pb2.GetAccountRequest(), metadata=first.md, timeout=10
                ),
            ),
            "risk": (
                "GetLimits",
                lambda: risk.GetLimits(
                    risk_pb2.GetLimitsRequest(account_id=first.account_id),
                    metadata=exchange.svc,
                    timeout=10,
                ),
            ),
            "ledger": (
                "GetBalances",
                lambda: exchange.ledger.GetBalances(
                    ledger_pb2.GetBalancesRequest(account_id=first.account_id),
                    metadata=exchange.svc,
                    timeout=10,
                ),
            ),
            "funding": (
                "ListDeposits",
                lambda: funding.ListDeposits(
                    funding_pb2.ListDepositsRequest(), metadata=first.md, timeout=10
                ),
            ),
            "marketdata": (
                "GetMarket",
                lambda: marketdata.GetMarket(md.GetMarketRequest(market=MARKET), timeout=10),
            ),
        }
        for service, (method, call) in calls.items():
            answered = await _on_each_replica(stack, service, method, call)
            assert sorted(answered) == replica_names(stack, service)
        for trader in (first, second):  # each account's calls, again and again, to its own
            before = await served(stack, "order", "ListOrders")
            for _ in range(4):
                await trader.orders.ListOrders(
                    order_pb2.ListOrdersRequest(), metadata=trader.md, timeout=10
                )
            after = await served(stack, "order", "ListOrders")
            home = exchange.homes[trader.account_id]
            assert {n: after[n] - before[n] for n in after} == {
                n: 4 if n == home else 0 for n in after
            }
        assert set(exchange.homes.values()) == set(replica_names(stack, "order"))
        # The writer serves MatchService; its standby is up but serves it NOT_SERVING.
        book = match_pb2.GetOrderBookRequest(market=MARKET)
        before = await served(stack, "match", "GetOrderBook")
        for _ in range(4):
            await match_pb2_grpc.MatchServiceStub(channel).GetOrderBook(
                book, metadata=exchange.svc, timeout=10
            )
        after = await served(stack, "match", "GetOrderBook")
        assert sorted(n for n in after if after[n] > before[n]) == [await writer_of(stack)]
