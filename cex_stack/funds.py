"""A real deposit on the local stack, as `cex deposit` and scripts make one.

The money takes the path it takes in production: funding hands out the
account's deposit address, an outside sender (here the chain simulator's
`Deposit`, standing for a wallet) pays it, the chain confirms it block by
block, funding's watcher and deposit saga credit it once the asset's
confirmations are in, and the ledger shows it. Nothing is written to the
ledger by hand (operators cannot: ledger transfers are for services).

    async with Client(grpc.aio.insecure_channel(edge), key_id, secret) as client:
        done = await deposit(client, chain_target, "USDT", "1000")
        print(done.balance.available)

`client` is any `cex_sdk.Client`: a user's key with scope `read` deposits to
its own account; the stack's operator (`svc:cli`, what `cex` uses) names one
with `account_id`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cex.funding.v1 import funding_pb2 as F
from cex.ledger.v1 import ledger_pb2 as L
from cex_sdk import Client

__all__ = ["DepositFailed", "Deposited", "chain_deposit", "deposit"]

_FUNDING = "/cex.funding.v1.FundingService/"
_FINAL = (F.DEPOSIT_STATE_CANCELLED, F.DEPOSIT_STATE_REJECTED)


class DepositFailed(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Deposited:
    deposit: F.Deposit
    balance: L.Balance


async def chain_deposit(chain_target: str, address: str, asset: str, amount: str) -> str:
    """An outside sender pays `amount` of `asset` to `address` (the simulator's
    `/chainsim.Chain/Deposit`, JSON over gRPC); returns the transaction id."""
    async with grpc.aio.insecure_channel(chain_target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[dict[str, str], dict[str, Any]]
        call = channel.unary_unary(
            "/chainsim.Chain/Deposit",
            request_serializer=lambda r: json.dumps(r).encode(),
            response_deserializer=json.loads,
        )
        reply: dict[str, Any] = await call(
            {"address": address, "asset": asset, "amount": amount}, timeout=10
        )
    return str(reply["txid"])


async def deposit(
    client: Client,
    chain_target: str,
    asset: str,
    amount: str,
    *,
    account_id: str = "",
    timeout_s: float = 120.0,
    progress: Callable[[F.Deposit], None] | None = None,
) -> Deposited:
    """Deposit `amount` of `asset` to `account_id` (empty: the client's own account)
    through the chain; returns once the ledger shows the credit. `progress` sees the
    deposit each time its confirmations change."""
    address = (
        await client.call(
            _FUNDING + "GetDepositAddress",
            F.GetDepositAddressRequest(account_id=account_id, asset=asset),
            F.GetDepositAddressResponse,
        )
    ).deposit_address
    txid = await chain_deposit(chain_target, address.address, asset, amount)
    until = time.monotonic() + timeout_s
    seen = -1
    while True:
        found = [
            d
            for d in (
                await client.call(
                    _FUNDING + "ListDeposits",
                    F.ListDepositsRequest(account_id=account_id, asset=asset),
                    F.ListDepositsResponse,
                )
            ).deposits
            if d.txid == txid
        ]
        if found:
            current = found[0]
            if progress is not None and current.confirmations != seen:
                progress(current)
            seen = current.confirmations
            if current.state == F.DEPOSIT_STATE_CREDITED:
                break
            if current.state in _FINAL:
                raise DepositFailed(
                    f"deposit {current.deposit_id} ended {F.DepositState.Name(current.state)}"
                )
        if time.monotonic() > until:
            raise DepositFailed(f"transaction {txid} was not credited within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)
    (balance,) = (
        await client.call(
            "/cex.ledger.v1.LedgerService/GetBalances",
            L.GetBalancesRequest(account_id=account_id, assets=[asset]),
            L.GetBalancesResponse,
        )
    ).balances
    return Deposited(current, balance)
