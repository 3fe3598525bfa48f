"""cexcore's list queries as its plans ask for them (no network: the plan's
first page request is read off the generator)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ccxt")

from cex_ccxt import cexcore
from cex_ccxt.base import LOAD_MARKETS, Call

SINCE = 1_700_000_000_000
UNTIL = 1_700_000_060_000


@pytest.fixture
def exchange() -> Any:
    exchange = cexcore({"apiKey": "k", "secret": "s"})
    exchange.set_markets(
        [exchange.parse_market({"symbol": "BTC-USDT", "base_asset": "BTC", "quote_asset": "USDT"})]
    )
    return exchange


def _first_call(plan: Any) -> Call:
    step = next(plan)
    while step == LOAD_MARKETS:
        step = plan.send(None)
    assert isinstance(step, Call)
    plan.close()
    return step


def test_orders_of_one_market_in_a_window(exchange: Any) -> None:
    call = _first_call(
        exchange._fetch_open_orders("BTC/USDT", SINCE, 5, {"until": UNTIL, "side": "SIDE_BUY"})
    )
    assert (call.path, call.api) == ("v1/orders", "private")
    assert list(call.params) == [
        "status",
        "start_time",
        "end_time",
        "side",
        "market",
        "page_size",
    ]
    assert call.params["status"] == "ORDER_STATUS_FILTER_OPEN"
    assert call.params["market"] == "BTC-USDT"
    assert call.params["start_time"] == exchange.iso8601(SINCE)
    assert call.params["end_time"] == exchange.iso8601(UNTIL)
    assert call.params["page_size"] == 5


def test_fills_of_every_market_without_a_window(exchange: Any) -> None:
    call = _first_call(exchange._fetch_my_trades(None, None, None, None))
    assert (call.path, call.params) == ("v1/fills", {"page_size": 1000})


def test_public_trades_and_candles_name_their_market_first(exchange: Any) -> None:
    trades = _first_call(exchange._fetch_trades("BTC/USDT", SINCE, None, {"until": UNTIL}))
    assert list(trades.params) == ["market", "start_time", "end_time", "page_size"]
    candles = _first_call(exchange._fetch_ohlcv("BTC/USDT", "1m", None, 10))
    assert list(candles.params)[:2] == ["market", "interval"]
    assert "start_time" not in candles.params and "until" not in candles.params


def test_deposits_of_one_asset(exchange: Any) -> None:
    exchange.currencies = {"BTC": {"id": "BTC", "code": "BTC"}}
    exchange.currencies_by_id = {"BTC": exchange.currencies["BTC"]}
    call = _first_call(exchange._fetch_deposits("BTC", SINCE, None, {"until": UNTIL}))
    assert call.path == "v1/deposits"
    assert list(call.params) == ["start_time", "end_time", "asset", "page_size"]
