"""Per-account order rate limit: a token bucket in Redis (ratelimit.lua), atomic.

Redis holds only what may be lost. If it restarts, every bucket is full again
(at most one extra second of burst per account). If it cannot be reached, each
risk process falls back to a bucket of its own in memory, with the same
arithmetic, so the limit still holds per replica instead of failing open or
refusing all trading; `fallbacks` counts those checks. After a failure Redis is
left alone for `retry_s` (a breaker), so a dead or black-holed Redis costs each
check nothing, not a timeout.
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
_Pending = tuple[str, int, int, "asyncio.Future[tuple[bool, int, int]]"]


def _take(rate: int, result: tuple[bool, int, int]) -> Take:
    allowed, tokens_u, retry_us = result
    return Take(allowed, rate, tokens_u // _MICRO, retry_us / _MICRO)


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
    """Takes from Redis buckets; the takes of concurrent checks go in one script call
    (while one call is in flight the next ones queue, as a group commit does), so a
    lone check waits for one round trip and a busy process pays one per batch."""

    def __init__(
        self,
        client: redis.Redis | None,
        *,
        prefix: str = "risk:rl:",
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        max_batch: int = 256,
        local: LocalBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._script: Any = client.register_script(SCRIPT) if client is not None else None
        self._prefix = prefix
        self._timeout = timeout_s
        self._local = local or LocalBuckets()
        self._retry_s = retry_s
        self._max_batch = max_batch
        self._clock = clock
        self._down_until = 0.0
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.fallbacks = 0
        self.batches = 0

    async def take(self, account_id: str, rate: int, cost: int = 1) -> Take:
        [take] = await self.take_many([(account_id, rate)], cost)
        return take

    async def take_many(self, checks: list[tuple[str, int]], cost: int = 1) -> list[Take]:
        """One take per (account, rate), in order; all of them join the next script call."""
        out: list[Take | None] = [None] * len(checks)
        waiting: list[tuple[int, int, asyncio.Future[tuple[bool, int, int]]]] = []
        local = self._script is None or self._clock() < self._down_until
        for i, (account_id, rate) in enumerate(checks):
            if rate <= 0:
                out[i] = UNLIMITED
                continue
            key = self._prefix + account_id
            if local:
                self.fallbacks += 1
                out[i] = _take(rate, self._local.take(key, rate, cost))
                continue
            future: asyncio.Future[tuple[bool, int, int]] = (
                asyncio.get_running_loop().create_future()
            )
            self._pending.append((key, rate, cost, future))
            waiting.append((i, rate, future))
        if waiting and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        for i, rate, future in waiting:
            out[i] = _take(rate, await future)
        return [take for take in out if take is not None]

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._run(batch)
                except Exception as error:  # a bug: never leave a check hanging
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (*_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # its caller may have given up
                        future.set_result(result)
        finally:
            self._flusher = None

    async def _run(self, batch: list[_Pending]) -> list[tuple[bool, int, int]]:
        if self._script is not None and self._clock() >= self._down_until:
            args: list[int] = []
            for _, rate, cost, _ in batch:
                args += (rate, cost)
            try:
                raw = await asyncio.wait_for(
                    self._script(keys=[key for key, *_ in batch], args=args), self._timeout
                )
                self.batches += 1
                return [
                    (bool(int(raw[i])), int(raw[i + 1]), int(raw[i + 2]))
                    for i in range(0, len(raw), 3)
                ]
            except (RedisError, OSError, TimeoutError) as error:
                self._down_until = self._clock() + self._retry_s
                _log.warning(
                    "redis unavailable (%r): local buckets for %.1f s", error, self._retry_s
                )
        self.fallbacks += len(batch)
        return [self._local.take(key, rate, cost) for key, rate, cost, _ in batch]
