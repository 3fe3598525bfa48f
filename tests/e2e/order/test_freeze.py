"""Freezing an account through the whole stack (issue 21): a trade token issued before
the freeze is refused at its next PlaceOrder within a second, over gRPC, REST and an
open order stream, while its reads still work; reactivation lets it trade again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc

from cex.auth.v1 import auth_pb2
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from tests.e2e.order.support import BUY, Exchange, Trader, error_of, uid
from tests.rest import rest

R = order_pb2.StreamOrdersRequest


async def _set_state(exchange: Exchange, trader: Trader, state: int) -> float:
    """When the change was committed (time.monotonic())."""
    await exchange.auth.SetAccountState(
        auth_pb2.SetAccountStateRequest(
            request_id=uid("st"), account_id=trader.account_id, state=state, reason="e2e review"
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    return time.monotonic()


async def _place(trader: Trader) -> str:
    """ "OK", or the refusal's code and reason."""
    try:
        await trader.place(side=BUY, price="95", quantity="0.2")
    except grpc.aio.AioRpcError as error:
        details = error_of(error)
        return f"{details.code.name} {details.reason}"
    return "OK"


async def _until(trader: Trader, want: str, within_s: float) -> float:
    """Seconds until PlaceOrder answers `want` (fails after `within_s`)."""
    began = time.monotonic()
    while True:
        got = await _place(trader)
        if got == want:
            return time.monotonic() - began
        assert time.monotonic() - began < within_s, got
        await asyncio.sleep(0.02)


async def test_a_frozen_account_is_refused_at_its_next_call(exchange: Exchange) -> None:
    trader = await exchange.trader({"USDT": "1000"}, "frozen")
    assert await _place(trader) == "OK"
    session_requests: asyncio.Queue[R | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[R]:
        while (message := await session_requests.get()) is not None:
            yield message

    stream = trader.orders.StreamOrders(requests(), metadata=trader.md)
    await session_requests.put(R(subscribe=order_pb2.StreamSubscribe()))
    first = await stream.read()
    assert first.WhichOneof("payload") == "subscribed"
    try:
        frozen_at = await _set_state(exchange, trader, auth_pb2.ACCOUNT_STATE_SUSPENDED)
        await _until(trader, "PERMISSION_DENIED AUTH_ACCOUNT_SUSPENDED", within_s=1.0)
        assert time.monotonic() - frozen_at < 1.0  # refused within a second of the freeze
        # Reads stay allowed with the same token.
        listed = await trader.orders.ListOrders(
            order_pb2.ListOrdersRequest(), metadata=trader.md, timeout=10
        )
        assert listed.orders
        # REST: the service's Status as JSON with HTTP 403.
        code, body = await asyncio.to_thread(
            rest,
            exchange.stack,
            "/v1/orders",
            trader.token,
            {
                "client_order_id": uid(),
                "market": "BTC-USDT",
                "side": "SIDE_BUY",
                "type": "ORDER_TYPE_LIMIT",
                "price": "95",
                "quantity": "0.2",
            },
        )
        assert code == 403, body
        assert body["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]  # type: ignore[index]
        assert "AUTH_ACCOUNT_SUSPENDED" in json.dumps(body)
        code, body = await asyncio.to_thread(rest, exchange.stack, "/v1/orders", trader.token)
        assert code == 200, body
        # The stream opened before the freeze ends at its next message, with the reason.
        await session_requests.put(
            R(
                place=order_pb2.PlaceOrderRequest(
                    client_order_id=uid(),
                    market="BTC-USDT",
                    side=BUY,
                    type=t.ORDER_TYPE_LIMIT,
                    price="95",
                    quantity="0.2",
                )
            )
        )
        try:
            while True:
                message = await asyncio.wait_for(stream.read(), 10)
                assert message is not grpc.aio.EOF, "the stream ended without a status"
                # Reports of the orders placed before; never an ack of the new one.
                assert message.WhichOneof("payload") in ("heartbeat", "execution_report"), message
        except grpc.aio.AioRpcError as error:
            ended = error_of(error)
        assert (ended.code, ended.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_ACCOUNT_SUSPENDED",
        )
    finally:
        await session_requests.put(None)
        stream.cancel()
        await _set_state(exchange, trader, auth_pb2.ACCOUNT_STATE_ACTIVE)
    await _until(trader, "OK", within_s=1.0)  # reactivated: trades again
