"""One order's trace across every hop: a stack of its own exporting OTLP (Envoy and
every service) to a collector inside the test, and an order through Envoy whose
trace covers the edge, the services on the order path, and the JetStream
consumers of its trade (settlement, execution reports, market data, prices).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from cex.marketdata.v1 import marketdata_pb2, marketdata_pb2_grpc
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.collector import Collector, SpanRecord, collector, render_trace
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from tests.e2e.order.support import BUY, MARKET, SELL, Trader, exchange_on, uid

# The ledger is not on it: match's writer holds, matches and settles (ADR 0013).
ORDER_PATH = {"cex-envoy", "cex-order", "cex-risk", "cex-match"}
CONSUMERS = {"order.executions", "marketdata.apply", "risk.prices"}


def orphans(found: list[SpanRecord], root_parent: str) -> list[SpanRecord]:
    """The spans whose parent is not in the trace (besides the children of its root)."""
    ids = {s.span_id for s in found}
    return [s for s in found if s.parent_id not in ids and s.parent_id != root_parent]


async def consumed(
    spans: Collector, trace_id: str, root_parent: str, consumers: set[str], within_s: float = 30.0
) -> list[SpanRecord]:
    """The trace once it is whole: the consumers' spans are in it, and so is every
    parent, Envoy's mesh hops included (each Envoy worker thread flushes its own
    spans, every 5 s); or the trace as it is after `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        found = spans.trace(trace_id)
        done = (
            {s.name for s in found} >= consumers
            and "cex-envoy" in {s.service for s in found}
            and not orphans(found, root_parent)
        )
        if done or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)


@pytest.fixture
async def spans() -> AsyncIterator[Collector]:
    async with collector() as found:
        yield found


@pytest.fixture
async def traced_stack(
    tmp_path_factory: pytest.TempPathFactory, spans: Collector
) -> AsyncIterator[Stack]:
    env = embedded_env()
    env.update(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=spans.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: spans reach the collector soon
    )
    running = Stack(tmp_path_factory.mktemp("cex-traced"), free_ports(), env)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def place(trader: Trader, side: int, traceparent: str) -> order_pb2.Order:
    reply = await trader.orders.PlaceOrder(
        order_pb2.PlaceOrderRequest(
            client_order_id=uid(),
            market=MARKET,
            type=t.ORDER_TYPE_LIMIT,
            side=side,  # type: ignore[arg-type]
            price="100",
            quantity="0.1",
        ),
        metadata=(*trader.md, ("traceparent", traceparent)),
        timeout=20,
    )
    return reply.order


async def market_data_ready(channel: grpc.aio.Channel, within_s: float = 30.0) -> None:
    """Market data follows JetStream once its feed caught up with match (on a fresh
    stack, after the mesh is up); before, it reads events from match's replay."""
    stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            await stub.GetOrderBook(marketdata_pb2.GetOrderBookRequest(market=MARKET), timeout=5)
            return
        except grpc.aio.AioRpcError as error:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"market data is not ready: {error.details()}") from error
        await asyncio.sleep(0.2)


def _client_traceparent() -> tuple[str, str, str]:
    """The test is the client: its own span starts the trace."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def test_one_trace_covers_the_edge_the_order_path_and_the_trade_consumers(
    traced_stack: Stack, spans: Collector
) -> None:
    credentials = traced_stack.credentials("tests")
    async with (
        grpc.aio.insecure_channel(traced_stack.edge) as channel,
        exchange_on(traced_stack, credentials, channel) as exchange,
    ):
        await market_data_ready(channel)
        alice = await exchange.trader({"BTC": "1"}, "alice")
        bob = await exchange.trader({"USDT": "1000"}, "bob")
        # Alice's ask first, traced too: once the consumers have handled it, bob's
        # events reach them in batches of their own (a batch's span is the child
        # of its first traced message, and only links to the others).
        ask_trace, ask_span, traceparent = _client_traceparent()
        await place(alice, SELL, traceparent)
        await consumed(spans, ask_trace, ask_span, CONSUMERS)

        trace_id, client_span, traceparent = _client_traceparent()
        bid = await place(bob, BUY, traceparent)
        assert bid.state == t.ORDER_STATE_FILLED
        found = await consumed(spans, trace_id, client_span, CONSUMERS)
        names = {s.name for s in found}
    tree = render_trace(found)

    services = {s.service for s in found}
    assert services >= ORDER_PATH, tree
    assert len(services - {"cex-envoy"}) >= 4, tree  # order, match, market data, risk
    assert names >= CONSUMERS, tree
    # The edge is Envoy's server span, the child of the client's.
    edge = [s for s in found if s.parent_id == client_span]
    assert [s.service for s in edge] == ["cex-envoy"]
    assert edge[0].kind == trace_pb2.Span.SPAN_KIND_SERVER
    # Parent/child links are intact: every parent is in the trace, except the
    # client's span (the one root, which the test holds).
    assert orphans(found, client_span) == [], tree
    assert all(s.parent_id for s in found)
    # Through JetStream: the consumers of the trade are children of match's span
    # for bob's command, itself the child of order's PlaceOrder.
    by_id = {s.span_id: s for s in found}
    for consumer in (s for s in found if s.name in CONSUMERS):
        command = by_id[consumer.parent_id]
        assert (command.service, command.name) == ("cex-match", "match.command")
        assert by_id[command.parent_id].name == "/cex.order.v1.OrderService/PlaceOrder"
