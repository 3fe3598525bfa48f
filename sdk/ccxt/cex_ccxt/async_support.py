"""`cexcore` for asyncio (as `ccxt.async_support.binance` is): every unified
method is a coroutine; `await exchange.close()` when done. Usage: docs/ccxt.md."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import ccxt.async_support

from .base import CexcoreBase, Plan, Run, install
from .implicit import ImplicitAPI

__all__ = ["cexcore"]


class cexcore(CexcoreBase, ccxt.async_support.Exchange, ImplicitAPI):
    _token_lock: asyncio.Lock | None = None

    async def _authenticate(self) -> bool:
        """Obtain a token if there is none or it is near expiry; True if it did.
        Concurrent calls share one renewal (the token endpoint is rate limited)."""
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            renewed: bool = await super()._authenticate()
            return renewed

    async def _drive(self, plan: Plan) -> Any:
        """Run a plan to its end, answering each step with an await."""
        with contextlib.closing(Run(plan)) as run:
            while not run.done:
                try:
                    reply = await self._perform(run.step)()
                except Exception as error:
                    run.throw(error)
                else:
                    run.send(reply)
            return run.value


def _awaitable(plan: Callable[..., Plan]) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def method(self: cexcore, *args: Any, **kwargs: Any) -> Any:
        return await self._drive(plan(self, *args, **kwargs))

    return method


install(cexcore, _awaitable)
