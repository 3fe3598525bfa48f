"""make bench-risk: CheckOrder throughput and latency through risk's gRPC server.

Starts the local stack (for its PostgreSQL, Redis and auth's JWKS), creates an
empty database, seeds a reference price for BTC-USDT (so price bands run), then:

1. in-process: `build_server` in this process (the chassis server with its
   interceptors, token verification included) and the load generator on the
   same event loop, over one channel;
2. own process: `python -m services.risk.main` as `cex up` runs it, called with
   a real service token from auth;
3. the Redis token bucket alone (one EVALSHA of ratelimit.lua from redis-py);
and, for scale, grpc.health Check on the in-process server (the bare cost of a
call on this machine at that moment).

Each run: `--checks` CheckOrder calls spread over `--accounts` accounts (so the
default 100/s per-account limit is not what is measured), `--clients`
concurrent callers, and the same again with one caller (latency without
queueing). Also printed: the CPU time this process spent per call (for
in-process runs that is client and server together, a figure far less at the
mercy of a shared machine than calls/s). Every check is a full one:
validation, rate limit in Redis, kill switches, quantity/notional limits, band,
open orders. The load generator shares the machine's cores with what it
measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.risk.v1 import risk_pb2 as R
from cex.risk.v1 import risk_pb2_grpc
from cex.type.v1 import types_pb2 as T
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis import ChassisSettings, ServiceCredentials
from services.chassis.tokens import StaticKeys, sign
from services.risk.bucket import SCRIPT
from services.risk.config import RiskConfig
from services.risk.server import build_server


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _requests(n: int, accounts: int, rng: random.Random) -> list[R.CheckOrderRequest]:
    out = []
    for i in range(n):
        out.append(
            R.CheckOrderRequest(
                account_id=f"bench-{rng.randrange(accounts)}",
                market="BTC-USDT",
                action=R.ORDER_ACTION_PLACE,
                order_id=f"o{i}",
                side=T.SIDE_BUY if i % 2 else T.SIDE_SELL,
                type=T.ORDER_TYPE_LIMIT,
                price=f"{rng.randint(95_000, 105_000)}.{rng.randint(0, 99):02d}",
                quantity=f"0.{rng.randint(1, 99_999):05d}",
                open_orders=rng.randint(0, 50),
                market_open_orders=rng.randint(0, 10),
            )
        )
    return out


async def _load(
    call: Callable[[R.CheckOrderRequest], Awaitable[R.CheckOrderResponse]],
    requests: list[R.CheckOrderRequest],
    clients: int,
) -> tuple[float, list[float], int]:
    queue = list(reversed(requests))
    latencies: list[float] = []
    denied = 0

    async def client() -> None:
        nonlocal denied
        while queue:
            request = queue.pop()
            began = time.perf_counter()
            reply = await call(request)
            latencies.append(time.perf_counter() - began)
            denied += not reply.allowed

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - began, sorted(latencies), denied


async def _measure(
    label: str,
    call: Callable[[R.CheckOrderRequest], Awaitable[R.CheckOrderResponse]],
    args: argparse.Namespace,
    rng: random.Random,
) -> None:
    await _load(call, _requests(500, args.accounts, rng), args.clients)  # warm up
    for clients, n in ((args.clients, args.checks), (1, max(args.checks // 10, 100))):
        requests = _requests(n, args.accounts, rng)
        cpu = time.process_time()
        elapsed, latencies, denied = await _load(call, requests, clients)
        cpu_ms = (time.process_time() - cpu) / n * 1000
        print(
            f"{label:>12}: {n / elapsed:8.0f} checks/s  "
            f"p50 {_percentile(latencies, 0.5) * 1000:6.2f} ms  "
            f"p99 {_percentile(latencies, 0.99) * 1000:6.2f} ms  "
            f"CPU of this process {cpu_ms:5.2f} ms/call  "
            f"({n} checks, {clients} concurrent, {denied} denied)"
        )


@contextlib.asynccontextmanager
async def _database(stack: Stack) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.admin_database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    yield stack.database_url.rsplit("/", 1)[0] + f"/{name}"


async def _seed_price(url: str) -> None:
    conn = await asyncpg.connect(url, server_settings={"search_path": "risk"})
    try:
        await conn.execute(
            "INSERT INTO reference_prices VALUES ('BTC-USDT', 10000000, 1, now())"
        )  # 100,000.00 in ticks of 0.01
        await conn.execute("UPDATE meta SET change_seq = change_seq + 1")
    finally:
        await conn.close()


async def _in_process(stack: Stack, args: argparse.Namespace, rng: random.Random) -> None:
    key = Ed25519PrivateKey.generate()
    public = {"k1": key.public_key()}
    async with _database(stack) as url:
        settings = ChassisSettings(service="risk", database_url=url, redis_url=stack.redis_url)
        server = await build_server(
            settings,
            config=RiskConfig(prices=False, redis_prefix=f"bench:{uuid.uuid4().hex[:6]}:"),
            keys=StaticKeys(lambda: public),
        )
        await _seed_price(url)
        port = await server.start()
        token = sign(key, "k1", subject="svc:order", key_id="svc:order", scopes=["internal"],
                     issued_at=int(time.time()), ttl_s=900, token_id="bench")  # fmt: skip
        metadata = (("authorization", f"Bearer {token}"),)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = risk_pb2_grpc.RiskServiceStub(channel)
                await asyncio.sleep(args.reload_wait)  # the seeded price is picked up

                async def call(request: R.CheckOrderRequest) -> R.CheckOrderResponse:
                    return await stub.CheckOrder(request, metadata=metadata, timeout=30)

                probe = await call(_requests(1, 1, rng)[0])
                assert probe.reference_price == "100000", probe
                await _measure("in-process", call, args, rng)
                # The bare gRPC cost on this machine right now, for scale: health
                # Check on the same server (no token, no Redis, no work).
                health = health_pb2_grpc.HealthStub(channel)
                empty = health_pb2.HealthCheckRequest()

                async def bare(request: R.CheckOrderRequest) -> R.CheckOrderResponse:
                    await health.Check(empty, timeout=30)
                    return R.CheckOrderResponse(allowed=True)

                await _measure("health Check", bare, args, rng)
        finally:
            await server.stop(0)


async def _own_process(stack: Stack, args: argparse.Namespace, rng: random.Random) -> None:
    async with _database(stack) as url:
        port = free_ports().edge
        env = {
            **os.environ,
            "CEX_GRPC_PORT": str(port),
            "DATABASE_URL": url,
            "REDIS_URL": stack.redis_url,
            "CEX_JWKS_URL": stack.ports.jwks_url,
            "RISK_PRICES": "off",
            "RISK_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
            "CEX_LOG_LEVEL": "WARNING",
        }
        env.pop("NATS_URL", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.risk.main", env=env
        )

        async def issue(key_id: str, secret: str) -> tuple[str, float]:
            async with grpc.aio.insecure_channel(stack.edge) as channel:
                reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                    auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret)
                )
            return reply.access_token, reply.expire_time.ToSeconds()

        token = await ServiceCredentials("order", issue, stack.service_secret).token()
        metadata = (("authorization", f"Bearer {token}"),)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30)
                await _seed_price(url)
                await asyncio.sleep(args.reload_wait)
                stub = risk_pb2_grpc.RiskServiceStub(channel)

                async def call(request: R.CheckOrderRequest) -> R.CheckOrderResponse:
                    return await stub.CheckOrder(request, metadata=metadata, timeout=30)

                probe = await call(_requests(1, 1, rng)[0])
                assert probe.reference_price == "100000", probe
                await _measure("own process", call, args, rng)
        finally:
            process.terminate()
            await process.wait()


async def _redis_alone(stack: Stack, args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    script = client.register_script(SCRIPT)
    try:
        keys = [f"bench:alone:{i}" for i in range(args.accounts)]
        n = args.checks
        latencies: list[float] = []
        began = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await script(keys=[keys[i % len(keys)]], args=[100, 1])
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - began
        latencies.sort()
        print(
            f"{'redis alone':>12}: {n / elapsed:8.0f} takes/s   "
            f"p50 {_percentile(latencies, 0.5) * 1000:6.2f} ms  "
            f"p99 {_percentile(latencies, 0.99) * 1000:6.2f} ms  ({n} EVALSHA, 1 caller)"
        )
    finally:
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), free_ports(), env)
        await stack.start()
        try:
            await _in_process(stack, args, rng)
            await _own_process(stack, args, rng)
            await _redis_alone(stack, args)
        finally:
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--reload-wait", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
