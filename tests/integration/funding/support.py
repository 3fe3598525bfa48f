"""Helpers for funding's integration tests: the chain simulator as a real process,
funding in-process (or as a killable process) on a fresh database next to a ledger
of its own, the stack's auth and risk reached through Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from prometheus_client import CollectorRegistry

from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2 as L
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports
from services.chassis import ChassisSettings, ErrorDetails, Server
from services.funding.config import FundingConfig
from services.funding.server import build_server
from tests.conftest import Trust
from tests.integration.ledger.support import Ledger
from tests.process import ServiceProcess

TERMINAL = {
    F.WITHDRAWAL_STATE_COMPLETED,
    F.WITHDRAWAL_STATE_CANCELLED,
    F.WITHDRAWAL_STATE_REJECTED,
    F.WITHDRAWAL_STATE_FAILED,
}
# Addresses the simulator would accept (shape only).
BTC_ADDRESS = "bcrt1q" + "a" * 38
ETH_ADDRESS = "0x" + "b" * 40


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def new_account() -> str:
    return f"acc_{uuid.uuid4().hex[:12]}"


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value).encode()


def _decode(data: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(data)
    return value


@dataclass
class Chain:
    """`python -m chainsim.main`: a real process, as custody would be."""

    seed: int = 7
    block_s: float = 0.05
    faults: Mapping[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=lambda: free_ports().edge)
    state_dir: str = ""  # where it keeps its chain across restarts ("": in memory)
    process: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "CHAINSIM_PORT": str(self.port),
            "CHAINSIM_SEED": str(self.seed),
            "CHAINSIM_BLOCK_S": str(self.block_s),
            "CHAINSIM_FAULTS": json.dumps(dict(self.faults)),
            "CHAINSIM_STATE_DIR": self.state_dir,
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainsim.main", env=env
        )
        self.channel = grpc.aio.insecure_channel(self.target)
        for _ in range(200):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.call("Stats", {}, deadline_s=1)
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("chainsim did not come up")

    async def call(self, method: str, request: Mapping[str, Any], deadline_s: float = 5) -> Any:
        assert self.channel is not None
        stub = self.channel.unary_unary(
            f"/chainsim.Chain/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        return await stub(request, timeout=deadline_s)

    async def configure(self, **faults: Any) -> None:
        await self.call("Configure", {"faults": faults})

    async def deposit(self, address: str, asset: str, amount: str) -> str:
        return str(
            (await self.call("Deposit", {"address": address, "asset": asset, "amount": amount}))[
                "txid"
            ]
        )

    async def stats(self) -> dict[str, Any]:
        return dict(await self.call("Stats", {}))

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def chainsim(**kwargs: Any) -> AsyncIterator[Chain]:
    chain = Chain(**kwargs)
    await chain.start()
    try:
        yield chain
    finally:
        await chain.stop()


def funding_settings(stack: Stack, database_url: str, **overrides: Any) -> ChassisSettings:
    return ChassisSettings(
        service="funding",
        database_url=database_url,
        mesh_addr=stack.edge,
        jwks_url=stack.ports.jwks_url,
        service_secret=stack.service_secret,
        **overrides,
    )


def funding_config(ledger_target: str, chain_target: str, **overrides: Any) -> FundingConfig:
    values: dict[str, Any] = {
        "chain_target": chain_target,
        "ledger_target": ledger_target,
        "instance": f"test-{uuid.uuid4().hex[:6]}",
        "poll_s": 0.05,
        "confirmation_poll_s": 0.05,
        "chain_poll_s": 0.05,
        "step_timeout_s": 2.0,
        "withdrawal_deadline_s": 60.0,
        "outbox": False,
    }
    values.update(overrides)
    return FundingConfig(**values)


@dataclass
class Funding:
    stub: funding_pb2_grpc.FundingServiceAsyncStub
    database_url: str
    server: Server | None = None

    async def withdraw(
        self,
        account: str,
        amount: str,
        asset: str = "USDT",
        *,
        request_id: str | None = None,
        address: str | None = None,
        md: Iterable[tuple[str, str]] | None = None,
        **fields: str,
    ) -> F.Withdrawal:
        reply = await self.stub.RequestWithdrawal(
            F.RequestWithdrawalRequest(
                request_id=request_id or uuid.uuid4().hex,
                account_id=account,
                asset=asset,
                amount=amount,
                address=address or (BTC_ADDRESS if asset == "BTC" else ETH_ADDRESS),
                **fields,
            ),
            metadata=tuple(md) if md is not None else None,
            timeout=10,
        )
        return reply.withdrawal

    async def get(self, account: str, withdrawal_id: str) -> F.Withdrawal:
        reply = await self.stub.GetWithdrawal(
            F.GetWithdrawalRequest(account_id=account, withdrawal_id=withdrawal_id),
            timeout=10,
        )
        return reply.withdrawal

    async def saga(self, saga_id: str) -> F.Saga:
        return (await self.stub.GetSaga(F.GetSagaRequest(saga_id=saga_id))).saga

    async def settle(
        self, account: str, withdrawal_id: str, *, within_s: float = 30
    ) -> F.Withdrawal:
        until = time.monotonic() + within_s
        while True:
            w = await self.get(account, withdrawal_id)
            if w.state in TERMINAL:
                return w
            if time.monotonic() > until:
                raise AssertionError(f"withdrawal not finished: {w}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_funding(
    stack: Stack,
    trust: Trust,
    database_url: str,
    config: FundingConfig,
    *,
    nats_url: str | None = None,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[Funding]:
    settings = funding_settings(stack, database_url, nats_url=nats_url)
    server = await build_server(settings, config=config, registry=registry)
    port = await server.start()
    # The service token on every call that brings no token of its own, renewed
    # near expiry (a module's tests outlive one token).
    channel = trust.channel(f"127.0.0.1:{port}")
    try:
        yield Funding(funding_pb2_grpc.FundingServiceStub(channel), database_url, server)
    finally:
        await channel.close()
        await server.stop(0.5)


@contextlib.asynccontextmanager
async def fresh_database(stack: Stack) -> AsyncIterator[str]:
    """A new, empty database (as the `fresh_database_url` fixture, for wider scopes)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(stack.admin_database_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    yield stack.database_url.rsplit("/", 1)[0] + f"/{name}"


async def fund(ledger: Ledger, account: str, amount: str, asset: str = "USDT") -> None:
    await ledger.ok(
        L.Transfer(
            id=f"seed:{uuid.uuid4().hex}",
            debit_account_id="sys:custody",
            credit_account_id=account,
            asset=asset,
            amount=amount,
            kind=L.TRANSFER_KIND_DEPOSIT,
        )
    )


async def rpc_error(call: object) -> ErrorDetails:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return ErrorDetails.from_rpc_error(error)
    raise AssertionError("the call succeeded")


async def holds(database_url: str, withdrawal_ids: Iterable[str]) -> dict[str, int]:
    """State of each withdrawal's hold in the ledger (1 pending, 2 posted, 3 voided; 0 none)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT reference, state FROM ledger.transfers WHERE op = 2 AND kind = 2"
        )
    finally:
        await conn.close()
    found = {r["reference"]: r["state"] for r in rows}
    return {wid: found.get(wid, 0) for wid in withdrawal_ids}


def funding_process(stack: Stack, database_url: str, env: dict[str, str]) -> ServiceProcess:
    """`python -m services.funding.main` reaching the stack through Envoy, without NATS
    or its outbox; `env` (FUNDING_*) may change between starts. It may die as it starts
    (a crash point reached while resuming): `start` returns then."""
    return ServiceProcess(
        "services.funding.main",
        {
            "DATABASE_URL": database_url,
            "CEX_MESH_ADDR": stack.edge,
            "CEX_JWKS_URL": stack.ports.jwks_url,
            "CEX_SERVICE_SECRET": stack.service_secret,
            "FUNDING_OUTBOX": "off",
            **env,
            "NATS_URL": "",
        },
        may_exit_at_start=True,
    )
