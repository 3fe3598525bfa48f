"""The chain outlives its simulator's process, and a chain that went back behind the
deposit watcher's cursor is a reported deep reorg, not a watcher waiting forever
(issue 18: every restart of the stack used to start a new chain)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

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
    running_funding,
)
from tests.integration.ledger.support import running_ledger


async def _address(funding: Funding, account: str) -> str:
    reply = await funding.stub.GetDepositAddress(
        F.GetDepositAddressRequest(account_id=account, asset="USDT")
    )
    return reply.deposit_address.address


async def _credited(funding: Funding, account: str, count: int, within_s: float = 30) -> None:
    until = time.monotonic() + within_s
    while True:
        found = (
            await funding.stub.ListDeposits(F.ListDepositsRequest(account_id=account))
        ).deposits
        if len(found) >= count and all(d.state == F.DEPOSIT_STATE_CREDITED for d in found):
            return
        assert time.monotonic() < until, found
        await asyncio.sleep(0.05)


async def _anomalies(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch("SELECT * FROM funding.chain_anomalies ORDER BY id"))
    finally:
        await conn.close()


async def _restart(chain: Chain) -> None:
    await chain.stop()  # SIGKILL: nothing is flushed at exit
    await chain.start()


async def test_a_kept_chain_survives_kill_9_and_deposits_go_on_being_credited(
    stack: Stack, trust: Trust, private_nats: str, tmp_path: Path
) -> None:
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, private_nats) as ledger,
        chainsim(seed=11, block_s=0.05, state_dir=str(tmp_path / "chain")) as chain,
        running_funding(
            stack, trust, database_url, funding_config(f"127.0.0.1:{ledger.server.port}",
                                                       chain.target)
        ) as funding,
    ):  # fmt: skip
        account = new_account()
        address = await _address(funding, account)
        await chain.deposit(address, "USDT", "5")
        await _credited(funding, account, 1)
        before = await chain.stats()
        await _restart(chain)
        after = await chain.stats()
        assert after["height"] >= before["height"] and after["last_seq"] >= before["last_seq"]
        await chain.deposit(address, "USDT", "5")  # the same address and amount, a new tx
        await _credited(funding, account, 2)
        assert await _anomalies(database_url) == []
        assert (await ledger.balance(account, "USDT")).available == "10"


async def test_a_chain_behind_the_cursor_is_a_reported_deep_reorg_and_reading_goes_on(
    stack: Stack, trust: Trust, private_nats: str
) -> None:
    registry = CollectorRegistry()
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, private_nats) as ledger,
        chainsim(seed=12, block_s=0.05) as chain,  # in memory: a restart is a new chain
        running_funding(
            stack, trust, database_url, funding_config(f"127.0.0.1:{ledger.server.port}",
                                                       chain.target), registry=registry
        ) as funding,
    ):  # fmt: skip
        account = new_account()
        address = await _address(funding, account)
        await chain.deposit(address, "USDT", "3")
        await _credited(funding, account, 1)
        await asyncio.sleep(1)  # the watcher reads every confirmation of it
        await _restart(chain)
        until = time.monotonic() + 20
        while not (found := await _anomalies(database_url)):
            assert time.monotonic() < until, "the watcher never reported the chain behind it"
            await asyncio.sleep(0.05)
        (anomaly,) = found
        assert anomaly["kind"] == "CHAIN_BEHIND_CURSOR"
        assert anomaly["chain_seq"] < anomaly["cursor_seq"]
        assert (
            registry.get_sample_value(
                "funding_chain_anomalies_total", {"kind": "CHAIN_BEHIND_CURSOR"}
            )
            == 1
        )
        # The new chain knows nothing of the old one's addresses; custody hands out the
        # same one again (the simulator derives it from the owner), and a deposit to it
        # is read from the new chain: the watcher did not stay beyond the tip.
        assert await chain.call(
            "NewAddress", {"account_id": account, "asset": "USDT", "network": "ethereum"}
        ) == {"address": address}
        await chain.deposit(address, "USDT", "4")
        await _credited(funding, account, 2)
        assert (await ledger.balance(account, "USDT")).available == "7"
