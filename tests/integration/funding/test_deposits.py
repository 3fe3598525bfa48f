"""Deposits end to end: addresses from custody, the chain watcher, confirmations,
reverted transactions, duplicate notifications and the ledger credit, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import grpc
import pytest

from cex.funding.v1 import funding_pb2 as F
from cex_stack.supervisor import Stack
from tests.conftest import Trust
from tests.integration.funding.support import (
    Chain,
    Funding,
    chainsim,
    fresh_database,
    funding_config,
    new_account,
    rpc_error,
    running_funding,
)
from tests.integration.ledger.support import Ledger, running_ledger


@dataclass
class World:
    funding: Funding
    ledger: Ledger
    chain: Chain


@pytest.fixture(scope="module")
async def world(stack: Stack, trust: Trust, module_nats: str) -> AsyncIterator[World]:
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, module_nats) as ledger,
        chainsim(seed=5, block_s=0.05) as chain,
        running_funding(
            stack,
            trust,
            database_url,
            funding_config(f"127.0.0.1:{ledger.server.port}", chain.target),
        ) as funding,
    ):
        yield World(funding, ledger, chain)


async def _address(world: World, account: str, asset: str) -> str:
    reply = await world.funding.stub.GetDepositAddress(
        F.GetDepositAddressRequest(account_id=account, asset=asset)
    )
    return reply.deposit_address.address


async def _deposits(world: World, account: str) -> list[F.Deposit]:
    reply = await world.funding.stub.ListDeposits(F.ListDepositsRequest(account_id=account))
    return list(reply.deposits)


async def _settled(world: World, account: str, count: int, within_s: float = 20) -> list[F.Deposit]:
    until = time.monotonic() + within_s
    while True:
        found = await _deposits(world, account)
        if len(found) >= count and all(d.state != F.DEPOSIT_STATE_PENDING for d in found):
            return found
        assert time.monotonic() < until, found
        await asyncio.sleep(0.05)


async def test_an_address_is_stable_per_account_and_asset(world: World) -> None:
    acct = new_account()
    btc = await _address(world, acct, "BTC")
    assert btc.startswith("bcrt1q") and btc == await _address(world, acct, "BTC")
    eth = await _address(world, acct, "ETH")
    assert eth.startswith("0x") and eth != await _address(world, new_account(), "ETH")
    bad = await rpc_error(
        world.funding.stub.GetDepositAddress(
            F.GetDepositAddressRequest(account_id=acct, asset="DOGE")
        )
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FUNDING_ASSET_UNSUPPORTED")


async def test_a_deposit_is_credited_once_after_its_confirmations(world: World) -> None:
    acct = new_account()
    address = await _address(world, acct, "BTC")
    txid = await world.chain.deposit(address, "BTC", "0.25")
    (deposit,) = await _settled(world, acct, 1)
    assert deposit.state == F.DEPOSIT_STATE_CREDITED and deposit.txid == txid
    assert deposit.confirmations >= deposit.required_confirmations == 3
    assert deposit.ledger_transfer_id == f"dep:bitcoin:{txid}:0"
    assert await world.ledger.available(acct, "BTC") == "0.25"
    got = await world.funding.stub.GetDeposit(
        F.GetDepositRequest(account_id=acct, deposit_id=deposit.deposit_id),
    )
    # Confirmations keep arriving after the credit; the rest is fixed.
    assert (got.deposit.deposit_id, got.deposit.state, got.deposit.ledger_transfer_id) == (
        deposit.deposit_id,
        deposit.state,
        deposit.ledger_transfer_id,
    )
    other = await rpc_error(
        world.funding.stub.GetDeposit(
            F.GetDepositRequest(account_id=new_account(), deposit_id=deposit.deposit_id),
        )
    )
    assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "FUNDING_DEPOSIT_NOT_FOUND")


async def test_reverts_and_duplicates_credit_each_output_at_most_once(world: World) -> None:
    await world.chain.configure(revert=0.5, duplicate=1.0)
    try:
        acct = new_account()
        address = await _address(world, acct, "ETH")
        txids = [await world.chain.deposit(address, "ETH", f"0.0{i + 1}") for i in range(8)]
        found = await _settled(world, acct, len(txids))
    finally:
        await world.chain.configure()
    by_tx = {d.txid: d for d in found}
    assert set(by_tx) == set(txids) and len(found) == len(txids)  # duplicates: one deposit
    events = (await world.chain.call("Events", {"after": 0, "limit": 100000}))["events"]
    reverted = {e["txid"] for e in events if e["status"] == "reverted"}
    assert reverted & set(txids) and set(txids) - reverted  # both kinds happened
    credited = Decimal(0)
    for txid, d in by_tx.items():
        if txid in reverted:
            assert d.state == F.DEPOSIT_STATE_CANCELLED and not d.ledger_transfer_id
        else:
            assert d.state == F.DEPOSIT_STATE_CREDITED
            credited += Decimal(d.amount)
    conn = await asyncpg.connect(world.funding.database_url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM ledger.transfers WHERE kind = 1 AND credit_account_id = $1", acct
        )
    finally:
        await conn.close()
    assert len(rows) == sum(1 for t in txids if t not in reverted)
    available = await world.ledger.available(acct, "ETH")
    assert Decimal(available) == credited
    assert (await world.ledger.audit()).balanced
