"""Crash conservation: clients keep sending transfers while the balance owner (match's
writer, which applies them: ADR 0013) and the ledger in front of it are killed with
SIGKILL, in turn, and restarted; the clients retry with the same ids. Afterwards every
acknowledged transfer is there exactly once, the failures stay failures, every
asset sums to zero and balances equal the replay of transfers.

The short run is part of `make test`; the issue's full run (32 clients, 10,000
transfers, 1,000 accounts, one hot, >= 10 kills) is `make test-chaos`.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import asyncpg
import grpc
import pytest

from cex.ledger.v1 import ledger_pb2 as K
from cex.ledger.v1 import ledger_pb2_grpc
from tests.conftest import Trust
from tests.integration.ledger.support import deposit, reason, transfer
from tests.process import ServiceProcess

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


def processes(
    database_url: str, nats_url: str, trust: Trust
) -> tuple[ServiceProcess, ServiceProcess]:
    """`python -m services.match.main` (the balance owner) and `python -m
    services.ledger.main` (no audits) in front of it; `async with` each to run it."""
    env = {"DATABASE_URL": database_url, "NATS_URL": nats_url, **trust.env}
    match = ServiceProcess("services.match.main", env)
    ledger = ServiceProcess(
        "services.ledger.main",
        {
            **env,
            "LEDGER_AUDIT_INTERVAL_S": "0",
            "LEDGER_MATCH_TARGET": match.target,
            "CEX_MESH_ADDR": trust.edge,  # for its service token only
        },
    )
    return match, ledger


# Over ruff's complexity limit on purpose: the crash driver: load, kill, restart and check in one
# loop.
async def crash_run(  # noqa: C901
    database_url: str,
    nats_url: str,
    trust: Trust,
    *,
    clients: int,
    transfers: int,
    accounts: int,
    kills: int,
    batch: int,
) -> None:
    rng = random.Random(2026)
    users = [f"acct-{i}" for i in range(accounts)]
    hot = users[0]
    match, ledger = processes(database_url, nats_url, trust)
    async with match, ledger:
        channel = trust.channel(f"127.0.0.1:{ledger.port}")
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def send(items: list[K.Transfer]) -> list[K.CreateTransferResult]:
            while True:
                try:
                    reply = await stub.CreateTransfers(
                        K.CreateTransfersRequest(transfers=items), timeout=5, wait_for_ready=True
                    )
                    return list(reply.results)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    await asyncio.sleep(0.05)

        for start in range(0, accounts, 500):
            await send([deposit(f"seed-{u}", u, "100") for u in users[start : start + 500]])
        work: list[K.Transfer] = []
        for i in range(transfers):
            a, b = rng.sample(users, 2)
            if rng.random() < 0.3:  # one hot account in a third of the transfers
                a, b = (hot, b) if rng.random() < 0.5 else (a, hot)
                if a == b:
                    continue
            work.append(transfer(f"x{i}", a, b, f"{rng.randint(1, 4000)}.{rng.randint(0, 99)}"))
        queue: asyncio.Queue[list[K.Transfer]] = asyncio.Queue()
        for start in range(0, len(work), batch):
            queue.put_nowait(work[start : start + batch])
        acknowledged: dict[str, str] = {}
        expected = {t.id: t for t in work}

        async def client() -> None:
            while not queue.empty():
                items = queue.get_nowait()
                # Resend the request until a definite answer, like a real client.
                for t, result in zip(items, await send(items), strict=True):
                    acknowledged[t.id] = reason(result)

        async def killer() -> None:
            step = len(work) // (kills + 1)
            for k in range(1, kills + 1):
                while len(acknowledged) < k * step and not queue.empty():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                victim = match if k % 2 else ledger  # the balance owner first
                await victim.kill()
                await victim.start()

        await asyncio.gather(killer(), *(client() for _ in range(clients)))
        assert match.kills + ledger.kills == kills
        assert match.kills >= 1
        assert len(acknowledged) == len(work)
        assert set(acknowledged.values()) <= {"", "LEDGER_INSUFFICIENT_FUNDS"}
        # Retrying every id once more after the chaos returns the same answers.
        retried = await send(work[:1000])
        assert [reason(r) for r in retried] == [acknowledged[t.id] for t in work[:1000]]
        audit = await stub.AuditLedger(K.AuditLedgerRequest(), timeout=30)
        assert audit.balanced, audit
        await channel.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, amount FROM ledger.transfers WHERE id LIKE 'x%'")
        failed = await conn.fetch("SELECT id, reason FROM ledger.failed_transfers")
        sums = await conn.fetch(
            "SELECT asset, sum(credits_posted - debits_posted) AS s FROM ledger.accounts"
            " GROUP BY asset"
        )
    finally:
        await conn.close()
    stored = {r["id"]: r["amount"] for r in rows}
    ok = {tid for tid, why in acknowledged.items() if not why}
    assert set(stored) == ok  # every acknowledged transfer present, nothing else applied
    for tid in ok:
        assert stored[tid] == int(Decimal(expected[tid].amount).scaleb(8))
    assert {r["id"] for r in failed} == {tid for tid, why in acknowledged.items() if why}
    assert all(r["s"] == 0 for r in sums)


async def test_crash_conservation_short(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> None:
    await crash_run(
        fresh_database_url,
        private_nats,
        trust,
        clients=8,
        transfers=1500,
        accounts=100,
        kills=2,
        batch=5,
    )


@pytest.mark.chaos
async def test_crash_conservation_full(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> None:
    await crash_run(
        fresh_database_url,
        private_nats,
        trust,
        clients=32,
        transfers=10_000,
        accounts=1000,
        kills=10,
        batch=1,
    )
