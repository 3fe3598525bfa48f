"""marketdata service: proto <-> the feeds, the store and the fan-out; errors.

Every method is public (no token): market data is what anyone may read. Input
is validated here and refused with INVALID_ARGUMENT and field violations
(MARKETDATA_INVALID_*), unknown markets with NOT_FOUND
(MARKETDATA_UNKNOWN_MARKET). A market whose feed has not caught up yet
answers Get calls from the last snapshot in Redis, else UNAVAILABLE
(MARKETDATA_NOT_READY); streams wait for it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

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
    bad_page_token,
    connect,
    ensure_stream,
    invalid_field,
    load_catalog,
    page_size,
    page_token,
    parse_page_token,
    read_page_token,
    service_credentials,
)
from services.chassis.authn import service_auth_interceptors
from services.chassis.interceptors import client_interceptors
from services.chassis.listings import Listings
from services.chassis.money import decimal_text
from services.chassis.tokens import StaticKeys

from .config import MarketDataSettings
from .consumer import GrpcMatchSource, MarketFeed, MatchSource
from .domain import INTERVALS, Bar, Level, checksum
from .fanout import (
    TRADES_STREAM,
    BookFanout,
    Hub,
    TickerSubscriber,
    TradeSubscriber,
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
    return invalid_field(f"MARKETDATA_{reason}", field, description, f"MARKETDATA_{reason}")


_PAGE_TOKEN_INVALID = "MARKETDATA_INVALID_PAGE_TOKEN"


def _page_size(value: int, default: int = _DEFAULT_PAGE) -> int:
    return page_size(
        value, default=default, maximum=_MAX_PAGE, reason="MARKETDATA_INVALID_PAGE_SIZE"
    )


def _after(kind: str, token: str) -> str | None:
    """Where a list of `kind` goes on: the key its page token carries (None: the start)."""
    found = read_page_token(token, kind, parts=1, reason=_PAGE_TOKEN_INVALID)
    if found is not None and not found[0]:
        raise bad_page_token(_PAGE_TOKEN_INVALID)
    return None if found is None else found[0]


class _Paged(Protocol):
    page_size: int
    page_token: str


def _symbol_page(kind: str, symbols: Iterable[str], request: _Paged) -> tuple[list[str], str]:
    """A page of market symbols in order, and the token of the next."""
    size = _page_size(request.page_size)
    after = _after(kind, request.page_token) or ""
    rest = [s for s in sorted(symbols) if s > after]
    page = rest[:size]
    return page, page_token(kind, page[-1]) if len(rest) > size else ""


def _market_pb(
    market: Market, status: int = types_pb2.MARKET_STATUS_TRADING, reason: str = ""
) -> types_pb2.Market:
    return types_pb2.Market(
        symbol=market.symbol,
        base_asset=market.base.symbol,
        quote_asset=market.quote.symbol,
        tick_size=decimal_text(market.tick_size),
        lot_size=decimal_text(market.lot_size),
        min_quantity=decimal_text(market.min_quantity),
        max_quantity=decimal_text(market.max_quantity),
        min_notional=decimal_text(market.min_notional),
        status=status,  # type: ignore[arg-type]
        status_reason=reason,
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
        # Kept sorted; a market listed at runtime is added to it (ADR 0018).
        self._markets = markets if isinstance(markets, list) else sorted(markets)
        self._hub = hub
        self._store = store
        self._settings = settings
        self._clock = clock

    # ----------------------------------------------------------------- input

    def _market(self, symbol: str, field: str = "market", *, fed: bool = True) -> Market:
        """The catalog's market named; `fed`: one this replica keeps the data of."""
        if not symbol:
            raise _invalid("MISSING_MARKET", field, "required")
        market = self._catalog.market(symbol)
        if market is None or (fed and symbol not in self._hub.feeds):
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

    async def _market_of(self, market: Market) -> types_pb2.Market:
        """A market's spec with its status: the feed's (match's, as of the feed's seq),
        else the last book stored in Redis (another replica's feed), else TRADING."""
        feed = self._hub.feeds.get(market.symbol)
        if feed is not None and feed.book is not None:
            return _market_pb(market, feed.book.status, feed.status_reason)
        stored = await self._hub.stored_book(market.symbol)
        if stored is not None and stored.status:
            return _market_pb(market, stored.status)
        return _market_pb(market)

    # --------------------------------------------------------------- markets

    async def ListMarkets(
        self,
        request: md.ListMarketsRequest,
        context: grpc.aio.ServicerContext[md.ListMarketsRequest, md.ListMarketsResponse],
    ) -> md.ListMarketsResponse:
        page, token = _symbol_page("market", self._catalog.markets, request)
        return md.ListMarketsResponse(
            markets=[await self._market_of(self._catalog.markets[s]) for s in page],
            next_page_token=token,
        )

    async def GetMarket(
        self,
        request: md.GetMarketRequest,
        context: grpc.aio.ServicerContext[md.GetMarketRequest, md.GetMarketResponse],
    ) -> md.GetMarketResponse:
        market = self._market(request.market, fed=False)
        return md.GetMarketResponse(market=await self._market_of(market))

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
        start = request.start_time.ToNanoseconds() if request.HasField("start_time") else None
        end = request.end_time.ToNanoseconds() if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise _invalid("INVALID_TIME_RANGE", "end_time", "must be after start_time")
        before = parse_page_token(
            request.page_token, "trades", int, parts=1, reason=_PAGE_TOKEN_INVALID
        )
        found = await self._store.trades(
            request.market, start_ns=start, end_ns=end, before_seq=before, limit=size + 1
        )
        page = found[:size]
        return md.ListTradesResponse(
            trades=[trade_pb(t) for t in page],
            next_page_token=page_token("trades", str(page[-1].seq)) if len(found) > size else "",
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
        page, token = _symbol_page("ticker", wanted, request)
        tickers = []
        for symbol in page:
            with contextlib.suppress(Unavailable):  # a market still catching up is left out
                tickers.append(await self._ticker(symbol))
        return md.ListTickersResponse(tickers=tickers, next_page_token=token)

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
        after = parse_page_token(
            request.page_token, "candles", int, parts=1, reason=_PAGE_TOKEN_INVALID
        )
        if after is not None:
            start = after
        bars = await self._store.candles(
            request.market, width, start_s=start, end_s=end, limit=size + 1
        )
        more = start is not None and len(bars) > size
        page = bars[:size] if start is not None else bars[-size:]
        return md.GetCandlesResponse(
            candles=[_candle_pb(request.market, request.interval, b, now_s) for b in page],
            next_page_token=page_token("candles", str(page[-1].open_time_s + width))
            if more
            else "",
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
    for symbol in config.markets:
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
        listings: Listings | None = Listings(catalog, channel, every_s=2.0)
    else:
        listings = None
    if listings is not None:  # markets listed at runtime (ADR 0018), fed like the others
        await listings.load()
    symbols = sorted(config.markets or catalog.markets)
    hub = Hub(config, nats=infra.nats, redis=infra.redis, clock=clock)
    listed_feeds: list[asyncio.Task[None]] = []

    nats = infra.nats

    def feed_of(market: Market) -> MarketFeed:
        feed = MarketFeed(
            market,
            nats=nats,
            source=source,
            store=store,
            fanout=hub.fanout(market.symbol),
            settings=config,
            on_trades=hub.on_trades,
            clock=clock,
        )
        hub.feeds[market.symbol] = feed
        return feed

    def listed(market: Market) -> None:
        """A market listed while running: feed it (unless this replica feeds a list)."""
        if config.markets or market.symbol in hub.feeds:
            return
        feed = feed_of(market)
        listed_feeds.append(
            asyncio.create_task(feed.run(), name=f"marketdata-feed-{market.symbol}")
        )
        bisect.insort(symbols, market.symbol)

    async def stop_listed() -> None:
        for task in listed_feeds:
            task.cancel()
        await asyncio.gather(*listed_feeds, return_exceptions=True)

    for symbol in symbols:
        feed = feed_of(catalog.markets[symbol])
        await server.enter(background(feed.run(), f"marketdata-feed-{symbol}"))
    if listings is not None:
        listings.on_added = listed
        await server.enter(background(listings.run(), "marketdata-listings"))
        server.on_stop(stop_listed)
    await server.enter(background(hub.run(), "marketdata-hub"))
    server.add(
        md.DESCRIPTOR.services_by_name["MarketDataService"],
        _add_service,
        MarketDataService(catalog, symbols, hub, store, config, clock),
        policy=POLICY,
    )
    return server
