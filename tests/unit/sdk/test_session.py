"""MarketMakerSession's handling of what the server sends: gap detection by
sequence, reconciliation, a view of the orders that never moves backwards, and
commands answered by request id. The server messages are fed in directly; the
order service behind reconciliation is a small fake of `client.orders`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_sdk import (
    Client,
    FailedPreconditionError,
    GapDetected,
    MarketMakerSession,
    NotFoundError,
    Reconciled,
    SessionEvent,
)
from services.chassis import ExchangeError

Resp = order_pb2.StreamOrdersResponse


class FakeOrders:
    """What the order service has: the orders by id."""

    def __init__(self) -> None:
        self.orders: dict[str, order_pb2.Order] = {}
        self.listed = 0

    async def iter_orders(self, **_: Any) -> AsyncIterator[order_pb2.Order]:
        self.listed += 1
        for order in self.orders.values():
            if order.state in (t.ORDER_STATE_OPEN, t.ORDER_STATE_PARTIALLY_FILLED):
                yield order

    async def get(self, order_id: str) -> order_pb2.Order:
        if order_id not in self.orders:
            raise NotFoundError(grpc.StatusCode.NOT_FOUND, "no such order")
        return self.orders[order_id]


class FakeClient:
    def __init__(self) -> None:
        self.orders = FakeOrders()


def _order(order_id: str, state: int, filled: str, version: int) -> order_pb2.Order:
    return order_pb2.Order(
        order_id=order_id,
        client_order_id=f"c-{order_id}",
        market="BTC-USDT",
        side=t.SIDE_SELL,
        price="100",
        quantity="1",
        filled_quantity=filled,
        remaining_quantity=str(1 - float(filled)),
        state=state,  # type: ignore[arg-type]
        version=version,
    )


def _report(sequence: int, order_id: str, filled: str, state: int) -> Resp:
    return Resp(
        execution_report=order_pb2.ExecutionReport(
            sequence=sequence,
            execution_id=f"x-{order_id}-{sequence}",
            execution_type=order_pb2.EXECUTION_TYPE_TRADE,
            order_id=order_id,
            client_order_id=f"c-{order_id}",
            market="BTC-USDT",
            side=t.SIDE_SELL,
            order_state=state,  # type: ignore[arg-type]
            price="100",
            quantity="1",
            cumulative_quantity=filled,
            remaining_quantity=str(1 - float(filled)),
        )
    )


def _drain(session: MarketMakerSession) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    queue = session._events
    while not queue.empty():
        event = queue.get_nowait()
        assert event is not None
        events.append(event)
    return events


@pytest.fixture
def setup() -> tuple[MarketMakerSession, FakeOrders]:
    client = FakeClient()
    return MarketMakerSession(cast(Client, client), markets=["BTC-USDT"]), client.orders


async def test_a_sequence_gap_triggers_reconciliation(
    setup: tuple[MarketMakerSession, FakeOrders],
) -> None:
    session, server = setup
    server.orders["a"] = _order("a", t.ORDER_STATE_PARTIALLY_FILLED, "0.3", 3)
    server.orders["b"] = _order("b", t.ORDER_STATE_FILLED, "1", 4)
    session.orders["b"] = _order("b", t.ORDER_STATE_OPEN, "0", 1)  # known working

    await session._dispatch(_report(1, "a", "0.1", t.ORDER_STATE_PARTIALLY_FILLED))
    assert _drain(session)[0].sequence == 1  # type: ignore[union-attr]
    assert server.listed == 0
    # Report 2 (a's second fill, and b's fill) is lost; 3 arrives.
    await session._dispatch(_report(3, "a", "0.3", t.ORDER_STATE_PARTIALLY_FILLED))
    events = _drain(session)
    assert events[0] == GapDetected(expected=2, received=3)
    assert isinstance(events[1], order_pb2.ExecutionReport) and events[1].sequence == 3
    reconciled = [e for e in events if isinstance(e, Reconciled)]
    assert [(e.order.order_id, e.filled_since, e.cause) for e in reconciled] == [("b", 1, "gap")]
    assert session.orders["b"].state == t.ORDER_STATE_FILLED
    assert session.gaps == 1 and session.reconciliations == 1 and server.listed == 1


async def test_repeated_and_stale_reports_do_not_move_the_view_backwards(
    setup: tuple[MarketMakerSession, FakeOrders],
) -> None:
    session, _ = setup
    await session._dispatch(_report(1, "a", "0.5", t.ORDER_STATE_PARTIALLY_FILLED))
    await session._dispatch(_report(1, "a", "0.5", t.ORDER_STATE_PARTIALLY_FILLED))  # repeat
    assert len(_drain(session)) == 1
    # Reconciliation saw the order filled; a late report of an earlier fill
    # is passed on but does not undo it.
    assert session._merge(_order("a", t.ORDER_STATE_FILLED, "1", 5))
    await session._dispatch(_report(2, "a", "0.7", t.ORDER_STATE_PARTIALLY_FILLED))
    assert [e.sequence for e in _drain(session)] == [2]  # type: ignore[union-attr]
    assert (session.orders["a"].state, session.orders["a"].filled_quantity) == (
        t.ORDER_STATE_FILLED,
        "1",
    )
    assert not session._merge(_order("a", t.ORDER_STATE_OPEN, "0.5", 4))  # an older version
    assert session.orders["a"].state == t.ORDER_STATE_FILLED


async def test_commands_are_answered_by_request_id(
    setup: tuple[MarketMakerSession, FakeOrders],
) -> None:
    session, _ = setup
    session._task = asyncio.create_task(asyncio.sleep(0))  # as if running, not connected
    placing = asyncio.create_task(session.place("BTC-USDT", t.SIDE_BUY, "1", price="99"))
    cancelling = asyncio.create_task(session.cancel("z", request_id="r-1"))
    await asyncio.sleep(0)
    assert len(session._pending) == 2  # waiting for a connection, sent when it opens
    place_id = next(k for k in session._pending if k != "r-1")
    refusal = ExchangeError(
        "ORDER_ALREADY_CLOSED", "filled", code=grpc.StatusCode.FAILED_PRECONDITION
    ).to_status("order")
    await session._dispatch(Resp(reject=order_pb2.StreamReject(request_id="r-1", status=refusal)))
    order = _order("p", t.ORDER_STATE_OPEN, "0", 1)
    await session._dispatch(
        Resp(
            ack=order_pb2.StreamAck(
                request_id=place_id, place=order_pb2.PlaceOrderResponse(order=order)
            )
        )
    )
    assert (await placing).order_id == "p"
    with pytest.raises(FailedPreconditionError) as refused:
        await cancelling
    assert refused.value.reason == "ORDER_ALREADY_CLOSED"
    assert session.orders["p"] == order and not session._pending
