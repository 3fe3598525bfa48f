"""Order's risk client against a risk that predates CheckOrders (a rolling upgrade):
it falls back to CheckOrder one by one, and one failed check fails only its order."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import ExchangeError
from services.order.downstream import RiskClient


class OldRisk(risk_pb2_grpc.RiskServiceServicer):
    """CheckOrder only (the generated base answers UNIMPLEMENTED for CheckOrders)."""

    def __init__(self) -> None:
        self.calls = 0

    async def CheckOrder(
        self, request: risk_pb2.CheckOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.CheckOrderResponse:
        self.calls += 1
        if not request.account_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "account_id: required")
        return risk_pb2.CheckOrderResponse(allowed=True, reference_price="100")


async def test_an_old_risk_is_checked_one_by_one() -> None:
    server = grpc.aio.server()
    old = OldRisk()
    risk_pb2_grpc.add_RiskServiceServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = RiskClient(channel)
            loop = asyncio.create_task(client.checks.run())
            try:
                good, bad = await asyncio.gather(
                    client.check(risk_pb2.CheckOrderRequest(account_id="a", market="BTC-USDT")),
                    client.check(risk_pb2.CheckOrderRequest(market="BTC-USDT")),
                    return_exceptions=True,
                )
                assert str(good) == "100"
                assert isinstance(bad, ExchangeError)
                assert (bad.reason, bad.code) == (
                    "ORDER_RISK_UNAVAILABLE",
                    grpc.StatusCode.UNAVAILABLE,
                )
                assert "INVALID_ARGUMENT" in bad.message
                # Later checks go straight to CheckOrder.
                assert await client.check(risk_pb2.CheckOrderRequest(account_id="b")) is not None
                assert old.calls == 3
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
    finally:
        await server.stop(None)
