"""cex.marketdata.v1.MarketDataService as typed calls (public data, read only).

Streams are wrapped by helpers: `LocalOrderBook` keeps a book from
StreamOrderBook with sequence and checksum checks.
"""

from __future__ import annotations

from collections.abc import Awaitable

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2

from ._service import ServiceApi, pages

__all__ = ["MarketDataApi"]


class MarketDataApi(ServiceApi):
    """cex.marketdata.v1.MarketDataService: markets, books, trades, tickers, candles."""

    _SERVICE = "/cex.marketdata.v1.MarketDataService/"

    async def list_markets(self, *, timeout_s: float | None = None) -> list[types_pb2.Market]:
        """Every market and its spec (tick size, lot size, limits, status)."""

        def page(token: str) -> Awaitable[md.ListMarketsResponse]:
            request = md.ListMarketsRequest(page_size=1000, page_token=token)
            return self._call("ListMarkets", request, md.ListMarketsResponse, timeout_s)

        return [market async for reply in pages(page) for market in reply.markets]

    async def get_market(self, market: str, *, timeout_s: float | None = None) -> types_pb2.Market:
        """One market's spec."""
        reply = await self._call(
            "GetMarket", md.GetMarketRequest(market=market), md.GetMarketResponse, timeout_s
        )
        return reply.market

    async def get_order_book(
        self, market: str, depth: int = 0, *, timeout_s: float | None = None
    ) -> md.OrderBook:
        """An L2 snapshot (`depth` levels per side, 0 = 100) with its seq and checksum."""
        reply = await self._call(
            "GetOrderBook",
            md.GetOrderBookRequest(market=market, depth=depth),
            md.GetOrderBookResponse,
            timeout_s,
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
        return await self._call(
            "ListTrades",
            md.ListTradesRequest(market=market, page_size=page_size, page_token=page_token),
            md.ListTradesResponse,
            timeout_s,
        )

    async def get_ticker(self, market: str, *, timeout_s: float | None = None) -> md.Ticker:
        """A market's 24-hour ticker with the top of its book."""
        reply = await self._call(
            "GetTicker", md.GetTickerRequest(market=market), md.GetTickerResponse, timeout_s
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
        return await self._call(
            "GetCandles",
            md.GetCandlesRequest(
                market=market, interval=interval, page_size=page_size, page_token=page_token
            ),
            md.GetCandlesResponse,
            timeout_s,
        )
