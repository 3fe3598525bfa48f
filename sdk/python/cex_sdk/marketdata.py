"""cex.marketdata.v1.MarketDataService as typed calls (public data, read only).

Streams are wrapped by helpers: `LocalOrderBook` keeps a book from
StreamOrderBook with sequence and checksum checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2

if TYPE_CHECKING:
    from .client import Client

__all__ = ["MarketDataApi"]


class MarketDataApi:
    """cex.marketdata.v1.MarketDataService: markets, books, trades, tickers, candles."""

    _SERVICE = "/cex.marketdata.v1.MarketDataService/"

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list_markets(self, *, timeout_s: float | None = None) -> list[types_pb2.Market]:
        """Every market and its spec (tick size, lot size, limits, status)."""
        markets: list[types_pb2.Market] = []
        token = ""
        while True:
            page = await self._client.call(
                self._SERVICE + "ListMarkets",
                md.ListMarketsRequest(page_size=1000, page_token=token),
                md.ListMarketsResponse,
                timeout_s=timeout_s,
            )
            markets.extend(page.markets)
            token = page.next_page_token
            if not token:
                return markets

    async def get_market(self, market: str, *, timeout_s: float | None = None) -> types_pb2.Market:
        """One market's spec."""
        reply = await self._client.call(
            self._SERVICE + "GetMarket",
            md.GetMarketRequest(market=market),
            md.GetMarketResponse,
            timeout_s=timeout_s,
        )
        return reply.market

    async def get_order_book(
        self, market: str, depth: int = 0, *, timeout_s: float | None = None
    ) -> md.OrderBook:
        """An L2 snapshot (`depth` levels per side, 0 = 100) with its seq and checksum."""
        reply = await self._client.call(
            self._SERVICE + "GetOrderBook",
            md.GetOrderBookRequest(market=market, depth=depth),
            md.GetOrderBookResponse,
            timeout_s=timeout_s,
        )
        return reply.book

    async def list_trades(
        self,
        market: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> md.ListTradesResponse:
        """One page of a market's recent trades, newest first."""
        return await self._client.call(
            self._SERVICE + "ListTrades",
            md.ListTradesRequest(market=market, page_size=page_size, page_token=page_token),
            md.ListTradesResponse,
            timeout_s=timeout_s,
        )

    async def get_ticker(self, market: str, *, timeout_s: float | None = None) -> md.Ticker:
        """A market's 24-hour ticker with the top of its book."""
        reply = await self._client.call(
            self._SERVICE + "GetTicker",
            md.GetTickerRequest(market=market),
            md.GetTickerResponse,
            timeout_s=timeout_s,
        )
        return reply.ticker

    async def get_candles(
        self,
        market: str,
        interval: md.CandleInterval.ValueType,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> md.GetCandlesResponse:
        """The most recent OHLCV candles of a market, oldest first."""
        return await self._client.call(
            self._SERVICE + "GetCandles",
            md.GetCandlesRequest(
                market=market, interval=interval, page_size=page_size, page_token=page_token
            ),
            md.GetCandlesResponse,
            timeout_s=timeout_s,
        )
