"""Crash conservation: clients keep sending transfers while the ledger process is
killed with SIGKILL and restarted; they retry with the same ids. Afterwards every
acknowledged transfer is there exactly once, the failures stay failures, every
asset sums to zero and balances equal the replay of transfers.

The short run is part of `make test`; the issue's full run (32 clients, 10,000
transfers, 1,000 accounts, one hot, >= 10 kills) is `make test-chaos`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex.ledger.v1 import ledger_pb2 as K
from cex.ledger.v1 import ledger_pb2_grpc
from services.stack.topology import free_ports
from tests.conftest import Trust
from tests.integration.ledger.support import deposit, reason, transfer

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


@dataclass
class LedgerProcess:
    """`python -m services.ledger.main` on a fixed port, killable with SIGKILL."""

    database_url: str
    trust: Trust
    port: int = field(default_factory=lambda: free_ports().edge)
    process: asyncio.subprocess.Process | None = None
    kills: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        env = {
            **os.environ,
            "CEX_GRPC_PORT": str(self.port),
            "DATABASE_URL": self.database_url,
            "LEDGER_SETTLEMENT": "off",
            "LEDGER_AUDIT_INTERVAL_S": "0",
            "CEX_LOG_LEVEL": "WARNING",
        }
        env.pop("NATS_URL", None)
        env.update(self.trust.env)
        env.update(self.extra_env)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.ledger.main", env=env
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError("ledger did not come up")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.kills += 1

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def ledger_process(
    database_url: str, trust: Trust, extra_env: dict[str, str] | None = None
) -> AsyncIterator[LedgerProcess]:
    running = LedgerProcess(database_url, trust, extra_env=extra_env or {})
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def crash_run(
    database_url: str,
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
    async with ledger_process(database_url, trust) as ledger:
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
                await ledger.kill()
                await ledger.start()

        await asyncio.gather(killer(), *(client() for _ in range(clients)))
        assert ledger.kills == kills
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


async def test_crash_conservation_short(fresh_database_url: str, trust: Trust) -> None:
    await crash_run(
        fresh_database_url, trust, clients=8, transfers=1500, accounts=100, kills=2, batch=5
    )


@pytest.mark.chaos
async def test_crash_conservation_full(fresh_database_url: str, trust: Trust) -> None:
    await crash_run(
        fresh_database_url, trust, clients=32, transfers=10_000, accounts=1000, kills=10, batch=1
    )
