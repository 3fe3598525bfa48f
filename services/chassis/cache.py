"""Redis: only what may be lost (rate-limit buckets, caches, hot counters)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as redis

__all__ = ["redis_connection"]


@contextlib.asynccontextmanager
async def redis_connection(url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=2)
    await client.ping()
    try:
        yield client
    finally:
        await client.aclose()
