"""Access tokens from an API key: fetched on first use, renewed before expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cex.auth.v1 import auth_pb2

#: Renew this long before expiry (or a fifth of the token's life, if shorter).
REFRESH_MARGIN_S = 60.0


class TokenSource:
    """One valid token at a time, shared by every call of a client.

    `issue` performs IssueToken; `clock` is wall time in seconds (token expiry is
    a wall-clock instant). Concurrent callers wait for the same renewal.
    """

    def __init__(
        self,
        issue: Callable[[], Awaitable[auth_pb2.IssueTokenResponse]],
        *,
        clock: Callable[[], float],
        refresh_margin_s: float = REFRESH_MARGIN_S,
    ) -> None:
        self._issue = issue
        self._clock = clock
        self._margin = refresh_margin_s
        self._lock = asyncio.Lock()
        self._token = ""
        self._renew_at = 0.0
        self._expire_at = 0.0
        self.account_id = ""
        self.issued = 0

    @property
    def expire_at(self) -> float:
        """When the current token expires (wall clock, seconds); 0 before the first."""
        return self._expire_at

    async def token(self) -> str:
        if self._token and self._clock() < self._renew_at:
            return self._token
        async with self._lock:
            if not self._token or self._clock() >= self._renew_at:
                await self._renew()
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget `token` (refused by the server) so the next call gets a new one."""
        if token == self._token:
            self._token = ""

    async def _renew(self) -> None:
        now = self._clock()
        reply = await self._issue()
        expire = reply.expire_time.ToNanoseconds() / 1e9
        lifetime = max(0.0, expire - now)
        self._token = reply.access_token
        self._expire_at = expire
        self._renew_at = expire - min(self._margin, lifetime / 5)
        self.account_id = reply.account_id
        self.issued += 1
