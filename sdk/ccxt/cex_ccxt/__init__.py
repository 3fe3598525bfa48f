"""CCXT for the cex exchange: `cexcore`, a CCXT exchange class (sync here, asyncio
in `cex_ccxt.async_support`) over the exchange's REST API at the Envoy edge.

    from cex_ccxt import cexcore

    exchange = cexcore({"apiKey": key_id, "secret": secret, "hostname": "127.0.0.1:50050"})

or, for code that finds exchanges by name in ccxt (`getattr(ccxt, name)`,
`ccxt.exchanges`, freqtrade), once at start:

    import cex_ccxt; cex_ccxt.register()
    exchange = ccxt.cexcore({...})          # and ccxt.async_support.cexcore

The id is `cexcore`: ccxt already has a `cex` (CEX.IO). See docs/ccxt.md.
"""

from __future__ import annotations

import ccxt
import ccxt.async_support

from . import async_support
from .cexcore import cexcore
from .errors import error_class

__all__ = ["__version__", "async_support", "cexcore", "error_class", "register"]

__version__ = "1.0.0"


def register() -> None:
    """Make `cexcore` one of ccxt's exchanges: `ccxt.cexcore`,
    `ccxt.async_support.cexcore`, and its id in both `exchanges` lists."""
    ccxt.cexcore = cexcore
    ccxt.async_support.cexcore = async_support.cexcore
    for module in (ccxt, ccxt.async_support):
        if "cexcore" not in module.exchanges:
            module.exchanges.append("cexcore")
