"""Users of the CCXT class on the real stack: an account, an API key (key id and
secret, as CCXT takes them), money deposited through the chain simulator, and
cexcore instances (sync and async) pointed at the stack's edge.

BTC-USDT stays within 95..105 (the trading tests' convention, inside risk's
band); every test's users cancel what they leave working."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex_ccxt import async_support, cexcore
from cex_sdk import Client
from cex_stack.funds import deposit
from cex_stack.supervisor import Stack
from services.chassis import ServiceCredentials

READ, TRADE, WITHDRAW = (
    auth_pb2.API_KEY_SCOPE_READ,
    auth_pb2.API_KEY_SCOPE_TRADE,
    auth_pb2.API_KEY_SCOPE_WITHDRAW,
)


@dataclass(frozen=True)
class User:
    account_id: str
    key_id: str
    secret: str
    edge: str

    @property
    def config(self) -> dict[str, str]:
        return {"apiKey": self.key_id, "secret": self.secret, "hostname": self.edge}

    def sync(self) -> cexcore:
        return cexcore(self.config)

    def aio(self) -> async_support.cexcore:
        return async_support.cexcore(self.config)


MakeUser = Callable[..., Awaitable[User]]


async def _operator_md(credentials: ServiceCredentials) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {await credentials.token()}"),)


@pytest.fixture
async def make_user(
    stack: Stack, service_credentials: ServiceCredentials
) -> AsyncIterator[MakeUser]:
    """make_user(funds={"USDT": "1000"}, withdraw=False): a new account with a key
    (read, trade, and withdraw from loopback if asked), funded by real deposits."""
    made: list[User] = []
    chain = f"{stack.ports.host}:{stack.ports.chainsim}"

    async def make(funds: dict[str, str] | None = None, *, withdraw: bool = False) -> User:
        md = await _operator_md(service_credentials)
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            account = await auth.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="ccxt"),
                metadata=md,
                timeout=10,
            )
            account_id = account.account.account_id
            key = await auth.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(
                    request_id=uuid.uuid4().hex,
                    account_id=account_id,
                    label="ccxt",
                    scopes=[READ, TRADE, WITHDRAW] if withdraw else [READ, TRADE],
                    allowed_cidrs=["127.0.0.1/32"] if withdraw else [],
                ),
                metadata=md,
                timeout=10,
            )
        user = User(account_id, key.api_key.api_key_id, key.secret, stack.edge)
        if funds:
            async with Client.from_api_key(stack.edge, user.key_id, user.secret) as client:
                await asyncio.gather(
                    *(deposit(client, chain, asset, amount) for asset, amount in funds.items())
                )
        made.append(user)
        return user

    yield make
    for user in made:
        exchange = user.aio()
        try:
            await exchange.cancel_all_orders()
        finally:
            await exchange.close()


@pytest.fixture
def audit(service_credentials: ServiceCredentials, stack: Stack) -> Callable[[], Awaitable[bool]]:
    """The ledger's AuditLedger as the operator: True once it reports balanced
    (the projection may lag the last trades by moments)."""

    async def balanced() -> bool:
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            for _ in range(60):
                reply = await ledger.AuditLedger(
                    ledger_pb2.AuditLedgerRequest(),
                    metadata=await _operator_md(service_credentials),
                    timeout=30,
                )
                if reply.balanced:
                    return True
                await asyncio.sleep(0.5)
            return False

    return balanced
