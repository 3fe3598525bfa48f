"""`cexcore`: the exchange as a synchronous CCXT class (as `ccxt.binance` is);
every unified method blocks until its requests are answered. Usage: docs/ccxt.md."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import ccxt

from .base import CexcoreBase, Plan, Run, install
from .implicit import ImplicitAPI

__all__ = ["cexcore"]


class cexcore(CexcoreBase, ccxt.Exchange, ImplicitAPI):  # CCXT names its classes by exchange id
    def _drive(self, plan: Plan) -> Any:
        """Run a plan to its end, answering each step with a blocking call."""
        with contextlib.closing(Run(plan)) as run:
            while not run.done:
                try:
                    reply = self._perform(run.step)()
                except Exception as error:
                    run.throw(error)
                else:
                    run.send(reply)
            return run.value


def _blocking(plan: Callable[..., Plan]) -> Callable[..., Any]:
    def method(self: cexcore, *args: Any, **kwargs: Any) -> Any:
        return self._drive(plan(self, *args, **kwargs))

    return method


install(cexcore, _blocking)
