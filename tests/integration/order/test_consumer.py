"""The match-event consumer on a real PostgreSQL: the orders built from the place
commands their events carry, idempotent by seq, gaps filled from ReplayEvents, the
cursor durable in the same commit as the orders."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import postgres
from services.chassis.markets import DEFAULT_CATALOG
from services.order.consumer import EventConsumer
from services.order.domain import Execution, place_command, validate_place
from services.order.server import MIGRATIONS
from services.order.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)
D = Decimal


def _event(seq: int, command_id: str, **kind: object) -> match_pb2.MatchEvent:
    event = match_pb2.MatchEvent(market="BTC-USDT", seq=seq, command_id=command_id, **kind)  # type: ignore[arg-type]
    event.event_time.FromDatetime(NOW + timedelta(seconds=seq))
    return event


def _accepted(
    seq: int,
    order_id: str,
    account: str = "acc",
    client_order_id: str = "c1",
    *,
    market: str = "BTC-USDT",
    side: int = t.SIDE_BUY,
    quantity: str = "0.3",
    session_id: str = "",
) -> match_pb2.MatchEvent:
    """The event of an accepted place, carrying the place command as order sends it."""
    price = "2000" if market == "ETH-USDT" else "100"
    request = order_pb2.PlaceOrderRequest(
        client_order_id=client_order_id, market=market, side=side,  # type: ignore[arg-type]
        type=t.ORDER_TYPE_LIMIT, price=price, quantity=quantity,
    )  # fmt: skip
    command = place_command(
        validate_place(request, DEFAULT_CATALOG, NOW), order_id=order_id, account_id=account,
        protection=None, session_id=session_id, fees=("0.001", "0.002"),
    )  # fmt: skip
    p = command.place
    accepted = match_pb2.OrderAccepted(
        order_id=order_id, client_order_id=client_order_id, account_id=account, side=p.side,
        type=p.type, time_in_force=p.time_in_force, price=p.price, quantity=p.quantity, place=p,
    )  # fmt: skip
    event = _event(seq, command.command_id, accepted=accepted)
    event.market = market
    return event


def _trade(seq: int, maker_left: str) -> match_pb2.MatchEvent:
    return _event(
        seq,
        f"place:t{seq}",
        trade=match_pb2.Trade(
            trade_id=str(seq),
            price="100",
            quantity="0.1",
            quote_quantity="10",
            taker_side=t.SIDE_SELL,
            maker_order_id="o1",
            maker_remaining_quantity=maker_left,
            maker_fee="0.0001",
            maker_fee_asset="BTC",
            taker_order_id=f"t{seq}",  # not an order of this service: skipped
            taker_remaining_quantity="0",
        ),
    )


JOURNAL = [
    _accepted(1, "o1", side=t.SIDE_SELL),
    # placed before events carried their place command: no record is made of it
    _event(2, "place:x", accepted=match_pb2.OrderAccepted(order_id="x", quantity="1")),
    _trade(3, "0.2"),
    _trade(4, "0.1"),
    _trade(5, "0"),
]


async def test_gaps_are_replayed_and_redeliveries_skipped(fresh_database_url: str) -> None:
    replays: list[tuple[int, int]] = []

    async def replay(market: str, first: int, last: int) -> Sequence[match_pb2.MatchEvent]:
        replays.append((first, last))
        return [e for e in JOURNAL if first <= e.seq <= last]

    delivered: list[Execution] = []
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)

        def consumer() -> EventConsumer:
            return EventConsumer(
                store=store,
                catalog=DEFAULT_CATALOG,
                js=None,  # type: ignore[arg-type]  # handle() is driven directly here
                replay=replay,
                sink=delivered.extend,
                durable="test",
            )

        first = consumer()
        await first.handle([JOURNAL[0]])
        await first.handle([JOURNAL[3], JOURNAL[0]])  # 2 and 3 lost, 1 delivered again
        assert replays == [(2, 4)]
        assert await store.get("x") is None
        stored = await store.get("o1")
        assert stored is not None
        assert (stored.state, stored.filled_quantity, stored.remaining_quantity) == (
            t.ORDER_STATE_PARTIALLY_FILLED,
            D("0.2"),
            D("0.1"),
        )
        assert await store.cursor("BTC-USDT") == 4

        # A new process (after a crash) continues from the durable cursor.
        second = consumer()
        await second.handle(JOURNAL[2:])  # 3 and 4 again, then 5
        stored = await store.get("o1")
        assert stored is not None and stored.state == t.ORDER_STATE_FILLED
        assert stored.filled_quantity == D("0.3") and stored.cumulative_fee == D("0.0003")
        fills = await store.fills("acc")
        assert [f.trade_id for f in fills] == ["5", "4", "3"]
        assert [e.execution_type for e in delivered] == [1, 2, 2, 2]
        assert await second.wait("BTC-USDT", 5, 0.1)


def _consumer(store: Store) -> EventConsumer:
    async def no_gaps(market: str, first: int, last: int) -> Sequence[match_pb2.MatchEvent]:
        raise AssertionError(f"a gap in {market}: {first}..{last}")

    return EventConsumer(
        store=store, catalog=DEFAULT_CATALOG, js=None,  # type: ignore[arg-type]
        replay=no_gaps, sink=lambda _: None, durable="test",
    )  # fmt: skip


async def test_an_order_is_built_from_the_place_its_event_carries(
    fresh_database_url: str,
) -> None:
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)
        await _consumer(store).handle(
            [
                _accepted(1, "o1", client_order_id="c1", session_id="s1"),
                _accepted(2, "o2", client_order_id="c2", side=t.SIDE_SELL),
            ]
        )
        buy, sell = await store.get("o1"), await store.get("o2")
        assert buy is not None and sell is not None
        assert (buy.state, buy.price, buy.quantity, buy.remaining_quantity) == (
            t.ORDER_STATE_OPEN, D("100"), D("0.3"), D("0.3"),
        )  # fmt: skip
        assert (buy.hold_asset, buy.hold_amount, buy.session_id) == ("USDT", 3_000_000_000, "s1")
        assert (sell.hold_asset, sell.hold_amount) == ("BTC", 30_000_000)
        assert buy.create_time == NOW + timedelta(seconds=1) and buy.fingerprint
        assert buy.fingerprint != sell.fingerprint
        assert sorted(o.order_id for o in await store.working("acc", "BTC-USDT")) == ["o1", "o2"]


async def test_batched_reads_answer_each_item_in_order(
    fresh_database_url: str,
) -> None:
    async with postgres(
        fresh_database_url, schema="order", migrations=MIGRATIONS, session_reset=False
    ) as pool:
        store = Store(pool)
        await _consumer(store).handle(
            [
                _accepted(1, "o1", "a", "c1", quantity="0.1"),
                _accepted(1, "o2", "a", "c2", market="ETH-USDT", quantity="0.1"),
                _accepted(2, "o3", "a", "c3", quantity="0.1"),
                _accepted(3, "o4", "b", "c1", quantity="0.1"),
            ]
        )
        found = await store.get_many(["o3", "missing", "o1", "o3"])
        assert [o and o.order_id for o in found] == ["o3", None, "o1", "o3"]
        by_client = await store.by_client_id_many([("b", "c1"), ("b", "c2"), ("a", "c1")])
        assert [o and o.order_id for o in by_client] == ["o4", None, "o1"]
        # The request log: first write wins, a batch answers per key.
        await store.remember_many(
            [("a", "r1", "cancel", "f1", b"one"), ("a", "r1", "cancel", "f2", b"two"),
             ("b", "r1", "amend", "f3", b"three")]
        )  # fmt: skip
        assert await store.request_many([("a", "r1"), ("a", "r2"), ("b", "r1")]) == [
            ("cancel", "f1", b"one"),
            None,
            ("amend", "f3", b"three"),
        ]
