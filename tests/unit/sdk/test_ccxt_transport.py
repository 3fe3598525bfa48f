"""cexcore's transport, sync and async alike (the same `request` plan): a token
before the first private call, one renewal when the edge refuses a token it
held, one renewal shared by concurrent calls; and the implicit API's names.

No network: the classes' `fetch` (CCXT's HTTP call) is a small fake edge."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest

pytest.importorskip("ccxt")

from ccxt.base.errors import AuthenticationError

from cex_ccxt import async_support, cexcore
from cex_ccxt.implicit import ImplicitAPI

BALANCES = {"balances": [{"asset": "BTC", "available": "1", "held": "0", "total": "1"}]}
UNAUTHENTICATED = {"code": 16, "message": "token refused", "details": []}


class Edge:
    """Issues tokens t1, t2, ...; refuses the next `refuse` private calls."""

    def __init__(self) -> None:
        self.issued = 0
        self.refuse = 0
        self.seen: list[tuple[str, str | None]] = []

    def answer(self, exchange: Any, url: str, headers: dict[str, str]) -> Any:
        path = url.split("/", 3)[3]
        self.seen.append((path, headers.get("Authorization")))
        if path == "v1/tokens":
            self.issued += 1
            return {"access_token": f"t{self.issued}", "expire_time": "2099-01-01T00:00:00Z"}
        if self.refuse:
            self.refuse -= 1
            body = json.dumps(UNAUTHENTICATED)
            exchange.handle_errors(401, "", url, "GET", {}, body, UNAUTHENTICATED, headers, None)
            raise AssertionError("handle_errors raises for a google.rpc.Status")
        return BALANCES


class SyncExchange(cexcore):
    edge: Edge

    def fetch(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        return self.edge.answer(self, url, headers)


class AsyncExchange(async_support.cexcore):
    edge: Edge

    async def fetch(
        self, url: str, method: str = "GET", headers: Any = None, body: Any = None
    ) -> Any:
        await asyncio.sleep(0)  # let concurrent calls interleave
        return self.edge.answer(self, url, headers)


def _exchange(cls: type[Any]) -> Any:
    exchange = cls({"apiKey": "k", "secret": "s"})
    exchange.edge = Edge()
    return exchange


async def _call(exchange: Any, name: str) -> Any:
    result = getattr(exchange, name)()
    return await result if inspect.isawaitable(result) else result


@pytest.fixture(params=[SyncExchange, AsyncExchange])
def exchange(request: pytest.FixtureRequest) -> Any:
    return _exchange(request.param)


async def test_a_private_call_gets_a_token_first_and_keeps_it(exchange: Any) -> None:
    assert (await _call(exchange, "fetch_balance"))["BTC"]["free"] == 1.0
    await _call(exchange, "fetch_balance")
    assert exchange.edge.seen == [
        ("v1/tokens", None),
        ("v1/balances", "Bearer t1"),
        ("v1/balances", "Bearer t1"),
    ]


async def test_a_held_token_the_edge_refuses_is_renewed_once(exchange: Any) -> None:
    await _call(exchange, "fetch_balance")
    exchange.edge.refuse = 1
    assert (await _call(exchange, "fetch_balance"))["BTC"]["total"] == 1.0
    assert exchange.edge.seen[2:] == [
        ("v1/balances", "Bearer t1"),
        ("v1/tokens", None),
        ("v1/balances", "Bearer t2"),
    ]
    exchange.edge.refuse = 2
    with pytest.raises(AuthenticationError):
        await _call(exchange, "fetch_balance")
    assert exchange.edge.issued == 3


async def test_a_fresh_token_the_edge_refuses_is_not_renewed(exchange: Any) -> None:
    exchange.edge.refuse = 1
    with pytest.raises(AuthenticationError):
        await _call(exchange, "fetch_balance")
    assert exchange.edge.issued == 1


async def test_concurrent_calls_share_one_renewal() -> None:
    exchange = _exchange(AsyncExchange)
    await asyncio.gather(*(exchange.fetch_balance() for _ in range(5)))
    assert exchange.edge.issued == 1


def test_the_driven_methods_keep_their_plans_signatures() -> None:
    assert inspect.iscoroutinefunction(async_support.cexcore.request)
    assert inspect.iscoroutinefunction(async_support.cexcore.fetch_open_orders)
    assert not inspect.iscoroutinefunction(cexcore.fetch_open_orders)
    for cls in (cexcore, async_support.cexcore):
        assert list(inspect.signature(cls.fetch_deposits).parameters) == [
            "self",
            "code",
            "since",
            "limit",
            "params",
        ]
        assert cls.request.__doc__ and "renewed once" in cls.request.__doc__


def test_the_implicit_api_names_every_endpoint_as_ccxt_does() -> None:
    exchange = cexcore()
    cancel = exchange.private_post_v1_orders_order_id_cancel
    assert cancel.__func__ is exchange.privatePostV1OrdersOrderIdCancel.__func__
    entries = {
        "public_get_v1_markets_tickers": ("v1/markets/-/tickers", "public", "GET"),
        "privatePostV1OrdersCancelAllAfter": ("v1/orders:cancelAllAfter", "private", "POST"),
        "private_get_v1_depositaddresses_asset": ("v1/depositAddresses/{asset}", "private", "GET"),
        "privateGetV1OrdersLookup": ("v1/orders:lookup", "private", "GET"),
    }
    for name, (path, api, method) in entries.items():
        entry = vars(ImplicitAPI)[name]
        assert (entry.path, entry.api, entry.method, entry.config) == (
            path,
            api,
            method,
            {"cost": 1},
        )
