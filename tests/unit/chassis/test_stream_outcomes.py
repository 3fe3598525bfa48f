"""A streaming handler's outcome through the chassis interceptor: the same error
model and RED metrics as a unary call (both run in one frame, `_Call`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import ChassisSettings, ErrorDetails, NotFound, Server

RISK = risk_pb2.DESCRIPTOR.services_by_name["RiskService"]


class Risk(risk_pb2_grpc.RiskServiceServicer):
    """WatchRules sends one message, then ends as `then` says."""

    def __init__(self) -> None:
        self.then = "error"
        self.closed = asyncio.Event()

    async def WatchRules(self, request, context):
        yield risk_pb2.WatchRulesResponse(change_seq=1)
        try:
            if self.then == "error":
                raise NotFound("RISK_NOTHING_HERE", "nothing to watch")
            if self.then == "bug":
                raise RuntimeError("password=hunter2")
            if self.then == "wait":
                await asyncio.Event().wait()
        finally:
            self.closed.set()


def _handled(code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_service": "cex.risk.v1.RiskService",
            "grpc_method": "WatchRules",
            "grpc_type": "server_stream",
            "grpc_code": code,
        },
    )
    return value or 0.0


@pytest.fixture
async def served() -> AsyncIterator[tuple[Risk, risk_pb2_grpc.RiskServiceStub]]:
    servicer = Risk()
    server = Server(ChassisSettings(service="risk", grpc_port=0, shutdown_grace_s=5))
    server.add(RISK, risk_pb2_grpc.add_RiskServiceServicer_to_server, servicer)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield servicer, risk_pb2_grpc.RiskServiceStub(channel)
    await server.stop(0)


async def _messages_then_failure(
    stub: risk_pb2_grpc.RiskServiceStub,
) -> tuple[list[int], ErrorDetails]:
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for message in stub.WatchRules(risk_pb2.WatchRulesRequest()):
            seen.append(message.change_seq)
    return seen, ErrorDetails.from_rpc_error(failure.value)


async def test_an_exchange_error_mid_stream_ends_it_with_its_status(served) -> None:
    _, stub = served
    before = _handled("NOT_FOUND")
    seen, details = await _messages_then_failure(stub)
    assert seen == [1]
    assert details.code is grpc.StatusCode.NOT_FOUND
    assert (details.reason, details.domain) == ("RISK_NOTHING_HERE", "risk")
    assert details.message == "nothing to watch"
    assert _handled("NOT_FOUND") == before + 1


async def test_a_bug_mid_stream_is_internal_and_leaks_nothing(served) -> None:
    servicer, stub = served
    servicer.then = "bug"
    before = _handled("INTERNAL")
    seen, details = await _messages_then_failure(stub)
    assert seen == [1]
    assert details.code is grpc.StatusCode.INTERNAL
    assert details.reason == "RISK_INTERNAL"
    assert "hunter2" not in details.message
    assert _handled("INTERNAL") == before + 1


async def test_a_stream_the_client_cancels_is_closed_and_counted_once(served) -> None:
    servicer, stub = served
    servicer.then = "wait"
    before = sum(_handled(c.name) for c in grpc.StatusCode)
    call = stub.WatchRules(risk_pb2.WatchRulesRequest())
    assert (await call.read()).change_seq == 1
    call.cancel()
    await asyncio.wait_for(servicer.closed.wait(), 5)
    for _ in range(100):  # the handler's frame ends after its generator closed
        if sum(_handled(c.name) for c in grpc.StatusCode) > before:
            break
        await asyncio.sleep(0.01)
    assert sum(_handled(c.name) for c in grpc.StatusCode) == before + 1
