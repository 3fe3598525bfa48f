"""Health probes for each kind of component, all with short timeouts."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import nats
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["grpc_health", "http_ok", "nats_ok", "postgres_ok", "redis_ok"]

TIMEOUT_S = 2.0


async def http_ok(host: str, port: int, path: str) -> bool:
    """A bare HTTP/1.1 GET (Envoy refuses 1.0): enough for /ready and the like."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()


async def postgres_ok(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


async def _quiet(error: Exception) -> None:
    """A refused probe is an answer, not an error worth a traceback."""


async def nats_ok(url: str) -> bool:
    """Connected, and JetStream answers."""
    try:
        client = await nats.connect(
            url,
            connect_timeout=TIMEOUT_S,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            error_cb=_quiet,
        )
    except Exception:
        return False
    try:
        await client.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await client.close()


async def redis_ok(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        return bool(await client.ping())
    except (OSError, redis.RedisError):
        return False
    finally:
        await client.aclose()


async def grpc_health(target: str, service: str = "", *, authority: str | None = None) -> bool:
    """grpc.health.v1 Check; `authority` picks a service's host through Envoy."""
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
