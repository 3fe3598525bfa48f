"""marketdata service: proto <-> the feeds, the store and the fan-out; errors.

Every method is public (no token): market data is what anyone may read. Input
is validated here and refused with INVALID_ARGUMENT and field violations
(MARKETDATA_INVALID_*), unknown markets with NOT_FOUND
(MARKETDATA_UNKNOWN_MARKET). A market whose feed has not caught up yet
answers Get calls from the last snapshot in Redis, else UNAVAILABLE
(MARKETDATA_NOT_READY); streams wait for it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.type.v1 import types_pb2
from services.chassis import (
    PUBLIC,
    Catalog,
    ChassisSettings,
    FieldViolation,
    InvalidArgument,
    Market,
    NotFound,
    ResourceExhausted,
    Rule,
    Server,
    Unavailable,
    background,
    connect,
    ensure_stream,
    load_catalog,
    service_credentials,
)
from services.chassis.authn import service_auth_interceptors
from services.chassis.interceptors import client_interceptors
from services.chassis.tokens import StaticKeys

from .books import Level, checksum
from .candles import INTERVALS, Bar
from .config import MarketDataSettings
from .consumer import GrpcMatchSource, MarketFeed, MatchSource
from .fanout import (
    TRADES_STREAM,
    BookFanout,
    Hub,
    TickerSubscriber,
    TradeSubscriber,
    decimal_text,
    trade_pb,
)
from .store import Store

__all__ = ["MIGRATIONS", "POLICY", "MarketDataService", "build_server"]

MIGRATIONS = Path(__file__).with_name("migrations")

POLICY: dict[str, Rule] = {
    name: PUBLIC
    for name in (
        "ListMarkets",
        "GetMarket",
        "GetOrderBook",
        "StreamOrderBook",
        "ListTrades",
        "StreamTrades",
        "GetTicker",
        "ListTickers",
        "StreamTickers",
        "GetCandles",
    )
}

_DEFAULT_DEPTH = 100
_DEFAULT_PAGE = 100
_DEFAULT_CANDLES = 300
_MAX_PAGE = 1000


def _invalid(reason: str, field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"MARKETDATA_{reason}",
        f"{field}: {description}",
        violations=[FieldViolation(field, description, f"MARKETDATA_{reason}")],
    )


def _page_size(value: int, default: int = _DEFAULT_PAGE) -> int:
    if value < 0:
        raise _invalid("INVALID_PAGE_SIZE", "page_size", "must not be negative")
    return min(value or default, _MAX_PAGE)


def _token(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode()


def _untoken(kind: str, token: str) -> str | None:
    if not token:
        return None
    try:
        found, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        found, value = "", ""
    if found != kind or not value:
        raise _invalid("INVALID_PAGE_TOKEN", "page_token", "not a token from this call")
    return value


def _int_token(kind: str, token: str) -> int | None:
    value = _untoken(kind, token)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _invalid("INVALID_PAGE_TOKEN", "page_token", "not a token from this call") from None


def _ns(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def _market_pb(market: Market) -> types_pb2.Market:
    return types_pb2.Market(
        symbol=market.symbol,
        base_asset=market.base.symbol,
        quote_asset=market.quote.symbol,
        tick_size=decimal_text(market.tick_size),
        lot_size=decimal_text(market.lot_size),
        min_quantity=decimal_text(market.min_quantity),
        max_quantity=decimal_text(market.max_quantity),
        min_notional=decimal_text(market.min_notional),
        status=types_pb2.MARKET_STATUS_TRADING,
        base_asset_scale=market.base.scale,
        quote_asset_scale=market.quote.scale,
    )


def _candle_pb(market: str, interval: int, bar: Bar, now_s: int) -> md.Candle:
    return md.Candle(
        market=market,
        interval=interval,  # type: ignore[arg-type]
        open_time=Timestamp(seconds=bar.open_time_s),
        close_time=Timestamp(seconds=bar.open_time_s + bar.width_s),
        open=decimal_text(bar.open),
        high=decimal_text(bar.high),
        low=decimal_text(bar.low),
        close=decimal_text(bar.close),
        volume=decimal_text(bar.volume),
        quote_volume=decimal_text(bar.quote_volume),
        trade_count=bar.trade_count,
        closed=bar.open_time_s + bar.width_s <= now_s,
    )


class MarketDataService(marketdata_pb2_grpc.MarketDataServiceServicer):
    """cex.marketdata.v1.MarketDataService."""

    def __init__(
        self,
        catalog: Catalog,
        markets: Sequence[str],
        hub: Hub,
        store: Store,
        settings: MarketDataSettings,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._catalog = catalog
        self._markets = sorted(markets)
        self._hub = hub
        self._store = store
        self._settings = settings
        self._clock = clock

    # ----------------------------------------------------------------- input

    def _market(self, symbol: str, field: str = "market") -> Market:
        if not symbol:
            raise _invalid("MISSING_MARKET", field, "required")
        market = self._catalog.market(symbol)
        if market is None or symbol not in self._hub.feeds:
            raise NotFound(
                "MARKETDATA_UNKNOWN_MARKET",
                f"no market {symbol!r}",
                violations=[FieldViolation(field, "not a market", "MARKETDATA_UNKNOWN_MARKET")],
            )
        return market

    def _markets_of(self, symbols: Sequence[str]) -> frozenset[str]:
        for i, symbol in enumerate(symbols):
            self._market(symbol, f"markets[{i}]")
        return frozenset(symbols)

    def _depth(self, depth: int) -> int:
        if depth < 0 or depth > self._settings.max_depth:
            raise _invalid(
                "INVALID_DEPTH", "depth", f"must be 0 (default) to {self._settings.max_depth}"
            )
        return depth or min(_DEFAULT_DEPTH, self._settings.max_depth)

    def _feed(self, market: str) -> MarketFeed:
        return self._hub.feeds[market]

    # --------------------------------------------------------------- markets

    async def ListMarkets(
        self,
        request: md.ListMarketsRequest,
        context: grpc.aio.ServicerContext[md.ListMarketsRequest, md.ListMarketsResponse],
    ) -> md.ListMarketsResponse:
        size = _page_size(request.page_size)
        after = _untoken("market", request.page_token) or ""
        symbols = [s for s in sorted(self._catalog.markets) if s > after]
        page = symbols[:size]
        more = len(symbols) > size
        return md.ListMarketsResponse(
            markets=[_market_pb(self._catalog.markets[s]) for s in page],
            next_page_token=_token("market", page[-1]) if more else "",
        )

    async def GetMarket(
        self,
        request: md.GetMarketRequest,
        context: grpc.aio.ServicerContext[md.GetMarketRequest, md.GetMarketResponse],
    ) -> md.GetMarketResponse:
        if not request.market:
            raise _invalid("MISSING_MARKET", "market", "required")
        market = self._catalog.market(request.market)
        if market is None:
            raise NotFound(
                "MARKETDATA_UNKNOWN_MARKET",
                f"no market {request.market!r}",
                violations=[FieldViolation("market", "not a market", "MARKETDATA_UNKNOWN_MARKET")],
            )
        return md.GetMarketResponse(market=_market_pb(market))

    # ----------------------------------------------------------------- books

    async def GetOrderBook(
        self,
        request: md.GetOrderBookRequest,
        context: grpc.aio.ServicerContext[md.GetOrderBookRequest, md.GetOrderBookResponse],
    ) -> md.GetOrderBookResponse:
        self._market(request.market)
        depth = self._depth(request.depth)
        feed = self._feed(request.market)
        if feed.ready:
            return md.GetOrderBookResponse(book=feed.fanout.snapshot(depth))
        stored = await self._hub.stored_book(request.market)
        if stored is None:
            raise Unavailable("MARKETDATA_NOT_READY", f"{request.market} is catching up")
        del stored.bids[depth:]
        del stored.asks[depth:]
        levels = [_level(lv) for lv in stored.bids], [_level(lv) for lv in stored.asks]
        stored.checksum = checksum(*levels)
        return md.GetOrderBookResponse(book=stored)

    async def StreamOrderBook(  # type: ignore[override]
        self,
        request: md.StreamOrderBookRequest,
        context: grpc.aio.ServicerContext[md.StreamOrderBookRequest, bytes],
    ) -> None:
        """Writes the fan-out's serialized messages as they are (see `_add_service`)."""
        self._market(request.market)
        depth = self._depth(request.depth)
        fanout: BookFanout = self._feed(request.market).fanout
        subscriber = fanout.subscribe(depth)
        write, take = context.write, subscriber.next
        try:
            while True:
                await write(await take())
        finally:
            fanout.unsubscribe(subscriber)

    # ---------------------------------------------------------------- trades

    async def ListTrades(
        self,
        request: md.ListTradesRequest,
        context: grpc.aio.ServicerContext[md.ListTradesRequest, md.ListTradesResponse],
    ) -> md.ListTradesResponse:
        self._market(request.market)
        size = _page_size(request.page_size)
        start = _ns(request.start_time) if request.HasField("start_time") else None
        end = _ns(request.end_time) if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise _invalid("INVALID_TIME_RANGE", "end_time", "must be after start_time")
        before = _int_token("trades", request.page_token)
        found = await self._store.trades(
            request.market, start_ns=start, end_ns=end, before_seq=before, limit=size + 1
        )
        page = found[:size]
        return md.ListTradesResponse(
            trades=[trade_pb(t) for t in page],
            next_page_token=_token("trades", str(page[-1].seq)) if len(found) > size else "",
        )

    async def StreamTrades(
        self,
        request: md.StreamTradesRequest,
        context: grpc.aio.ServicerContext[md.StreamTradesRequest, md.StreamTradesResponse],
    ) -> AsyncIterator[md.StreamTradesResponse]:
        markets = self._markets_of(request.markets)
        subscriber = TradeSubscriber(markets, self._settings.trades_queue)
        self._hub.trade_subscribers.add(subscriber)
        try:
            while True:
                trades = await subscriber.next()
                if subscriber.overflowed:
                    raise ResourceExhausted(
                        "MARKETDATA_SLOW_CONSUMER",
                        "this stream fell too far behind; page the gap with ListTrades",
                    )
                yield md.StreamTradesResponse(trades=trades)
        finally:
            self._hub.trade_subscribers.discard(subscriber)

    # --------------------------------------------------------------- tickers

    async def _ticker(self, market: str) -> md.Ticker:
        ticker = self._hub.ticker(market)
        if ticker is None:
            ticker = await self._hub.stored_ticker(market)
        if ticker is None:
            raise Unavailable("MARKETDATA_NOT_READY", f"{market} is catching up")
        return ticker

    async def GetTicker(
        self,
        request: md.GetTickerRequest,
        context: grpc.aio.ServicerContext[md.GetTickerRequest, md.GetTickerResponse],
    ) -> md.GetTickerResponse:
        self._market(request.market)
        return md.GetTickerResponse(ticker=await self._ticker(request.market))

    async def ListTickers(
        self,
        request: md.ListTickersRequest,
        context: grpc.aio.ServicerContext[md.ListTickersRequest, md.ListTickersResponse],
    ) -> md.ListTickersResponse:
        wanted = self._markets_of(request.markets) or frozenset(self._markets)
        size = _page_size(request.page_size)
        after = _untoken("ticker", request.page_token) or ""
        symbols = [s for s in sorted(wanted) if s > after]
        page = symbols[:size]
        tickers = []
        for symbol in page:
            with contextlib.suppress(Unavailable):  # a market still catching up is left out
                tickers.append(await self._ticker(symbol))
        return md.ListTickersResponse(
            tickers=tickers,
            next_page_token=_token("ticker", page[-1]) if len(symbols) > size else "",
        )

    async def StreamTickers(
        self,
        request: md.StreamTickersRequest,
        context: grpc.aio.ServicerContext[md.StreamTickersRequest, md.StreamTickersResponse],
    ) -> AsyncIterator[md.StreamTickersResponse]:
        markets = self._markets_of(request.markets)
        subscriber = TickerSubscriber(markets)
        self._hub.ticker_subscribers.add(subscriber)
        try:
            first = [t for m in sorted(markets or self._markets) if (t := self._hub.ticker(m))]
            if first:
                yield md.StreamTickersResponse(tickers=first)
            while True:
                yield md.StreamTickersResponse(tickers=await subscriber.next())
        finally:
            self._hub.ticker_subscribers.discard(subscriber)

    # --------------------------------------------------------------- candles

    async def GetCandles(
        self,
        request: md.GetCandlesRequest,
        context: grpc.aio.ServicerContext[md.GetCandlesRequest, md.GetCandlesResponse],
    ) -> md.GetCandlesResponse:
        self._market(request.market)
        width = INTERVALS.get(request.interval)
        if width is None:
            raise _invalid("INVALID_INTERVAL", "interval", "required: one of the CandleIntervals")
        size = _page_size(request.page_size, _DEFAULT_CANDLES)
        now_s = self._clock() // 1_000_000_000
        start = request.start_time.seconds if request.HasField("start_time") else None
        end = request.end_time.seconds if request.HasField("end_time") else now_s + width
        if start is not None and end <= start:
            raise _invalid("INVALID_TIME_RANGE", "end_time", "must be after start_time")
        after = _int_token("candles", request.page_token)
        if after is not None:
            start = after
        bars = await self._store.candles(
            request.market, width, start_s=start, end_s=end, limit=size + 1
        )
        more = start is not None and len(bars) > size
        page = bars[:size] if start is not None else bars[-size:]
        return md.GetCandlesResponse(
            candles=[_candle_pb(request.market, request.interval, b, now_s) for b in page],
            next_page_token=_token("candles", str(page[-1].open_time_s + width)) if more else "",
        )


