"""Helpers for risk's integration tests: an in-process risk server on a fresh
database and the stack's Redis, tokens signed by a key of the test's own, and
request builders."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2
from services.chassis import ChassisSettings, ErrorDetails, Server
from services.chassis.tokens import StaticKeys, sign
from services.risk.config import RiskConfig
from services.risk.server import build_server

R = risk_pb2
KEY = Ed25519PrivateKey.generate()


def token(subject: str, *scopes: str) -> str:
    # A day: these are made when pytest imports the module, and a loaded machine's
    # whole run may come before this module's tests.
    return sign(KEY, "k1", subject=subject, key_id="ak_test", scopes=scopes,
                issued_at=int(time.time()), ttl_s=86_400, token_id=uuid.uuid4().hex)  # fmt: skip


def bearer(value: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


SERVICE = bearer(token("svc:order", "internal"))
ADMIN = bearer(token("acc_admin", "admin", "read"))


@dataclass
class Risk:
    server: Server
    stub: risk_pb2_grpc.RiskServiceStub
    channel: grpc.aio.Channel
    database_url: str
    registry: CollectorRegistry
    target: str  # host:port of its gRPC server

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def check(self, request: risk_pb2.CheckOrderRequest) -> risk_pb2.CheckOrderResponse:
        return await self.stub.CheckOrder(request, metadata=SERVICE)

    async def withdraw(
        self, request: risk_pb2.CheckWithdrawalRequest
    ) -> risk_pb2.CheckWithdrawalResponse:
        return await self.stub.CheckWithdrawal(request, metadata=SERVICE)

    async def set_limits(
        self, limits: risk_pb2.Limits, request_id: str | None = None, expected_version: int = 0
    ) -> risk_pb2.Limits:
        reply = await self.stub.SetLimits(
            R.SetLimitsRequest(
                request_id=request_id or uuid.uuid4().hex,
                limits=limits,
                expected_version=expected_version,
            ),
            metadata=ADMIN,
        )
        return reply.limits

    async def kill(self, **fields: object) -> risk_pb2.KillSwitch:
        fields.setdefault("request_id", uuid.uuid4().hex)
        fields.setdefault("reason", "test")
        reply = await self.stub.SetKillSwitch(
            R.SetKillSwitchRequest(**fields),  # type: ignore[arg-type]
            metadata=ADMIN,
        )
        return reply.kill_switch


@contextlib.asynccontextmanager
async def running_risk(
    database_url: str,
    redis_url: str | None,
    *,
    nats_url: str | None = None,
    config: RiskConfig | None = None,
) -> AsyncIterator[Risk]:
    settings = ChassisSettings(
        service="risk", database_url=database_url, redis_url=redis_url, nats_url=nats_url
    )
    config = config or RiskConfig(
        reload_interval_s=0.1,
        prices=nats_url is not None,
        redis_prefix=f"risk:test:{uuid.uuid4().hex[:8]}:",
    )
    registry = CollectorRegistry()
    server = await build_server(
        settings,
        config=config,
        keys=StaticKeys(lambda: {"k1": KEY.public_key()}),
        registry=registry,
    )
    port = await server.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Risk(
            server, risk_pb2_grpc.RiskServiceStub(channel), channel, database_url, registry, target
        )
    finally:
        await channel.close()
        await server.stop(0.5)


def order(
    account: str = "acc_1",
    *,
    market: str = "BTC-USDT",
    side: int = types_pb2.SIDE_BUY,
    type: int = types_pb2.ORDER_TYPE_LIMIT,
    price: str = "100",
    quantity: str = "1",
    **fields: object,
) -> risk_pb2.CheckOrderRequest:
    return R.CheckOrderRequest(
        account_id=account,
        market=market,
        order_id=uuid.uuid4().hex,
        side=side,  # type: ignore[arg-type]
        type=type,  # type: ignore[arg-type]
        price=price,
        quantity=quantity,
        **fields,  # type: ignore[arg-type]
    )


def withdrawal(
    wid: str, account: str = "acc_1", asset: str = "BTC", amount: str = "1"
) -> risk_pb2.CheckWithdrawalRequest:
    return R.CheckWithdrawalRequest(
        withdrawal_id=wid,
        account_id=account,
        asset=asset,
        amount=amount,
        network="bitcoin",
        address="bc1qtest",
    )


def denial(
    response: risk_pb2.CheckOrderResponse | risk_pb2.CheckWithdrawalResponse,
) -> ErrorDetails:
    assert not response.allowed, "the check allowed it"
    return ErrorDetails.from_status(response.denial)


async def rpc_error(call: object) -> ErrorDetails:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return ErrorDetails.from_rpc_error(error)
    raise AssertionError("the call succeeded")
