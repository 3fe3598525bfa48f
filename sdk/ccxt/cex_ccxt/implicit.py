"""The raw REST endpoints as CCXT's implicit API (`exchange.private_post_v1_orders(...)`),
one per `google.api.http` binding of the v1 protos that a user's key may call.
Params are the protos' JSON fields; path fields ({market}) are taken from them.
The unified methods (fetch_ticker, create_order, ...) are built on these paths.

Each endpoint is one `Entry` under the two names CCXT's generated classes give
it: the api, the HTTP method and the path's words, snake_case (lowercased) and
camelCase, e.g. POST v1/orders/{order_id}:cancel is
`private_post_v1_orders_order_id_cancel` and `privatePostV1OrdersOrderIdCancel`.
"""

from __future__ import annotations

import re

from ccxt.base.types import Entry

__all__ = ["ImplicitAPI"]

# By api and HTTP method, as CCXT's `describe()["api"]` lists them.
_ENDPOINTS = {
    ("public", "GET"): (
        "v1/markets",
        "v1/markets/{market}",
        "v1/markets/{market}/book",
        "v1/markets/{market}/trades",
        "v1/markets/{market}/ticker",
        "v1/markets/-/tickers",
        "v1/markets/{market}/candles",
    ),
    ("public", "POST"): ("v1/tokens",),
    ("private", "GET"): (
        "v1/fees",
        "v1/balances",
        "v1/orders",
        "v1/orders/{order_id}",
        "v1/orders:lookup",
        "v1/fills",
        "v1/depositAddresses/{asset}",
        "v1/deposits",
        "v1/deposits/{deposit_id}",
        "v1/withdrawals",
        "v1/withdrawals/{withdrawal_id}",
    ),
    ("private", "POST"): (
        "v1/orders",
        "v1/orders:batchPlace",
        "v1/orders/{order_id}:amend",
        "v1/orders/{order_id}:cancel",
        "v1/orders:cancelAll",
        "v1/orders:cancelAllAfter",
        "v1/withdrawals",
        "v1/withdrawals/{withdrawal_id}:cancel",
    ),
}


def _names(api: str, method: str, path: str) -> tuple[str, str]:
    """The snake_case and camelCase names of an endpoint (CCXT's rule)."""
    words = [word for word in re.split(r"[^a-zA-Z0-9]", path) if word]
    snake = "_".join([api, method.lower(), *(word.lower() for word in words)])
    camel = api + method.capitalize() + "".join(word[0].upper() + word[1:] for word in words)
    return snake, camel


class ImplicitAPI:
    """Every endpoint of `_ENDPOINTS` as an `Entry`, under both its names."""


def _define_endpoints() -> None:
    for (api, method), paths in _ENDPOINTS.items():
        for path in paths:
            entry = Entry(path, api, method, {"cost": 1})
            for name in _names(api, method, path):
                setattr(ImplicitAPI, name, entry)
                entry.__set_name__(ImplicitAPI, name)


_define_endpoints()
