"""The rate-limit usage an answer carries, as the client records it.

A small in-process order service answers PlaceOrder the way the real one does
(tests/e2e/test_sdk_trading.py checks that one through Envoy): the usage as
initial metadata, on success and on refusal, or, as other servers may, in the
trailers. No usage on an answer leaves the last one in place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_sdk import NO_RETRY, Client, RateLimit, RateLimitedError
from cex_sdk.ratelimit import rate_limit_of
from services.chassis.errors import ExchangeError, status_metadata

PLACE = "/cex.order.v1.OrderService/PlaceOrder"


class FakeAuth(auth_pb2_grpc.AuthServiceServicer):
    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        reply = auth_pb2.IssueTokenResponse(access_token="token", account_id="acc_1")
        reply.expire_time.GetCurrentTime()
        reply.expire_time.seconds += 300
        return reply

    async def GetAccount(
        self, request: auth_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetAccountResponse:
        return auth_pb2.GetAccountResponse(account=auth_pb2.Account(account_id="acc_1"))


class FakeOrders(order_pb2_grpc.OrderServiceServicer):
    """Counts places in a budget of 3; the 4th is refused, usage still reported."""

    def __init__(self) -> None:
        self.used = 0
        self.where = "initial"  # or "trailing", or "none"

    async def PlaceOrder(
        self, request: order_pb2.PlaceOrderRequest, context: grpc.aio.ServicerContext
    ) -> order_pb2.PlaceOrderResponse:
        self.used += 1
        usage = (("x-cex-order-limit-1s", "3"), ("x-cex-order-count-1s", str(self.used)))
        if self.where == "initial":
            await context.send_initial_metadata(usage)
        if self.used > 3:
            error = ExchangeError(
                "RISK_RATE_LIMITED", "slow down", code=grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            trailers = status_metadata(error.to_status("order"))
            context.set_trailing_metadata(
                (*trailers, *usage) if self.where == "trailing" else trailers
            )
            await context.abort(error.code, error.message)
        if self.where == "trailing":
            context.set_trailing_metadata(usage)
        order = order_pb2.Order(order_id=f"o{self.used}", client_order_id=request.client_order_id)
        return order_pb2.PlaceOrderResponse(order=order)


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeOrders, str]]:
    orders, server = FakeOrders(), grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(FakeAuth(), server)
    order_pb2_grpc.add_OrderServiceServicer_to_server(orders, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield orders, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize("where", ["initial", "trailing"])
async def test_each_answer_s_usage_is_recorded_even_on_a_refusal(
    served: tuple[FakeOrders, str], where: str
) -> None:
    orders, target = served
    orders.where = where
    async with Client.from_api_key(target, "ak_1", "sk_1", retry=NO_RETRY) as client:
        assert client.last_rate_limit is None
        await client.auth.get_account()  # carries none
        assert client.last_rate_limit is None
        for used in (1, 2, 3):
            await client.orders.place("BTC-USDT", t.SIDE_BUY, "0.1", price="100")
            assert client.last_rate_limit == RateLimit(PLACE, limit=3, used=used)
        assert client.last_rate_limit.remaining == 0
        with pytest.raises(RateLimitedError):
            await client.orders.place("BTC-USDT", t.SIDE_BUY, "0.1", price="100")
        assert client.last_rate_limit == RateLimit(PLACE, limit=3, used=4)
        orders.where, orders.used = "none", 0  # a new second, and an answer without usage
        await client.orders.place("BTC-USDT", t.SIDE_BUY, "0.1", price="100")
        assert client.last_rate_limit.used == 4  # the last one reported stays


def test_junk_or_absent_headers_are_no_usage() -> None:
    assert rate_limit_of(PLACE, None, ()) is None
    assert rate_limit_of(PLACE, (("x-cex-order-limit-1s", "10"),)) is None
    bad = (("x-cex-order-limit-1s", "ten"), ("x-cex-order-count-1s", "1"))
    assert rate_limit_of(PLACE, bad) is None
    unlimited = (("x-cex-order-limit-1s", "0"), ("x-cex-order-count-1s", "1"))
    assert rate_limit_of(PLACE, unlimited) is None
    upper = (("X-Cex-Order-Limit-1s", "10"), ("x-cex-order-count-1s", "2"))
    assert rate_limit_of(PLACE, upper) == RateLimit(PLACE, 10, 2)
