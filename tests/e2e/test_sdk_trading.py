"""The Python SDK's trading helpers against the real stack, through Envoy.

- `client.orders`: place (idempotent by client_order_id), amend, get, list,
  cancel, cancel-all, the dead man's switch; the order budget each place and
  amend reports (`client.last_rate_limit`), the account's own limit.
- `MarketMakerSession`: a kill -9 of the order service while a place is in
  flight and a fill happens while the session is away; the session comes back
  with the place done once and the fill reported by reconciliation; the dead
  man's switch renewed on a timer; cancel-on-disconnect at close.
- `LocalOrderBook`: equal to market data's and the engine's book after random
  orders, and back in sync after a dropped delta (gap) and a corrupted one
  (checksum).

BTC-USDT stays within 95..105 and ETH-USDT within 1900..2100 (the trading
tests' convention, inside risk's bands); every test cancels what it leaves.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.order.v1 import order_pb2
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_sdk import (
    AlreadyExistsError,
    Client,
    Connected,
    LocalOrderBook,
    MarketMakerSession,
    RateLimit,
    Reconciled,
    RetryPolicy,
    SessionEvent,
)
from cex_stack.supervisor import Stack
from services.chassis import ServiceCredentials
from tests.e2e.order.test_crash import kill
from tests.e2e.test_sdk import Integrator, integrator_with

D = Decimal
BUY, SELL = t.SIDE_BUY, t.SIDE_SELL
BTC, ETH = "BTC-USDT", "ETH-USDT"


Accounts = Callable[[dict[str, str]], Awaitable[Integrator]]


@pytest.fixture
async def accounts(
    stack: Stack, service_credentials: ServiceCredentials
) -> AsyncIterator[Accounts]:
    """Makes funded accounts with a read+trade key; cancels their orders afterwards."""
    made: list[Integrator] = []

    async def make(funds: dict[str, str]) -> Integrator:
        made.append(await integrator_with(stack, service_credentials, funds))
        return made[-1]

    yield make
    for key in made:
        async with _client(stack, key) as client:
            await client.orders.cancel_all()


def _client(stack: Stack, key: Integrator) -> Client:
    return Client.from_api_key(stack.edge, key.key_id, key.secret, timeout_s=30)


async def test_place_and_amend_report_the_account_s_order_budget(
    stack: Stack, service_credentials: ServiceCredentials, accounts: Accounts
) -> None:
    """The order service sends risk's per-account budget on PlaceOrder (and
    AmendOrder) as x-cex-order-limit-1s / x-cex-order-count-1s; through Envoy
    the SDK records it. The account gets a limit of its own (37/s), so the
    number cannot come from anywhere else."""
    key = await accounts({"USDT": "1000"})
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        await risk_pb2_grpc.RiskServiceStub(channel).SetLimits(
            risk_pb2.SetLimitsRequest(
                request_id=uuid.uuid4().hex,
                limits=risk_pb2.Limits(account_id=key.account_id, max_orders_per_second=37),
            ),
            metadata=(("authorization", f"Bearer {await service_credentials.token()}"),),
            timeout=10,
        )
    place = "/cex.order.v1.OrderService/PlaceOrder"
    async with _client(stack, key) as client:
        assert client.last_rate_limit is None
        await client.ledger.get_balances()
        assert client.last_rate_limit is None  # reads carry no budget
        for _ in range(40):  # risk reloads limits every 0.5 s: until it uses the new one
            order = await client.orders.place(BTC, BUY, "0.1", price="95.5")
            usage = client.last_rate_limit
            assert usage is not None and usage.method == place
            if usage.limit == 37:
                break
            await asyncio.sleep(0.25)
        assert usage.limit == 37 and 1 <= usage.used <= 37
        assert usage.remaining == 37 - usage.used
        before = usage
        await client.orders.get(order.order_id)
        assert client.last_rate_limit is before  # a read leaves it
        burst: list[order_pb2.Order] = []
        for _ in range(5):  # each place replaces it (a bucket refilled continuously:
            burst.append(await client.orders.place(BTC, BUY, "0.1", price="95.5"))
            now = client.last_rate_limit  # `used` is what the refill has not covered)
            assert isinstance(now, RateLimit) and now is not before
            assert now.limit == 37 and 1 <= now.used <= 37
            before = now
        await client.orders.amend(burst[0].order_id, quantity="0.06")
        assert client.last_rate_limit.method == "/cex.order.v1.OrderService/AmendOrder"
        assert client.last_rate_limit.limit == 37


async def test_orders_api_places_once_per_client_order_id_and_manages_the_order(
    stack: Stack, accounts: Accounts
) -> None:
    key = await accounts({"USDT": "1000"})
    async with _client(stack, key) as client:
        first = await client.orders.place(BTC, BUY, D("0.2"), price="95.5", client_order_id="o-1")
        again = await client.orders.place(BTC, BUY, "0.2", price=D("95.5"), client_order_id="o-1")
        assert again.order_id == first.order_id  # the same key answers the first result
        with pytest.raises(AlreadyExistsError) as refused:  # same key, another body
            await client.orders.place(BTC, BUY, "0.3", price="95.5", client_order_id="o-1")
        assert refused.value.reason == "ORDER_DUPLICATE_CLIENT_ORDER_ID"
        amended = await client.orders.amend(client_order_id="o-1", quantity="0.1")
        assert (amended.quantity, amended.state) == ("0.1", t.ORDER_STATE_OPEN)
        got = await client.orders.get(client_order_id="o-1")
        assert got.order_id == first.order_id and D(got.quantity) == D("0.1")
        batch = await client.orders.batch_place(
            [
                order_pb2.PlaceOrderRequest(
                    market=BTC, side=BUY, type=t.ORDER_TYPE_LIMIT, price="95.6", quantity="0.1"
                ),
                order_pb2.PlaceOrderRequest(
                    market=BTC, side=BUY, type=t.ORDER_TYPE_LIMIT, price="95.601", quantity="0.1"
                ),
            ]
        )
        assert [r.status.code for r in batch] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        assert all(r.client_order_id for r in batch)  # generated keys
        working = [
            o async for o in client.orders.iter_orders(status=order_pb2.ORDER_STATUS_FILTER_OPEN)
        ]
        assert {o.order_id for o in working} == {first.order_id, batch[0].order.order_id}
        trigger = await client.orders.cancel_all_after(60, market=BTC)
        assert trigger is not None
        assert await client.orders.cancel_all_after(0, market=BTC) is None
        cancelled = await client.orders.cancel(first.order_id)
        assert cancelled.state == t.ORDER_STATE_CANCELLED
        rest = await client.orders.cancel_all(BTC)
        assert [o.order_id for o in rest] == [batch[0].order.order_id]
        assert (await client.market_data.get_market(BTC)).tick_size == "0.01"


async def _collect(session: MarketMakerSession, into: list[SessionEvent]) -> None:
    async for event in session.events():
        into.append(event)


async def _until(check: Callable[[], bool], within_s: float = 20.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within_s} s")


def _reports(events: list[SessionEvent]) -> list[order_pb2.ExecutionReport]:
    return [e for e in events if isinstance(e, order_pb2.ExecutionReport)]


async def test_the_session_survives_an_order_service_restart_with_nothing_doubled_or_missed(
    stack: Stack, accounts: Accounts
) -> None:
    mm_key = await accounts({"BTC": "1", "USDT": "1000"})
    taker_key = await accounts({"USDT": "1000"})
    gate = asyncio.Event()
    gate.set()
    events: list[SessionEvent] = []
    async with (
        _client(stack, mm_key) as mm,
        _client(stack, taker_key) as taker,
        MarketMakerSession(
            mm,
            markets=[BTC],
            heartbeat_interval_s=1,
            command_timeout_s=90,
            reconnect=RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5),
            before_reconnect=gate.wait,
        ) as session,
    ):
        collector = asyncio.create_task(_collect(session, events))
        ask = await session.place(BTC, SELL, "0.3", price="103.5")
        bid = await session.place(BTC, BUY, "0.2", price="96.5")
        assert {ask.state, bid.state} == {t.ORDER_STATE_OPEN}
        # The acks carried the account's order budget (the stack's default: 100/s).
        budget = session.last_rate_limit
        assert budget is not None and budget.limit == 100 and 1 <= budget.used <= 100
        await taker.orders.place(BTC, BUY, "0.05", price="103.5")
        await _until(lambda: session.orders[ask.order_id].filled_quantity == "0.05")
        first_session = session.session_id

        # A place in flight when the order service dies: it is resent with its
        # client_order_id on the next connection, and placed once.
        gate.clear()  # hold the session back until the fill below has happened
        in_flight = asyncio.create_task(
            session.place(BTC, BUY, "0.1", price="96.4", client_order_id=f"mm-{uuid.uuid4().hex}")
        )
        await asyncio.sleep(0.01)
        await kill(stack, "order")
        # While the session is away, the ask trades.
        fill = await taker.orders.place(BTC, BUY, "0.1", price="103.5")
        assert fill.state == t.ORDER_STATE_FILLED
        assert not session.connected
        # Wait until the order service has recorded that fill (its consumer may lag
        # after the restart), so that only reconciliation can tell the session.
        for _ in range(400):
            if (await mm.orders.get(ask.order_id)).filled_quantity == "0.15":
                break
            await asyncio.sleep(0.05)
        reports_before = len(_reports(events))
        gate.set()

        placed = await in_flight
        await session.wait_connected()
        assert session.session_id != first_session and session.reconnects == 1
        reconciled = [e for e in events if isinstance(e, Reconciled)]
        ask_news = [e for e in reconciled if e.order.order_id == ask.order_id]
        assert len(ask_news) == 1, events
        assert ask_news[0].filled_since == D("0.1")
        assert ask_news[0].cause == "reconnect"
        assert session.orders[ask.order_id].filled_quantity == "0.15"
        assert [e.reconnect for e in events if isinstance(e, Connected)] == [False, True]
        # The fill made while away was not reported live (the session was gone).
        assert all(r.last_quantity != "0.1" for r in _reports(events)[:reports_before])

        same = await mm.orders.get(client_order_id=placed.client_order_id)
        assert same.order_id == placed.order_id
        bids = [
            o
            async for o in mm.orders.iter_orders(
                status=order_pb2.ORDER_STATUS_FILTER_OPEN, market=BTC, side=BUY
            )
        ]
        assert sorted(o.client_order_id for o in bids) == sorted(
            [bid.client_order_id, placed.client_order_id]
        )

        # The new session reports live again, numbered from 1.
        await taker.orders.place(BTC, BUY, "0.05", price="103.5")
        await _until(lambda: session.orders[ask.order_id].filled_quantity == "0.2")
        new_reports = [r for r in _reports(events) if r.trade_id and r.last_quantity == "0.05"]
        assert len(new_reports) == 2 and new_reports[-1].sequence >= 1
        assert session.gaps == 0
        collector.cancel()


async def test_the_session_renews_its_dead_man_switch_and_cancels_on_disconnect(
    stack: Stack, accounts: Accounts
) -> None:
    key = await accounts({"USDT": "1000"})
    async with _client(stack, key) as client:
        session = MarketMakerSession(
            client, cancel_on_disconnect=True, dead_man_switch_s=2, heartbeat_interval_s=1
        )
        await session.start()
        bid = await session.place(BTC, BUY, "0.1", price="95.25")
        await asyncio.sleep(3.5)  # past the switch's 2 s: renewed, so nothing cancelled
        assert (await client.orders.get(bid.order_id)).state == t.ORDER_STATE_OPEN
        await session.close()  # disarms the switch, ends the stream

        for _ in range(200):
            order = await client.orders.get(bid.order_id)
            if order.state == t.ORDER_STATE_CANCELLED:
                break
            await asyncio.sleep(0.05)
        assert order.cancel_reason == t.CANCEL_REASON_CANCEL_ON_DISCONNECT


class _Faulty(LocalOrderBook):
    """Drops the 2nd delta that moves the book (a gap), then corrupts a quantity
    in the 6th (a checksum mismatch)."""

    moves = 0

    def _receive(self, message: md.StreamOrderBookResponse) -> md.StreamOrderBookResponse | None:
        delta = message.delta
        if not message.HasField("delta") or not (delta.bids or delta.asks):
            return message
        self.moves += 1
        if self.moves == 2:
            return None
        if self.moves == 6:
            copy = md.StreamOrderBookResponse()
            copy.CopyFrom(message)
            level = (copy.delta.bids or copy.delta.asks)[0]
            level.quantity = str(D(level.quantity) + D("0.0001"))
            return copy
        return message


def _levels(levels: object) -> list[tuple[Decimal, Decimal]]:
    return [(D(level.price), D(level.quantity)) for level in levels]  # type: ignore[attr-defined]


async def test_the_local_book_equals_the_exchange_s_and_resyncs_after_a_gap_and_a_bad_checksum(
    stack: Stack, accounts: Accounts, service_credentials: ServiceCredentials
) -> None:
    key = await accounts({"ETH": "20", "USDT": "100000"})
    rng = random.Random(10)
    async with (
        _client(stack, key) as client,
        LocalOrderBook(client, ETH, depth=50) as book,
        _Faulty(client, ETH, depth=50) as faulty,
    ):
        await book.synced()
        await faulty.synced()
        for _ in range(24):
            side = rng.choice((BUY, SELL))
            # Resting around 2000, sometimes crossing (the account trades with itself
            # under self-trade prevention, which the book shows as well).
            price = D(rng.randrange(196_000, 204_000)) / 100
            quantity = D(rng.randrange(3, 30)) / 1000
            await client.orders.place(ETH, side, quantity, price=price)
        exchange = await client.market_data.get_order_book(ETH, depth=50)
        for _ in range(100):
            await book.synced(min_seq=exchange.seq)
            await faulty.synced(min_seq=exchange.seq)
            if book.seq == faulty.seq == exchange.seq:
                break
            exchange = await client.market_data.get_order_book(ETH, depth=50)
        assert book.seq == exchange.seq
        mine = ([(D(lv.price), D(lv.quantity)) for lv in book.bids()], _levels(book.asks()))
        assert mine == (_levels(exchange.bids), _levels(exchange.asks))
        assert book.checksum() == exchange.checksum
        assert book.resyncs == []
        # The engine's own L2 book (match, a service call) at the same seq.
        token = await service_credentials.token()
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            engine = (
                await match_pb2_grpc.MatchServiceStub(channel).GetOrderBook(
                    match_pb2.GetOrderBookRequest(market=ETH, level=match_pb2.BOOK_LEVEL_L2),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
            ).book
        assert engine.seq == book.seq
        assert (_levels(engine.bids)[:50], _levels(engine.asks)[:50]) == mine
        # The faulty copy saw a gap and a bad checksum, rebuilt itself both times,
        # and holds the same book.
        assert [r.reason for r in faulty.resyncs] == ["gap", "checksum"]
        assert (faulty.bids(), faulty.asks()) == (book.bids(), book.asks())
