"""StreamOrders through Envoy: acks, sequenced execution reports, heartbeats,
cancel-on-disconnect; and, on an order process of the test's own with a tiny
queue, a reader that cannot keep up is told and disconnected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from services.chassis import ChassisSettings, ErrorDetails
from services.order.config import OrderConfig
from services.order.server import build_server
from tests.e2e.order.support import BUY, SELL, Exchange, Trader, uid

D = Decimal
R = order_pb2.StreamOrdersRequest


def place(**fields: object) -> R:
    fields.setdefault("client_order_id", uid())
    fields.setdefault("market", "BTC-USDT")
    fields.setdefault("type", t.ORDER_TYPE_LIMIT)
    return R(place=order_pb2.PlaceOrderRequest(**fields))  # type: ignore[arg-type]


class Client:
    """One session: what it sent and received."""

    def __init__(self, trader: Trader, stub: order_pb2_grpc.OrderServiceStub | None = None) -> None:
        self.outbox: asyncio.Queue[R | None] = asyncio.Queue()
        self.call = (stub or trader.orders).StreamOrders(self._requests(), metadata=trader.md)
        self.received: list[order_pb2.StreamOrdersResponse] = []

    async def _requests(self) -> AsyncIterator[R]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def send(self, message: R) -> None:
        await self.outbox.put(message)

    async def next(self, kind: str, within_s: float = 15.0) -> order_pb2.StreamOrdersResponse:
        async with asyncio.timeout(within_s):
            while True:
                message = await self.call.read()
                assert message is not grpc.aio.EOF, "stream ended"
                self.received.append(message)
                if message.WhichOneof("payload") == kind:
                    return message

    def reports(self) -> list[order_pb2.ExecutionReport]:
        return [m.execution_report for m in self.received if m.HasField("execution_report")]


@pytest.mark.replicas
async def test_acks_sequenced_execution_reports_and_heartbeats(exchange: Exchange) -> None:
    mm = await exchange.trader({"BTC": "1"}, "mm")
    taker = await exchange.trader({"USDT": "100"}, "taker")
    session = Client(mm)
    beat = duration_pb2.Duration(seconds=1)
    await session.send(R(subscribe=order_pb2.StreamSubscribe(heartbeat_interval=beat)))
    subscribed = (await session.next("subscribed")).subscribed
    assert subscribed.session_id and subscribed.last_sequence == 0

    ask = place(side=SELL, price="104", quantity="0.2")
    await session.send(ask)
    ack = (await session.next("ack")).ack
    assert ack.request_id == ask.place.client_order_id
    assert ack.place.order.state == t.ORDER_STATE_OPEN
    bad = place(side=SELL, price="104.001", quantity="0.2")
    await session.send(bad)
    reject = (await session.next("reject")).reject
    assert reject.request_id == bad.place.client_order_id
    assert ErrorDetails.from_status(reject.status).reason == "ORDER_PRICE_OFF_TICK"

    await taker.place(side=BUY, price="104", quantity="0.05")
    await taker.place(side=BUY, price="104", quantity="0.15")
    while len([r for r in session.reports() if r.execution_type == 2]) < 2:
        await session.next("execution_report")
    reports = session.reports()
    assert [r.sequence for r in reports] == list(range(1, len(reports) + 1))
    new, first, last = reports
    assert (new.execution_type, new.order_state) == (1, t.ORDER_STATE_OPEN)
    assert (first.last_quantity, first.cumulative_quantity, first.remaining_quantity) == (
        "0.05",
        "0.05",
        "0.15",
    )
    assert (first.liquidity, first.fee, first.fee_asset) == (t.LIQUIDITY_MAKER, "0.0052", "USDT")
    assert (last.order_state, last.cumulative_quantity, last.average_price) == (
        t.ORDER_STATE_FILLED,
        "0.2",
        "104",
    )
    assert len({r.execution_id for r in reports}) == 3

    await session.send(R(heartbeat=order_pb2.Heartbeat(id="hb-1")))
    while True:
        echo = (await session.next("heartbeat")).heartbeat
        if echo.id == "hb-1":
            break
    idle = (await session.next("heartbeat", within_s=5)).heartbeat  # the server's own beat
    assert idle.id == ""
    await session.send(None)


@pytest.mark.replicas
async def test_a_session_resumes_from_the_last_report_its_client_saw(exchange: Exchange) -> None:
    """A client that lost its stream resumes the session with the last sequence it
    processed: the reports numbered while it was away come, and nothing else."""
    mm = await exchange.trader({"BTC": "1"}, "mm-resume")
    taker = await exchange.trader({"USDT": "100"}, "taker")
    session = Client(mm)
    await session.send(R(subscribe=order_pb2.StreamSubscribe()))
    session_id = (await session.next("subscribed")).subscribed.session_id
    await session.send(place(side=SELL, price="103", quantity="0.2"))
    order_id = (await session.next("ack")).ack.place.order.order_id
    seen = (await session.next("execution_report")).execution_report
    assert (seen.sequence, seen.execution_type) == (1, 1)
    session.call.cancel()  # the connection is gone

    await taker.place(side=BUY, price="103", quantity="0.05")  # while it is away
    await mm.cancel(order_id)
    again = Client(mm)
    resume = order_pb2.StreamSubscribe(resume_session_id=session_id, resume_after_sequence=1)
    for _ in range(50):  # until the server has seen the old stream end
        await again.send(R(subscribe=resume))
        try:
            subscribed = (await again.next("subscribed")).subscribed
            break
        except grpc.aio.AioRpcError as error:
            assert ErrorDetails.from_rpc_error(error).reason == "ORDER_SESSION_ATTACHED"
            again = Client(mm)
            await asyncio.sleep(0.1)
    assert (subscribed.session_id, subscribed.last_sequence) == (session_id, 1)
    trade = (await again.next("execution_report")).execution_report
    cancelled = (await again.next("execution_report")).execution_report
    assert [(r.sequence, r.execution_type) for r in (trade, cancelled)] == [(2, 2), (3, 3)]
    assert trade.last_quantity == "0.05" and cancelled.order_id == order_id

    unknown = Client(mm)
    await unknown.send(R(subscribe=order_pb2.StreamSubscribe(resume_session_id="s-nope")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await unknown.next("subscribed")
    assert ErrorDetails.from_rpc_error(refused.value).reason == "ORDER_SESSION_NOT_RESUMABLE"
    await again.send(None)


async def _answers(session: Client, n: int) -> dict[str, order_pb2.StreamOrdersResponse]:
    """The next n acks and rejects, by request id (execution reports pass by)."""
    found: dict[str, order_pb2.StreamOrdersResponse] = {}
    async with asyncio.timeout(15):
        while len(found) < n:
            message = await session.call.read()
            assert message is not grpc.aio.EOF, "stream ended"
            kind = message.WhichOneof("payload")
            if kind in ("ack", "reject"):
                found[getattr(message, kind).request_id] = message
    return found


@pytest.mark.replicas
async def test_several_commands_in_one_message_are_each_answered(exchange: Exchange) -> None:
    mm = await exchange.trader({"BTC": "1"}, "mm-batch")
    session = Client(mm)
    await session.send(R(subscribe=order_pb2.StreamSubscribe()))
    await session.next("subscribed")
    asks = [place(side=SELL, price=str(104 + i), quantity="0.1") for i in range(3)]
    bad = place(side=SELL, price="104.001", quantity="0.1")
    batch = [*asks, bad]
    await session.send(R(commands=order_pb2.StreamCommands(commands=batch)))
    answers = await _answers(session, len(batch))
    for ask in asks:
        ack = answers[ask.place.client_order_id].ack
        assert ack.place.order.state == t.ORDER_STATE_OPEN
        # The account's order budget rides on each ack, as on unary calls.
        assert ack.order_limit_1s == 100 and 1 <= ack.order_count_1s <= 100
    reject = answers[bad.place.client_order_id].reject
    assert ErrorDetails.from_status(reject.status).reason == "ORDER_PRICE_OFF_TICK"
    # The cancels of all three in one message too.
    cancels = [
        R(
            cancel=order_pb2.CancelOrderRequest(
                request_id=uid("r"), client_order_id=a.place.client_order_id
            )
        )
        for a in asks
    ]
    await session.send(R(commands=order_pb2.StreamCommands(commands=cancels)))
    done = {(await session.next("ack")).ack.request_id for _ in cancels}
    assert done == {c.cancel.request_id for c in cancels}
    # A subscribe inside a batch is not a command: the session ends with the reason.
    await session.send(
        R(commands=order_pb2.StreamCommands(commands=[R(subscribe=order_pb2.StreamSubscribe())]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await session.next("ack")
    assert ErrorDetails.from_rpc_error(ended.value).reason == "ORDER_STREAM_NOT_A_COMMAND"
    # More than 100 commands in one message end the session too, naming the field.
    crowded = Client(mm)
    await crowded.send(R(subscribe=order_pb2.StreamSubscribe()))
    await crowded.next("subscribed")
    await crowded.send(R(commands=order_pb2.StreamCommands(commands=[asks[0]] * 101)))
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await crowded.next("ack")
    details = ErrorDetails.from_rpc_error(too_many.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ORDER_STREAM_BATCH_TOO_LARGE",
    )
    assert [v.field for v in details.violations] == ["commands.commands"]


@pytest.mark.replicas
async def test_cancel_on_disconnect_leaves_no_open_orders(exchange: Exchange) -> None:
    mm = await exchange.trader({"USDT": "1000"}, "mm")
    elsewhere = await mm.place(side=BUY, price="95", quantity="0.1")  # not the session's
    session = Client(mm)
    await session.send(R(subscribe=order_pb2.StreamSubscribe(cancel_on_disconnect=True)))
    await session.next("subscribed")
    ids = []
    for price in ("96", "97"):
        await session.send(place(side=BUY, price=price, quantity="0.1"))
        ids.append((await session.next("ack")).ack.place.order.order_id)
    session.call.cancel()  # the client goes away
    for order_id in ids:
        gone = await mm.settled(order_id, t.ORDER_STATE_CANCELLED)
        assert (gone.state, gone.cancel_reason) == (
            t.ORDER_STATE_CANCELLED,
            t.CANCEL_REASON_CANCEL_ON_DISCONNECT,
        )
    assert (await mm.get(elsewhere.order_id)).state == t.ORDER_STATE_OPEN
    assert await exchange.hold_settles(mm.account_id, {"USDT": ("990.5", "9.5")}) == {
        "USDT": (D("990.5"), D("9.5"))
    }


@pytest.fixture
async def small_queue_order(
    stack: Stack, fresh_database_url: str
) -> AsyncIterator[order_pb2_grpc.OrderServiceStub]:
    """An order process of this test's own (its own schema and consumer) with a queue of 8."""
    settings = ChassisSettings(
        service="order",
        database_url=fresh_database_url,
        nats_url=stack.nats_url,
        mesh_addr=stack.edge,
        jwks_url=stack.ports.jwks_url,
        service_secret=stack.service_secret,
    )
    config = OrderConfig(stream_queue=8, consumer_name=f"order-test-{uid('c')}")
    server = await build_server(settings, config=config)
    port = await server.start()
    # A small receive window that does not grow: once the client stops reading,
    # the server's writes block after a few messages and its queue fills.
    options = [("grpc.http2.lookahead_bytes", 4096), ("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield order_pb2_grpc.OrderServiceStub(channel)
    finally:
        await server.stop(0.5)


async def test_a_reader_that_cannot_keep_up_is_told_and_disconnected(
    exchange: Exchange,
    small_queue_order: order_pb2_grpc.OrderServiceStub,
    fresh_database_url: str,
) -> None:
    mm = await exchange.trader({"BTC": "10"}, "mm")
    await risk_pb2_grpc.RiskServiceStub(exchange.channel).SetLimits(
        risk_pb2.SetLimitsRequest(
            request_id=uid("l"),
            limits=risk_pb2.Limits(account_id=mm.account_id, max_orders_per_second=100_000),
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    # Every write is done before the server can end the call: a write failing
    # after the server's status replaces that status with INTERNAL in grpc.aio
    # (grpc/grpc#36066). So the writes are awaited one by one, while a lock on
    # the order process's tables holds every order until the last one is written.
    call = small_queue_order.StreamOrders(metadata=mm.md)
    received: list[order_pb2.StreamOrdersResponse] = []
    db = await asyncpg.connect(fresh_database_url)
    try:
        await call.write(R(subscribe=order_pb2.StreamSubscribe()))
        received.append(await asyncio.wait_for(call.read(), 15))
        assert received[0].HasField("subscribed")
        # The client stops reading; its orders' acks and reports keep coming.
        # (ETH-BTC, where no other test trades: these bids stay out of everyone's way.)
        async with db.transaction():
            await db.execute('LOCK TABLE "order".orders, "order".requests IN ACCESS EXCLUSIVE MODE')
            for _ in range(150):
                await call.write(place(market="ETH-BTC", side=BUY, price="0.04", quantity="0.01"))
        await asyncio.sleep(1)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                message = await asyncio.wait_for(call.read(), 30)
                assert message is not grpc.aio.EOF, "the stream ended without a status"
                received.append(message)
        details = ErrorDetails.from_rpc_error(ended.value)
        assert (details.code, details.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "ORDER_STREAM_SLOW_CONSUMER",
        )
        reports = [m.execution_report for m in received if m.HasField("execution_report")]
        assert [r.sequence for r in reports] == list(range(1, len(reports) + 1))
    finally:
        await db.close()
        await small_queue_order.CancelAllOrders(
            order_pb2.CancelAllOrdersRequest(request_id=uid("r")), metadata=mm.md, timeout=30
        )
