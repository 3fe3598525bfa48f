"""The whole stack, as a client and an SRE see it through Envoy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES
from services.chassis import ErrorDetails
from services.reflection.server import api_services

API = [s for s in SERVICES if s.grpc_service]


def _channel(target: str, authority: str | None = None) -> grpc.aio.Channel:
    options = [("grpc.default_authority", authority)] if authority else []
    return grpc.aio.insecure_channel(target, options=options)


async def _health(target: str, service: str, authority: str | None = None) -> int:
    async with _channel(target, authority) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


async def _reflect(target: str, request: reflection_pb2.ServerReflectionRequest, version: str):
    async with _channel(target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([request]), timeout=5)
        replies = [reply async for reply in call]
        return replies[0]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
async def test_every_service_is_serving_directly_and_through_envoy(stack: Stack, spec) -> None:
    direct = f"{stack.ports.host}:{stack.ports.grpc(spec)}"
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(direct, spec.grpc_service) == serving
    assert await _health(stack.edge, spec.grpc_service, authority=spec.name) == serving


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_through_envoy_lists_all_seven_services(
    stack: Stack, version: str
) -> None:
    reply = await _reflect(
        stack.edge, reflection_pb2.ServerReflectionRequest(list_services=""), version
    )
    listed = {s.name for s in reply.list_services_response.service}
    assert {spec.grpc_service for spec in API} <= listed
    assert len(API) == 7 == len(api_services())


@pytest.mark.parametrize(
    "symbol", ["cex.order.v1.OrderService", "cex.order.v1.OrderService.PlaceOrder"]
)
async def test_reflection_through_envoy_describes_services_and_methods(
    stack: Stack, symbol: str
) -> None:
    reply = await _reflect(
        stack.edge, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol), "v1"
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name: s for f in files for s in f.service}
    methods = {m.name for m in services["OrderService"].method}
    assert {"PlaceOrder", "CancelOrder", "StreamOrders", "CancelAllAfter"} <= methods


@pytest.mark.parametrize("spec", API, ids=lambda s: s.name)
async def test_an_empty_request_gets_the_error_model_through_envoy(
    stack: Stack, spec, service_token: str
) -> None:
    """Every service's first unary method, called with an empty request: invalid for
    an implemented method, UNIMPLEMENTED for one whose issue has not landed; either
    way a google.rpc.Status with the service's ErrorInfo."""
    from services.reflection.server import API as MODULES

    descriptor = next(
        s
        for m in MODULES
        for s in m.DESCRIPTOR.services_by_name.values()
        if s.full_name == spec.grpc_service
    )
    unary = next(
        m
        for m in descriptor.methods
        if not m.client_streaming and not m.server_streaming and not m.name.startswith("List")
    )  # an empty List request is valid (market data's first method is ListMarkets)
    async with _channel(stack.edge) as channel:
        call = channel.unary_unary(
            f"/{spec.grpc_service}/{unary.name}",
            request_serializer=lambda _: b"",
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(b"", timeout=5, metadata=_bearer(service_token))
    details = ErrorDetails.from_rpc_error(failure.value)
    assert details.code in (
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.reason.startswith(f"{spec.name.upper()}_")
    assert details.domain == spec.name
    if details.code is grpc.StatusCode.UNIMPLEMENTED:
        assert details.reason == f"{spec.name.upper()}_UNIMPLEMENTED"


async def test_red_metrics_count_calls_by_code(stack: Stack, service_token: str) -> None:
    spec = next(s for s in SERVICES if s.name == "order")
    async with _channel(stack.edge) as channel:
        call = channel.unary_unary(
            "/cex.order.v1.OrderService/GetOrder",
            request_serializer=lambda _: b"",
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await call(b"", timeout=5, metadata=_bearer(service_token))
    url = f"http://{stack.ports.host}:{stack.ports.metrics(spec)}/metrics"
    metrics = await asyncio.to_thread(_get, url)
    line = next(
        row
        for row in metrics.splitlines()
        if row.startswith("grpc_server_handled_total{")
        and 'grpc_method="GetOrder"' in row
        and 'grpc_code="INVALID_ARGUMENT"' in row  # a service must name the account
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "grpc_server_handling_seconds_bucket" in metrics


async def test_envoy_exposes_prometheus_stats_per_cluster(stack: Stack) -> None:
    url = f"http://{stack.ports.host}:{stack.ports.envoy_admin}/stats/prometheus"
    stats = await asyncio.to_thread(_get, url)
    for spec in SERVICES:
        assert f'envoy_cluster_health_check_healthy{{envoy_cluster_name="{spec.name}"}} 1' in stats


async def test_cex_status_reports_every_component_healthy(stack: Stack) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cex_stack.cli", "--state-dir", str(stack.state_dir), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ["postgres", "nats", "redis", "envoy", *(s.name for s in SERVICES)]:
        assert f"{name}" in result.stdout
    assert "UNHEALTHY" not in result.stdout


async def test_a_killed_service_is_restarted_and_serves_again(stack: Stack) -> None:
    risk = stack.component("risk")
    assert risk.process is not None
    old_pid = risk.process.pid
    os.kill(old_pid, signal.SIGKILL)
    target = f"{stack.ports.host}:{stack.ports.grpc(next(s for s in SERVICES if s.name == 'risk'))}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if risk.process.pid != old_pid:
            try:
                serving = health_pb2.HealthCheckResponse.SERVING
                if await _health(target, "cex.risk.v1.RiskService") == serving:
                    break
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"risk did not come back: {stack.log_tail('risk')}")
    assert risk.process.pid != old_pid


async def test_the_ledger_answers_through_envoy(stack: Stack, service_token: str) -> None:
    from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    async with _channel(stack.edge) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetTransfer(
                ledger_pb2.GetTransferRequest(id="nope"), timeout=5, metadata=_bearer(service_token)
            )
        audit = await stub.AuditLedger(
            ledger_pb2.AuditLedgerRequest(), timeout=10, metadata=_bearer(service_token)
        )
    details = ErrorDetails.from_rpc_error(failure.value)
    assert (details.code, details.reason, details.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "LEDGER_TRANSFER_NOT_FOUND",
        "ledger",
    )
    assert audit.balanced


async def test_cex_top_shows_each_service_with_its_traffic(
    stack: Stack, service_token: str
) -> None:
    from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cex_stack.cli", "--state-dir", str(stack.state_dir),
        "top", "--once", "--interval", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    calls = 0
    async with _channel(stack.edge) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.5
        while loop.time() < until:
            await stub.AuditLedger(
                ledger_pb2.AuditLedgerRequest(), timeout=10, metadata=_bearer(service_token)
            )
            calls += 1
    out, err = await asyncio.wait_for(top.communicate(), 30)
    assert top.returncode == 0, err.decode()
    rows = {line.split()[0]: line.split() for line in out.decode().splitlines()[2:]}
    assert set(rows) == {s.name for s in SERVICES}
    assert all(r[1] == "SERVING" for r in rows.values()), out.decode()
    assert calls > 0 and float(rows["ledger"][2]) > 0, out.decode()
    assert rows["ledger"][4] != "-"  # a p50 from the calls just made