class _Registration:
    """Stands in for the server while the generated code registers the handlers."""

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = handlers


def _add_service(servicer: MarketDataService, server: grpc.aio.Server) -> None:
    """The generated registration, except that StreamOrderBook's responses leave as the
    bytes the fan-out serialized once for all its subscribers (no response serializer)."""
    registration = _Registration()
    marketdata_pb2_grpc.add_MarketDataServiceServicer_to_server(
        servicer, cast("grpc.aio.Server", registration)
    )
    handlers = registration.handlers
    handlers["StreamOrderBook"] = grpc.unary_stream_rpc_method_handler(
        servicer.StreamOrderBook,
        request_deserializer=md.StreamOrderBookRequest.FromString,
        response_serializer=None,
    )
    name = md.DESCRIPTOR.services_by_name["MarketDataService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _level(level: types_pb2.PriceLevel) -> Level:
    return Level(0, level.price, level.quantity, level.order_count)


async def build_server(
    settings: ChassisSettings,
    *,
    config: MarketDataSettings | None = None,
    catalog: Catalog | None = None,
    source: MatchSource | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> Server:
    """The composition root. `source` replaces match over the mesh (tests, benchmarks)."""
    config = MarketDataSettings.from_env() if config is None else config
    catalog = load_catalog() if catalog is None else catalog
    symbols = config.markets or tuple(sorted(catalog.markets))
    for symbol in symbols:
        if catalog.market(symbol) is None:
            raise ValueError(f"MARKETDATA_MARKETS names {symbol!r}, which is not a market")
    # Every method is PUBLIC, so no token is ever verified: without a JWKS the
    # policy still runs (and denies any method it does not name).
    keys = None if settings.jwks_url else StaticKeys(dict)
    server = Server(settings, keys=keys)
    infra = await connect(
        server,
        schema="marketdata",
        migrations=MIGRATIONS,
        nats=True,
        redis=settings.redis_url is not None,
    )
    assert infra.pool is not None and infra.nats is not None
    store = Store(infra.pool)
    await ensure_stream(infra.nats.jetstream(), TRADES_STREAM, ["md.*.trades"], max_age_s=86_400.0)
    if source is None:
        target = config.match_target or settings.mesh_addr
        if target is None:
            raise ValueError("market data needs MARKETDATA_MATCH_TARGET or CEX_MESH_ADDR")
        credentials = service_credentials(settings)
        channel = grpc.aio.insecure_channel(
            target,
            interceptors=[
                *client_interceptors(),
                *(service_auth_interceptors(credentials) if credentials else []),
            ],
            options=(("grpc.default_authority", "match"),),
        )
        server.on_stop(channel.close)
        source = GrpcMatchSource(channel)
    hub = Hub(config, nats=infra.nats, redis=infra.redis, clock=clock)
    for symbol in symbols:
        feed = MarketFeed(
            catalog.markets[symbol],
            nats=infra.nats,
            source=source,
            store=store,
            fanout=hub.fanout(symbol),
            settings=config,
            on_trades=hub.on_trades,
            clock=clock,
        )
        hub.feeds[symbol] = feed
        await server.enter(background(feed.run(), f"marketdata-feed-{symbol}"))
    await server.enter(background(hub.run(), "marketdata-hub"))
    server.add(
        md.DESCRIPTOR.services_by_name["MarketDataService"],
        _add_service,
        MarketDataService(catalog, symbols, hub, store, config, clock),
        policy=POLICY,
    )
    return server
