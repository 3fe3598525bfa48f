"""Helpers for the ledger's integration tests: an in-process ledger, transfer
builders and error decoding."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2

from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.match.v1 import match_pb2_grpc
from services.chassis import ChassisSettings, ErrorDetails, Server
from services.ledger.config import LedgerConfig
from services.ledger.server import build_server
from services.match.server import build_server as build_match
from tests.conftest import Trust

K = ledger_pb2


@dataclass
class Ledger:
    server: Server
    stub: ledger_pb2_grpc.LedgerServiceStub
    channel: grpc.aio.Channel
    database_url: str
    match: match_pb2_grpc.MatchServiceStub  # the balance owner beside it

    async def create(
        self, *transfers: ledger_pb2.Transfer
    ) -> list[ledger_pb2.CreateTransferResult]:
        response = await self.stub.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(transfers=list(transfers))
        )
        return list(response.results)

    async def ok(self, *transfers: ledger_pb2.Transfer) -> list[ledger_pb2.Transfer]:
        results = await self.create(*transfers)
        bad = [(r.id, r.status) for r in results if r.status.code != 0]
        assert not bad, bad
        return [r.transfer for r in results]

    async def balance(self, account: str, asset: str) -> ledger_pb2.Balance:
        response = await self.stub.GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=account, assets=[asset])
        )
        assert len(response.balances) == 1
        return response.balances[0]

    async def available(self, account: str, asset: str) -> str:
        return (await self.balance(account, asset)).available

    async def audit(self) -> ledger_pb2.AuditLedgerResponse:
        return await self.stub.AuditLedger(ledger_pb2.AuditLedgerRequest())


@contextlib.asynccontextmanager
async def running_ledger(
    database_url: str,
    trust: Trust,
    nats_url: str,
    *,
    config: LedgerConfig | None = None,
) -> AsyncIterator[Ledger]:
    """A ledger of the test's own and, beside it, the balance owner it sends its
    transfers to: match's writer (ADR 0013), in this process, on the same database
    and on `nats_url` (the test's private NATS: its events go nowhere else)."""

    def settings(service: str) -> ChassisSettings:
        return ChassisSettings(
            service=service,
            database_url=database_url,
            nats_url=nats_url,
            jwks_url=trust.jwks_url,
            service_secret=trust.service_secret,
            mesh_addr=trust.edge,  # where its service token comes from
        )

    match = await build_match(settings("match"))
    match_port = await match.start()
    server = await build_server(
        settings("ledger"),
        config=config or LedgerConfig(audit_interval_s=0),
        match_target=f"127.0.0.1:{match_port}",
    )
    port = await server.start()
    channel = trust.channel(f"127.0.0.1:{port}")
    match_channel = trust.channel(f"127.0.0.1:{match_port}")
    try:
        yield Ledger(
            server,
            ledger_pb2_grpc.LedgerServiceStub(channel),
            channel,
            database_url,
            match_pb2_grpc.MatchServiceStub(match_channel),
        )
    finally:
        await match_channel.close()
        await channel.close()
        await server.stop(0.5)
        await match.stop(0.5)


def deposit(tid: str, account: str, amount: str, asset: str = "USDT") -> ledger_pb2.Transfer:
    return K.Transfer(
        id=tid,
        debit_account_id="sys:custody",
        credit_account_id=account,
        asset=asset,
        amount=amount,
        kind=K.TRANSFER_KIND_DEPOSIT,
        reference=tid,
    )


def transfer(
    tid: str,
    debit: str,
    credit: str,
    amount: str,
    asset: str = "USDT",
    *,
    linked: bool = False,
    kind: int = K.TRANSFER_KIND_ADJUSTMENT,
) -> ledger_pb2.Transfer:
    return K.Transfer(
        id=tid,
        debit_account_id=debit,
        credit_account_id=credit,
        asset=asset,
        amount=amount,
        kind=kind,  # type: ignore[arg-type]
        flags=K.TransferFlags(linked=linked),
    )


def hold(
    tid: str,
    account: str,
    amount: str,
    asset: str = "USDT",
    *,
    timeout_s: float | None = None,
    credit: str = "sys:orders",
    kind: int = K.TRANSFER_KIND_ORDER_HOLD,
    reference: str = "",
) -> ledger_pb2.Transfer:
    t = K.Transfer(
        id=tid,
        debit_account_id=account,
        credit_account_id=credit,
        asset=asset,
        amount=amount,
        kind=kind,  # type: ignore[arg-type]
        reference=reference,
        flags=K.TransferFlags(pending=True),
    )
    if timeout_s is not None:
        t.timeout.CopyFrom(
            duration_pb2.Duration(
                nanos=int(timeout_s * 1e9) % 1_000_000_000, seconds=int(timeout_s)
            )
        )
    return t


def post(tid: str, pending_id: str, amount: str = "") -> ledger_pb2.Transfer:
    return K.Transfer(
        id=tid, pending_id=pending_id, amount=amount, flags=K.TransferFlags(post_pending=True)
    )


def void(tid: str, pending_id: str) -> ledger_pb2.Transfer:
    return K.Transfer(id=tid, pending_id=pending_id, flags=K.TransferFlags(void_pending=True))


def reason(result: ledger_pb2.CreateTransferResult) -> str:
    return ErrorDetails.from_status(result.status).reason if result.status.code else ""


def reasons(results: Sequence[ledger_pb2.CreateTransferResult]) -> list[str]:
    return [reason(r) for r in results]


async def rpc_error(call: object) -> ErrorDetails:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return ErrorDetails.from_rpc_error(error)
    raise AssertionError("the call succeeded")
