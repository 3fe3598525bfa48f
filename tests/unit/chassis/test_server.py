"""The chassis server in-process: error mapping, propagation, health and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.chassis import (
    ChassisSettings,
    ErrorDetails,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Server,
    mesh_channel,
)

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


class Auth(auth_pb2_grpc.AuthServiceServicer):
    """A test servicer: each method exercises one path through the chassis."""

    def __init__(self, downstream: str | None = None) -> None:
        self.downstream = downstream
        self.seen: list[tuple[float | None, str]] = []
        self.release = asyncio.Event()

    async def GetAccount(self, request, context):
        if request.account_id == "slow":
            await self.release.wait()
            return auth_pb2.GetAccountResponse(account=auth_pb2.Account(account_id="slow"))
        if request.account_id == "record":
            metadata = dict(context.invocation_metadata())
            self.seen.append((context.time_remaining(), metadata.get("x-request-id", "")))
            return auth_pb2.GetAccountResponse()
        raise NotFound("AUTH_ACCOUNT_NOT_FOUND", f"no account {request.account_id!r}")

    async def CreateAccount(self, request, context):
        raise InvalidArgument(
            "AUTH_INVALID_EMAIL",
            "email is malformed",
            violations=[FieldViolation("email", "missing '@'", "MALFORMED")],
        )

    async def ListApiKeys(self, request, context):
        raise RuntimeError("connection string postgresql://secret@db")

    async def IssueToken(self, request, context):
        """Calls the downstream service, as a real handler would through the mesh."""
        assert self.downstream is not None
        async with mesh_channel(self.downstream) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.GetAccount(auth_pb2.GetAccountRequest(account_id="record"), timeout=30)
        return auth_pb2.IssueTokenResponse(token_type="Bearer")


async def _serve(servicer: Auth) -> Server:
    server = Server(ChassisSettings(service="auth", grpc_port=0, shutdown_grace_s=5))
    server.add(AUTH, auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer)
    await server.start()
    return server


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Auth, auth_pb2_grpc.AuthServiceStub]]:
    servicer = Auth()
    server = await _serve(servicer)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, servicer, auth_pb2_grpc.AuthServiceStub(channel)
    servicer.release.set()
    await server.stop(0)


async def _failure(call) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return ErrorDetails.from_rpc_error(failure.value)


async def test_exchange_error_becomes_status_with_error_info(served) -> None:
    _, _, stub = served
    details = await _failure(stub.GetAccount(auth_pb2.GetAccountRequest(account_id="nope")))
    assert details.code is grpc.StatusCode.NOT_FOUND
    assert (details.reason, details.domain) == ("AUTH_ACCOUNT_NOT_FOUND", "auth")
    assert details.message == "no account 'nope'"


async def test_invalid_argument_carries_field_violations(served) -> None:
    _, _, stub = served
    details = await _failure(stub.CreateAccount(auth_pb2.CreateAccountRequest(email="x")))
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "AUTH_INVALID_EMAIL"
    assert details.violations == (FieldViolation("email", "missing '@'", "MALFORMED"),)


async def test_a_bug_is_internal_and_leaks_nothing(served) -> None:
    _, _, stub = served
    details = await _failure(stub.ListApiKeys(auth_pb2.ListApiKeysRequest()))
    assert details.code is grpc.StatusCode.INTERNAL
    assert details.reason == "AUTH_INTERNAL"
    assert "secret" not in details.message


async def test_a_method_not_written_yet_is_unimplemented(served) -> None:
    _, _, stub = served
    details = await _failure(stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest()))
    assert details.code is grpc.StatusCode.UNIMPLEMENTED
    assert details.reason == "AUTH_UNIMPLEMENTED"


async def test_deadline_and_request_id_reach_the_downstream_call() -> None:
    downstream = Auth()
    down = await _serve(downstream)
    upstream = await _serve(Auth(downstream=f"127.0.0.1:{down.port}"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{upstream.port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(),
                timeout=2.0,
                metadata=(("x-request-id", "req-42"),),
            )
    finally:
        await upstream.stop(0)
        await down.stop(0)
    [(remaining, request_id)] = downstream.seen
    # The downstream call asked for 30 s but inherits what is left of the caller's 2 s
    # (gRPC rounds deadlines up by a few milliseconds on the wire).
    assert remaining is not None and 0 < remaining < 2.1
    assert request_id == "req-42"


async def test_health_reports_each_service_serving(served) -> None:
    server, _, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", AUTH.full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="cex.nope.v1.Nope"))
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_graceful_stop_reports_not_serving_then_finishes_calls_in_flight() -> None:
    servicer = Auth()
    server = await _serve(servicer)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=AUTH.full_name)
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = auth_pb2_grpc.AuthServiceStub(channel).GetAccount(
            auth_pb2.GetAccountRequest(account_id="slow")
        )
        await asyncio.sleep(0.1)  # the call is now inside the handler

        stopping = asyncio.create_task(server.stop(grace_s=5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done()
        servicer.release.set()

        reply = await in_flight
        assert reply.account.account_id == "slow"
        await stopping
