"""`cexcore` for asyncio (as `ccxt.async_support.binance` is): every unified
method is a coroutine; `await exchange.close()` when done. Usage: docs/ccxt.md."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import ccxt.async_support
from ccxt.base.errors import AuthenticationError

from .base import LOAD_MARKETS, UNIFIED, Call, CexcoreBase, Plan
from .implicit import ImplicitAPI

__all__ = ["cexcore"]


class cexcore(CexcoreBase, ccxt.async_support.Exchange, ImplicitAPI):
    _token_lock: asyncio.Lock | None = None

    async def request(
        self,
        path: str,
        api: Any = "public",
        method: str = "GET",
        params: Any = None,
        headers: Any = None,
        body: Any = None,
        config: Any = None,
    ) -> Any:
        """CCXT's request, with a valid token for private calls; a token the edge
        refuses (e.g. the stack restarted with new keys) is renewed once."""
        params, config = params or {}, config or {}
        if api != "private":
            return await super().request(path, api, method, params, headers, body, config)
        fresh = await self._authenticate()
        try:
            return await super().request(path, api, method, params, headers, body, config)
        except AuthenticationError:
            if fresh:
                raise
            self._forget_token()
            await self._authenticate()
            return await super().request(path, api, method, params, headers, body, config)

    async def _authenticate(self) -> bool:
        """Obtain a token if there is none or it is near expiry; True if it did.
        Concurrent calls share one renewal (the token endpoint is rate limited)."""
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            if not self._token_stale():
                return False
            call = self._token_request()
            reply = await super().request(call.path, call.api, call.method, call.params)
            self._keep_token(reply)
            return True

    async def _drive(self, plan: Plan) -> Any:
        try:
            step = next(plan)
            while True:
                if isinstance(step, Call):
                    reply = await self.request(step.path, step.api, step.method, step.params)
                elif step == LOAD_MARKETS:
                    reply = await self.load_markets()
                else:
                    raise TypeError(f"a plan yielded {step!r}")
                step = plan.send(reply)
        except StopIteration as done:
            return done.value
        finally:
            plan.close()


def _awaitable(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    plan = getattr(CexcoreBase, "_" + name)

    @functools.wraps(plan)
    async def method(self: cexcore, *args: Any, **kwargs: Any) -> Any:
        return await self._drive(plan(self, *args, **kwargs))

    method.__name__ = method.__qualname__ = name
    return method


for _name in UNIFIED:
    setattr(cexcore, _name, _awaitable(_name))
