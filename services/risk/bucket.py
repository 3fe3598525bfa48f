"""Per-account order rate limit: a token bucket in Redis (ratelimit.lua), atomic.

Redis holds only what may be lost. If it restarts, every bucket is full again
(at most one extra second of burst per account). If it cannot be reached, each
risk process falls back to a bucket of its own in memory, with the same
arithmetic, so the limit still holds per replica instead of failing open or
refusing all trading; `fallbacks` counts those checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

__all__ = ["LocalBuckets", "RateLimiter", "Take"]

SCRIPT = Path(__file__).with_name("ratelimit.lua").read_text()
_MICRO = 1_000_000
_log = logging.getLogger("cex.risk.ratelimit")


@dataclass(frozen=True, slots=True)
class Take:
    """One check's outcome and the budget after it."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float

    @property
    def used(self) -> int:
        return self.limit - self.remaining


UNLIMITED = Take(True, 0, 0, 0.0)


class LocalBuckets:
    """The script's arithmetic in process memory (the fallback, and a reference in tests)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, max_keys: int = 100_000):
        self._clock = clock
        self._buckets: dict[str, tuple[int, int]] = {}
        self._max_keys = max_keys

    def take(self, key: str, rate: int, cost: int = 1) -> tuple[bool, int, int]:
        now = self._clock() // 1000
        size, cost_u = rate * _MICRO, cost * _MICRO
        tokens, ts = self._buckets.get(key, (size, now))
        elapsed = min(max(now - ts, 0), 10 * _MICRO)
        tokens = min(size, tokens + elapsed * rate)
        if tokens >= cost_u:
            tokens -= cost_u
            allowed, retry = True, 0
        else:
            allowed, retry = False, -(-(cost_u - tokens) // rate)
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._buckets.clear()  # full buckets are what a missing key means anyway
        self._buckets[key] = (tokens, now)
        return allowed, tokens, retry


class RateLimiter:
    def __init__(
        self,
        client: redis.Redis | None,
        *,
        prefix: str = "risk:rl:",
        timeout_s: float = 0.25,
        local: LocalBuckets | None = None,
    ) -> None:
        self._client = client
        self._script: Any = client.register_script(SCRIPT) if client is not None else None
        self._prefix = prefix
        self._timeout = timeout_s
        self._local = local or LocalBuckets()
        self.fallbacks = 0

    async def take(self, account_id: str, rate: int, cost: int = 1) -> Take:
        if rate <= 0:
            return UNLIMITED
        key = self._prefix + account_id
        result: tuple[bool, int, int]
        try:
            if self._script is None:
                raise RedisError("no redis configured")
            raw = await asyncio.wait_for(self._script(keys=[key], args=[rate, cost]), self._timeout)
            result = (bool(int(raw[0])), int(raw[1]), int(raw[2]))
        except (RedisError, OSError, TimeoutError) as error:
            self.fallbacks += 1
            if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
                _log.warning("redis unavailable (%r): rate limit from the local bucket", error)
            result = self._local.take(key, rate, cost)
        allowed, tokens_u, retry_us = result
        return Take(allowed, rate, tokens_u // _MICRO, retry_us / _MICRO)
