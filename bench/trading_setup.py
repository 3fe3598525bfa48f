"""Accounts, keys, tokens, funds and limits for the trading benchmarks."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis.authn import service_secret


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Account:
    account_id: str
    token: str
    key_id: str = ""
    key_secret: str = ""

    async def renewed(self, channel: grpc.aio.Channel) -> Account:
        """The same account with a fresh token (tokens live 5 minutes)."""
        reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb2.IssueTokenRequest(api_key_id=self.key_id, api_key_secret=self.key_secret),
            timeout=10,
        )
        return Account(self.account_id, reply.access_token, self.key_id, self.key_secret)


async def operator_token(edge: str, shared_secret: str) -> str:
    async with grpc.aio.insecure_channel(edge) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb2.IssueTokenRequest(
                api_key_id="svc:bench", api_key_secret=service_secret(shared_secret, "bench")
            ),
            timeout=10,
        )
    return reply.access_token


async def lift_limits(channel: grpc.aio.Channel, svc: str) -> None:
    """Exchange defaults high enough that risk does not cap the benchmark."""
    risk = risk_pb2_grpc.RiskServiceStub(channel)
    current = await risk.GetLimits(risk_pb2.GetLimitsRequest(), metadata=bearer(svc), timeout=10)
    limits = current.limits
    limits.max_orders_per_second = 1_000_000
    limits.max_open_orders = 10_000_000
    for market in limits.markets:
        market.max_open_orders = 10_000_000
    await risk.SetLimits(
        risk_pb2.SetLimitsRequest(request_id=uuid.uuid4().hex, limits=limits),
        metadata=bearer(svc),
        timeout=10,
    )


async def accounts(
    channel: grpc.aio.Channel, svc: str, n: int, funds: dict[str, str]
) -> list[Account]:
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
    out = []
    for i in range(n):
        account = await auth.CreateAccount(
            auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name=f"mm{i}"),
            metadata=bearer(svc),
            timeout=10,
        )
        account_id = account.account.account_id
        key = await auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex,
                account_id=account_id,
                label="bench",
                scopes=[auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE],
            ),
            metadata=bearer(svc),
            timeout=10,
        )
        token = await _issue_token(auth, key.api_key.api_key_id, key.secret)
        transfers = [
            ledger_pb2.Transfer(
                id=f"bench-dep-{uuid.uuid4().hex}",
                debit_account_id="sys:custody",
                credit_account_id=account_id,
                asset=asset,
                amount=amount,
                kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
            )
            for asset, amount in funds.items()
        ]
        reply = await ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(transfers=transfers), metadata=bearer(svc), timeout=10
        )
        assert all(r.status.code == 0 for r in reply.results), reply
        out.append(Account(account_id, token.access_token, key.api_key.api_key_id, key.secret))
    return out


async def _issue_token(
    auth: auth_pb2_grpc.AuthServiceStub, key_id: str, secret: str
) -> auth_pb2.IssueTokenResponse:
    """IssueToken, waiting out the edge's token-endpoint limit (10 a second per address)
    when many accounts are made at once."""
    for attempt in range(30):
        try:
            reply: auth_pb2.IssueTokenResponse = await auth.IssueToken(
                auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret), timeout=10
            )
            return reply
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 29:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")
