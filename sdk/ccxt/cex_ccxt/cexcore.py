"""`cexcore`: the exchange as a synchronous CCXT class (as `ccxt.binance` is);
every unified method blocks until its requests are answered. Usage: docs/ccxt.md."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ccxt
from ccxt.base.errors import AuthenticationError

from .base import LOAD_MARKETS, UNIFIED, Call, CexcoreBase, Plan
from .implicit import ImplicitAPI

__all__ = ["cexcore"]


class cexcore(CexcoreBase, ccxt.Exchange, ImplicitAPI):  # CCXT names its classes by exchange id
    def request(
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
            return super().request(path, api, method, params, headers, body, config)
        fresh = self._authenticate()
        try:
            return super().request(path, api, method, params, headers, body, config)
        except AuthenticationError:
            if fresh:
                raise
            self._forget_token()
            self._authenticate()
            return super().request(path, api, method, params, headers, body, config)

    def _authenticate(self) -> bool:
        """Obtain a token if there is none or it is near expiry; True if it did."""
        if not self._token_stale():
            return False
        call = self._token_request()
        self._keep_token(super().request(call.path, call.api, call.method, call.params))
        return True

    def _drive(self, plan: Plan) -> Any:
        try:
            step = next(plan)
            while True:
                if isinstance(step, Call):
                    reply = self.request(step.path, step.api, step.method, step.params)
                elif step == LOAD_MARKETS:
                    reply = self.load_markets()
                else:
                    raise TypeError(f"a plan yielded {step!r}")
                step = plan.send(reply)
        except StopIteration as done:
            return done.value
        finally:
            plan.close()


def _blocking(name: str) -> Callable[..., Any]:
    plan = getattr(CexcoreBase, "_" + name)

    @functools.wraps(plan)
    def method(self: cexcore, *args: Any, **kwargs: Any) -> Any:
        return self._drive(plan(self, *args, **kwargs))

    method.__name__ = method.__qualname__ = name
    return method


for _name in UNIFIED:
    setattr(cexcore, _name, _blocking(_name))
