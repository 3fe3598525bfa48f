"""The match-event consumer on a real PostgreSQL: idempotent by seq, gaps filled
from ReplayEvents, the cursor durable in the same commit as the orders."""

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
from services.order.domain import Execution, hold_for, new_record, validate_place
from services.order.server import MIGRATIONS
from services.order.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)
D = Decimal


def _event(seq: int, command_id: str, **kind: object) -> match_pb2.MatchEvent:
    event = match_pb2.MatchEvent(market="BTC-USDT", seq=seq, command_id=command_id, **kind)  # type: ignore[arg-type]
    event.event_time.FromDatetime(NOW + timedelta(seconds=seq))
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
    _event(1, "place:o1", accepted=match_pb2.OrderAccepted(order_id="o1", quantity="0.3")),
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
        request = order_pb2.PlaceOrderRequest(
            client_order_id="c1",
            market="BTC-USDT",
            side=t.SIDE_BUY,
            type=t.ORDER_TYPE_LIMIT,
            price="100",
            quantity="0.3",
        )
        order = validate_place(request, DEFAULT_CATALOG, NOW)
        record = new_record(
            order, order_id="o1", account_id="acc", now=NOW, protection=None,
            hold=hold_for(order, None),
        )  # fmt: skip
        assert await store.insert(record)

        def consumer() -> EventConsumer:
            return EventConsumer(
                store=store,
                js=None,  # type: ignore[arg-type]  # handle() is driven directly here
                replay=replay,
                sink=delivered.extend,
                durable="test",
            )

        first = consumer()
        await first.handle([JOURNAL[0]])
        await first.handle([JOURNAL[3], JOURNAL[0]])  # 2 and 3 lost, 1 delivered again
        assert replays == [(2, 4)]
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


async def test_orders_are_recorded_in_batches_and_a_reused_client_id_is_not(
    fresh_database_url: str,
) -> None:
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)

        def record(order_id: str, client_order_id: str) -> object:
            request = order_pb2.PlaceOrderRequest(
                client_order_id=client_order_id, market="BTC-USDT", side=t.SIDE_SELL,
                type=t.ORDER_TYPE_LIMIT, price="100", quantity="0.3",
            )  # fmt: skip
            order = validate_place(request, DEFAULT_CATALOG, NOW)
            return new_record(
                order, order_id=order_id, account_id="acc", now=NOW, protection=None,
                hold=hold_for(order, None),
            )  # fmt: skip

        assert await store.insert(record("o1", "c1"))  # type: ignore[arg-type]
        batch = [record("o2", "c2"), record("o3", "c1"), record("o4", "c4"), record("o5", "c4")]
        assert await store.insert_many(batch) == [True, False, True, False]  # type: ignore[arg-type]
        stored = await store.get("o4")
        assert (
            stored is not None and stored.quantity == D("0.3") and stored.hold_amount == 30_000_000
        )
        assert (await store.lookup("acc", "c2", "BTC-USDT"))[1:] == (3, 3)


async def test_batched_reads_answer_each_item_as_the_single_read_would(
    fresh_database_url: str,
) -> None:
    async with postgres(
        fresh_database_url, schema="order", migrations=MIGRATIONS, session_reset=False
    ) as pool:
        store = Store(pool)

        def record(order_id: str, account: str, client_order_id: str, market: str) -> object:
            price = "2000" if market == "ETH-USDT" else "100"
            request = order_pb2.PlaceOrderRequest(
                client_order_id=client_order_id, market=market, side=t.SIDE_BUY,
                type=t.ORDER_TYPE_LIMIT, price=price, quantity="0.1",
            )  # fmt: skip
            order = validate_place(request, DEFAULT_CATALOG, NOW)
            return new_record(
                order, order_id=order_id, account_id=account, now=NOW, protection=None,
                hold=hold_for(order, None),
            )  # fmt: skip

        rows = [
            record("o1", "a", "c1", "BTC-USDT"),
            record("o2", "a", "c2", "ETH-USDT"),
            record("o3", "a", "c3", "BTC-USDT"),
            record("o4", "b", "c1", "BTC-USDT"),
        ]
        assert await store.insert_many(rows) == [True] * 4  # type: ignore[arg-type]
        await store.set_phase(["o1", "o4", "nope"], "placed")
        assert [(await store.get(o)).phase for o in ("o1", "o2", "o4")] == [  # type: ignore[union-attr]
            "placed",
            "recorded",
            "placed",
        ]
        keys = [
            ("a", "c1", "BTC-USDT"),
            ("a", "new", "ETH-USDT"),
            ("b", "c1", "ETH-USDT"),
            ("c", "c9", "BTC-USDT"),
            ("a", "c1", "BTC-USDT"),  # the same key twice in one batch
        ]
        batched = await store.lookup_many(keys)
        singles = [await store.lookup(*key) for key in keys]
        assert [(o and o.order_id, n, m) for o, n, m in batched] == [
            (o and o.order_id, n, m) for o, n, m in singles
        ]
        assert [(o and o.order_id, n, m) for o, n, m in batched] == [
            ("o1", 3, 2),
            (None, 3, 1),
            ("o4", 1, 0),
            (None, 0, 0),
            ("o1", 3, 2),
        ]
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
