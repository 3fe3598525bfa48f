"""Stopping and starting the stack on the same state directory loses nothing and
breaks nothing (issue 18): a whole Stack of its own on a temporary state
directory is funded, stopped, started again, and then deposits, trades (two
crossing orders through the SDK) and withdraws; balances and the audit agree.

Before the chain simulator kept its chain, the second start began a new chain
while funding's cursor stayed in the old one, and no deposit was credited again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from pathlib import Path

import grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.funding.v1 import funding_pb2 as F
from cex.ledger.v1 import ledger_pb2 as L
from cex.type.v1.types_pb2 import ORDER_STATE_FILLED, ORDER_STATE_OPEN, SIDE_BUY, SIDE_SELL
from cex_sdk import Client
from cex_stack.funds import deposit
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from tests.integration.funding.support import ETH_ADDRESS

_FUNDING = "/cex.funding.v1.FundingService/"


async def _user(stack: Stack, name: str) -> tuple[str, str, str]:
    """An account and its API key (read, trade, withdraw, admin): id, secret."""
    operator = (("authorization", f"Bearer {await stack.credentials('tests').token()}"),)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        account = (
            await auth.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name=name),
                metadata=operator,
                timeout=10,
            )
        ).account.account_id
        key = await auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex,
                account_id=account,
                scopes=[
                    auth_pb2.API_KEY_SCOPE_READ,
                    auth_pb2.API_KEY_SCOPE_TRADE,
                    auth_pb2.API_KEY_SCOPE_WITHDRAW,
                    auth_pb2.API_KEY_SCOPE_ADMIN,  # for the audit
                ],
                allowed_cidrs=["0.0.0.0/0"],
            ),
            metadata=operator,
            timeout=10,
        )
    return account, key.api_key.api_key_id, key.secret


async def _balances(client: Client) -> dict[str, Decimal]:
    return {b.asset: Decimal(b.available) for b in await client.ledger.get_balances()}


async def _until(what: str, check: object, within_s: float = 30) -> None:
    until = time.monotonic() + within_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < until, what
        await asyncio.sleep(0.1)


async def test_a_restarted_stack_deposits_trades_and_withdraws(tmp_path: Path) -> None:
    env = embedded_env()
    state, ports = tmp_path / "cex", free_ports()
    chain = f"{ports.host}:{ports.chainsim}"
    stack = Stack(state, ports, env)
    first = await stack.start()
    try:
        alice = await _user(stack, "alice")
        bob = await _user(stack, "bob")
        async with (
            Client.from_api_key(stack.edge, *alice[1:]) as a,
            Client.from_api_key(stack.edge, *bob[1:]) as b,
        ):
            await deposit(a, chain, "USDT", "1000")
            await deposit(b, chain, "BTC", "1")
    finally:
        await stack.stop()
    assert not (state / "stack.json").exists()
    assert (state / "chainsim" / "chain.json").exists()

    stack = Stack(state, ports, env)
    second = await stack.start()
    try:
        async with (
            Client.from_api_key(stack.edge, *alice[1:]) as a,  # the same keys: auth kept them
            Client.from_api_key(stack.edge, *bob[1:]) as b,
        ):
            # Nothing was lost...
            assert (await _balances(a))["USDT"] == 1000
            assert (await _balances(b))["BTC"] == 1
            # ... and deposits are credited again (the chain went on where it was).
            credited = await deposit(a, chain, "USDT", "500")
            assert credited.balance.available == "1500"
            # A trade: bob rests an ask, alice crosses it.
            ask = await b.orders.place("BTC-USDT", SIDE_SELL, "0.5", price="100")
            assert ask.state == ORDER_STATE_OPEN, ask
            bid = await a.orders.place("BTC-USDT", SIDE_BUY, "0.5", price="100")

            async def filled() -> bool:
                got = await b.orders.get(ask.order_id)
                return got.state == ORDER_STATE_FILLED

            await _until("bob's ask filled", filled)
            assert (await a.orders.get(bid.order_id)).state == ORDER_STATE_FILLED

            async def settled() -> bool:
                return (await _balances(a)).get("BTC", Decimal(0)) > 0

            await _until("the trade settled in the ledger", settled)
            # A withdrawal, to completion.
            w = (
                await a.call(
                    _FUNDING + "RequestWithdrawal",
                    F.RequestWithdrawalRequest(
                        request_id=uuid.uuid4().hex,
                        asset="USDT",
                        amount="100",
                        address=ETH_ADDRESS,
                    ),
                    F.RequestWithdrawalResponse,
                )
            ).withdrawal

            async def completed() -> bool:
                got = (
                    await a.call(
                        _FUNDING + "GetWithdrawal",
                        F.GetWithdrawalRequest(withdrawal_id=w.withdrawal_id),
                        F.GetWithdrawalResponse,
                    )
                ).withdrawal
                assert got.state in (
                    F.WITHDRAWAL_STATE_PENDING,
                    F.WITHDRAWAL_STATE_BROADCAST,
                    F.WITHDRAWAL_STATE_COMPLETED,
                ), got
                return got.state == F.WITHDRAWAL_STATE_COMPLETED

            await _until("the withdrawal completed", completed, within_s=60)
            # Alice took bob's ask: she paid 50 USDT for 0.5 BTC less the taker fee (in
            # BTC, the asset she received), withdrew 100 USDT and paid its fee, all as
            # GetFees says.
            fees = await a.auth.get_fees()
            usdt_terms = next(x for x in fees.assets if x.asset == "USDT")
            balances = await _balances(a)
            assert balances["USDT"] == 1500 - 50 - 100 - Decimal(usdt_terms.withdrawal_fee)
            assert balances["BTC"] == Decimal("0.5") * (1 - Decimal(fees.taker_fee_rate))
            audit = await a.call(
                "/cex.ledger.v1.LedgerService/AuditLedger",
                L.AuditLedgerRequest(),
                L.AuditLedgerResponse,
                timeout_s=60,
            )
            assert audit.balanced, audit
    finally:
        await stack.stop()
    print(f"stack start: first {first:.1f}s, again on the same state {second:.1f}s")
