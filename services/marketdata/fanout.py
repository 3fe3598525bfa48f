"""Fan-out: book deltas, trades and tickers to gRPC streams and NATS subjects.

Books. Subscribers at the same depth share a channel: one `DepthView` whose
delta is computed once per batch of match events and serialized once; every
subscriber in step writes those same bytes (StreamOrderBook is registered with
an identity response serializer, server.py). A batch costs the channel one
packet and a wake-up of the subscribers that were waiting; nothing is done per
subscriber that is still writing. A subscriber that cannot keep up does not
queue messages: it keeps only the seq and the view (the channel's own lists) of
the last message it sent, and when it is ready again it gets one delta from
that view to the latest, built and serialized once for every subscriber that
is behind from the same seq. So its memory is bounded by its depth, not by
time. When that delta would carry more than `max_levels` levels, or it is more
than `max_lag` events behind, it gets a fresh snapshot flagged `resynced`
instead. Every message chains: a delta's prev_seq is the seq of the previous
message this subscriber received.

A channel that saw only batches outside its depth still moves its seq: after
`heartbeat_s` without a message it sends an empty delta, so a quiet client
learns the seq it is at.

NATS gets its own channel at `nats_depth` (`md.<market>.book`: the same
StreamOrderBookResponse messages, deltas plus a snapshot every few seconds),
so its chain is independent of the gRPC subscribers'.

Trades cannot be conflated: a StreamTrades subscriber has a bounded queue and
is ended with RESOURCE_EXHAUSTED (MARKETDATA_SLOW_CONSUMER) when it overflows;
it can page the gap with ListTrades. Tickers are conflated per market.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nats.aio.client import Client as Nats
from redis.asyncio import Redis

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2
from services.chassis import timestamp_ns
from services.chassis.money import decimal_text

from .config import MarketDataSettings
from .domain import (
    ASK,
    BID,
    BookDelta,
    DepthView,
    L2Book,
    Level,
    TickerStats,
    TradeFact,
    checksum,
    diff,
)

if TYPE_CHECKING:
    from .consumer import MarketFeed

_log = logging.getLogger("cex.marketdata.fanout")

__all__ = [
    "BookFanout",
    "BookSubscriber",
    "DeltaPacket",
    "Hub",
    "Limits",
    "TickerSubscriber",
    "TradeSubscriber",
    "book_pb",
]


def levels_pb(levels: Iterable[Level]) -> list[types_pb2.PriceLevel]:
    return [
        types_pb2.PriceLevel(price=lv.price, quantity=lv.quantity, order_count=lv.order_count)
        for lv in levels
    ]


def book_pb(
    market: str,
    seq: int,
    bids: Sequence[Level],
    asks: Sequence[Level],
    checksum: int,
    ns: int,
    status: int = types_pb2.MARKET_STATUS_TRADING,
) -> md.OrderBook:
    return md.OrderBook(
        market=market,
        seq=seq,
        bids=levels_pb(bids),
        asks=levels_pb(asks),
        checksum=checksum,
        update_time=timestamp_ns(ns),
        status=status,  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class Limits:
    max_levels: int = 4000
    max_lag: int = 100_000
    heartbeat_s: float = 1.0


def _delta_bytes(
    market: str,
    prev_seq: int,
    seq: int,
    bids: Iterable[Level],
    asks: Iterable[Level],
    checksum: int,
    time_ns: int,
    status: int,
) -> bytes:
    message = md.StreamOrderBookResponse(
        delta=md.OrderBookDelta(
            market=market,
            prev_seq=prev_seq,
            seq=seq,
            bids=levels_pb(bids),
            asks=levels_pb(asks),
            checksum=checksum,
            update_time=timestamp_ns(time_ns),
            status=status,  # type: ignore[arg-type]
        )
    )
    return message.SerializeToString()


@dataclass(slots=True)
class DeltaPacket:
    """One channel's delta for one batch, serialized at most once for every holder, and
    the view it leaves them with (`bids`, `asks`: the channel's lists, never mutated)."""

    market: str
    prev_seq: int
    seq: int
    delta: BookDelta
    time_ns: int
    bids: list[Level]
    asks: list[Level]
    status: int
    _data: bytes | None = None

    def data(self) -> bytes:
        """The serialized StreamOrderBookResponse."""
        if self._data is None:
            d = self.delta
            self._data = _delta_bytes(
                self.market,
                self.prev_seq,
                self.seq,
                d.bids,
                d.asks,
                d.checksum,
                self.time_ns,
                self.status,
            )
        return self._data


@dataclass(eq=False, slots=True)
class _Channel:
    """The subscribers at one depth, and what they all read from: the latest packet,
    the merged deltas of those behind it (one per starting seq) and the snapshot."""

    market: str
    view: DepthView
    seq: int
    chain_seq: int  # seq of the last packet sent on this channel
    time_ns: int
    last_emit: float
    last: DeltaPacket | None = None
    subscribers: set[BookSubscriber] = field(default_factory=set)
    nats: _NatsSink | None = None
    idle: list[asyncio.Future[None]] = field(default_factory=list)
    _merged: dict[int, bytes | None] = field(default_factory=dict)
    _snapshots: dict[bool, bytes] = field(default_factory=dict)

    def snapshot(self) -> md.OrderBook:
        v = self.view
        return book_pb(self.market, self.seq, v.bids, v.asks, v.checksum, self.time_ns, v.status)

    def snapshot_data(self, resynced: bool) -> bytes:
        data = self._snapshots.get(resynced)
        if data is None:
            message = md.StreamOrderBookResponse(snapshot=self.snapshot(), resynced=resynced)
            data = self._snapshots[resynced] = message.SerializeToString()
        return data

    def merged(
        self, prev_seq: int, bids: list[Level], asks: list[Level], max_levels: int
    ) -> bytes | None:
        """The delta from the view a holder got at `prev_seq` to the last packet's, once
        per `prev_seq`; None when it would carry more than `max_levels` levels."""
        last = self.last
        assert last is not None
        if prev_seq in self._merged:
            return self._merged[prev_seq]
        changed_bids, changed_asks = diff(bids, last.bids), diff(asks, last.asks)
        data = None
        if len(changed_bids) + len(changed_asks) <= max_levels:
            data = _delta_bytes(
                self.market,
                prev_seq,
                last.seq,
                changed_bids,
                changed_asks,
                last.delta.checksum,
                last.time_ns,
                last.status,
            )
        self._merged[prev_seq] = data
        return data

    def advance(self, book: L2Book, time_ns: int, now: float, heartbeat_s: float) -> None:
        delta = self.view.advance(book)
        self.seq, self.time_ns = book.seq, time_ns
        self._snapshots.clear()
        if delta.empty and (self.seq == self.chain_seq or now - self.last_emit < heartbeat_s):
            return
        self.emit(delta, now)

    def emit(self, delta: BookDelta, now: float) -> None:
        v = self.view
        packet = DeltaPacket(
            self.market, self.chain_seq, self.seq, delta, self.time_ns, v.bids, v.asks, v.status
        )
        self.chain_seq, self.last_emit, self.last = self.seq, now, packet
        self._merged.clear()
        if self.nats is not None:
            self.nats.offer(packet)
        idle, self.idle = self.idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    def heartbeat(self, now: float, heartbeat_s: float) -> None:
        if self.seq > self.chain_seq and now - self.last_emit >= heartbeat_s:
            self.emit(BookDelta((), (), self.view.checksum), now)


class BookSubscriber:
    """One StreamOrderBook call: a snapshot, then deltas, as serialized messages.

    It owes nothing per delta: all it keeps is the seq and the view (the channel's
    lists) of the last message it got. When it is ready for more, the channel's
    last packet follows on if it is in step; otherwise it gets the merged delta
    from its view to the latest one, shared with every holder at the same seq.
    More than `max_levels` levels in that, or more than `max_lag` events behind,
    and it gets a fresh snapshot flagged `resynced` instead."""

    def __init__(self, fanout: BookFanout, depth: int) -> None:
        self.fanout = fanout
        self.depth = depth
        self._waiter: asyncio.Future[None] | None = None
        self._snapshot_due = True
        self._resynced = False
        self._channel: _Channel | None = None
        self._sent_seq = 0
        self._sent_bids: list[Level] = []
        self._sent_asks: list[Level] = []
        self.resyncs = 0
        self.closed = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def resync(self) -> None:
        """Drop what this subscriber owes; it gets a fresh snapshot next."""
        self._resynced = self._resynced or not self._snapshot_due or self._sent_seq > 0
        self._snapshot_due = True
        self.resyncs += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    @property
    def due(self) -> bool:
        """Is there something to send now?"""
        if self._snapshot_due:
            return self.fanout.ready
        last = None if self._channel is None else self._channel.last
        return last is not None and last.seq > self._sent_seq

    def _take(self) -> bytes | None:
        if self._snapshot_due:
            channel = self.fanout.channel_of(self)
            if channel is None:  # the feed is not ready yet
                return None
            snapshot = channel.snapshot_data(self._resynced)
            self._channel = channel
            self._sent_seq = channel.seq
            self._sent_bids, self._sent_asks = channel.view.bids, channel.view.asks
            self._snapshot_due = self._resynced = False
            return snapshot
        channel = self._channel
        last = None if channel is None else channel.last
        if channel is None or last is None or last.seq <= self._sent_seq:
            return None
        limits = self.fanout.limits
        data: bytes | None
        if last.prev_seq == self._sent_seq:
            data = last.data()  # shared with every subscriber in step
        elif last.seq - self._sent_seq > limits.max_lag:
            data = None
        else:
            data = channel.merged(
                self._sent_seq, self._sent_bids, self._sent_asks, limits.max_levels
            )
        if data is None:  # too far behind: a snapshot instead
            self.resync()
            return self._take()
        self._sent_seq = last.seq
        self._sent_bids, self._sent_asks = last.bids, last.asks
        return data

    async def next(self) -> bytes:
        """The next message to send (a serialized StreamOrderBookResponse); waits for one."""
        while True:
            if self.closed:
                raise asyncio.CancelledError
            data = self._take()
            if data is not None:
                return data
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self._channel is not None and not self._snapshot_due:
                self._channel.idle.append(waiter)
            try:
                await waiter
            finally:
                self._waiter = None


class _NatsSink:
    """The md.<market>.book channel: every packet, and snapshots when asked."""

    def __init__(self, fanout: BookFanout) -> None:
        self.fanout = fanout
        self.outbox: list[bytes] = []

    def offer(self, packet: DeltaPacket) -> None:
        self.outbox.append(packet.data())

    def resync(self) -> None:
        channel = self.fanout.nats_channel
        if channel is not None:
            channel.chain_seq = channel.seq
            self.outbox.append(channel.snapshot_data(True))


class BookFanout:
    """One market's book channels. The feed owns the book; it calls `reset` after
    (re)building it and `update` after each batch of events applied to it."""

    def __init__(
        self,
        market: str,
        limits: Limits,
        *,
        nats_depth: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.market = market
        self.limits = limits
        self._clock = clock
        self.book: L2Book | None = None
        self.time_ns = 0
        self._channels: dict[int, _Channel] = {}
        self._owner: dict[BookSubscriber, int] = {}
        self._nats_depth = nats_depth
        self.nats: _NatsSink | None = _NatsSink(self) if nats_depth else None
        self.nats_channel: _Channel | None = None

    @property
    def ready(self) -> bool:
        return self.book is not None

    @property
    def subscribers(self) -> int:
        return len(self._owner)

    def _channel(self, depth: int) -> _Channel:
        assert self.book is not None
        seq = self.book.seq
        return _Channel(
            self.market, DepthView.of(self.book, depth), seq, seq, self.time_ns, self._clock()
        )

    def reset(self, book: L2Book, time_ns: int) -> None:
        """A new book (bootstrap, or recovery): every holder starts over from a snapshot."""
        self.book, self.time_ns = book, time_ns
        for depth, old in list(self._channels.items()):
            self._channels[depth] = self._channel(depth)
            self._channels[depth].subscribers = old.subscribers
        for subscriber in self._owner:  # those that waited for a book too
            subscriber.resync()
        if self.nats is not None and self._nats_depth:
            self.nats_channel = self._channel(self._nats_depth)
            self.nats_channel.nats = self.nats
            self.nats.resync()

    def update(self, time_ns: int) -> None:
        """The book moved (in place): deltas to every channel."""
        assert self.book is not None
        self.time_ns = time_ns
        now = self._clock()
        heartbeat = self.limits.heartbeat_s
        for channel in self._channels.values():
            channel.advance(self.book, time_ns, now, heartbeat)
        if self.nats_channel is not None:
            self.nats_channel.advance(self.book, time_ns, now, 0.0)

    def heartbeat(self) -> None:
        now = self._clock()
        for channel in self._channels.values():
            channel.heartbeat(now, self.limits.heartbeat_s)

    def nats_snapshot(self) -> None:
        if self.nats is not None:
            self.nats.resync()

    def take_nats(self) -> list[bytes]:
        if self.nats is None or not self.nats.outbox:
            return []
        out, self.nats.outbox = self.nats.outbox, []
        return out

    def subscribe(self, depth: int) -> BookSubscriber:
        subscriber = BookSubscriber(self, depth)
        self._owner[subscriber] = depth
        if self.book is not None:
            self.channel_of(subscriber)
        return subscriber

    def channel_of(self, subscriber: BookSubscriber) -> _Channel | None:
        if self.book is None:
            return None
        channel = self._channels.get(subscriber.depth)
        if channel is None:
            channel = self._channels[subscriber.depth] = self._channel(subscriber.depth)
        channel.subscribers.add(subscriber)
        return channel

    def unsubscribe(self, subscriber: BookSubscriber) -> None:
        depth = self._owner.pop(subscriber, None)
        channel = self._channels.get(depth or 0)
        if channel is not None:
            channel.subscribers.discard(subscriber)
            if not channel.subscribers:
                del self._channels[depth or 0]
        subscriber.close()

    def snapshot(self, depth: int) -> md.OrderBook:
        assert self.book is not None
        bids, asks = self.book.top(BID, depth), self.book.top(ASK, depth)
        return book_pb(
            self.market,
            self.book.seq,
            bids,
            asks,
            checksum(bids, asks),
            self.time_ns,
            self.book.status,
        )


class TradeSubscriber:
    """One StreamTrades call: a bounded queue of trade batches."""

    def __init__(self, markets: frozenset[str], size: int) -> None:
        self.markets = markets
        self._queue: asyncio.Queue[list[md.Trade]] = asyncio.Queue(maxsize=size)
        self.overflowed = False

    def wants(self, market: str) -> bool:
        return not self.markets or market in self.markets

    def offer(self, trades: list[md.Trade]) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(trades)
        except asyncio.QueueFull:
            self.overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self._queue.put_nowait([])  # wakes the reader, which sees `overflowed`

    async def next(self) -> list[md.Trade]:
        trades = await self._queue.get()
        if self.overflowed:
            return []
        return trades


class TickerSubscriber:
    """One StreamTickers call: the latest ticker per market, conflated."""

    def __init__(self, markets: frozenset[str]) -> None:
        self.markets = markets
        self._pending: dict[str, md.Ticker] = {}
        self._wake = asyncio.Event()

    def wants(self, market: str) -> bool:
        return not self.markets or market in self.markets

    def offer(self, ticker: md.Ticker) -> None:
        self._pending[ticker.market] = ticker
        self._wake.set()

    async def next(self) -> list[md.Ticker]:
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        out = [self._pending[m] for m in sorted(self._pending)]
        self._pending.clear()
        return out


def trade_pb(trade: TradeFact) -> md.Trade:
    return md.Trade(
        trade_id=trade.trade_id,
        market=trade.market,
        price=decimal_text(trade.price),
        quantity=decimal_text(trade.quantity),
        quote_quantity=decimal_text(trade.quote_quantity),
        taker_side=trade.taker_side,  # type: ignore[arg-type]
        trade_time=timestamp_ns(trade.time_ns),
        seq=trade.seq,
    )


def ticker_pb(
    market: str, stats: TickerStats, book: L2Book, time_ns: int, now_ns: int
) -> md.Ticker:
    bid, ask = book.top(BID, 1), book.top(ASK, 1)
    return md.Ticker(
        market=market,
        last_price=decimal_text(stats.last_price),
        last_quantity=decimal_text(stats.last_quantity),
        best_bid_price=bid[0].price if bid else "",
        best_bid_quantity=bid[0].quantity if bid else "",
        best_ask_price=ask[0].price if ask else "",
        best_ask_quantity=ask[0].quantity if ask else "",
        open_price=decimal_text(stats.open),
        high_price=decimal_text(stats.high),
        low_price=decimal_text(stats.low),
        volume=decimal_text(stats.volume),
        quote_volume=decimal_text(stats.quote_volume),
        price_change=decimal_text(stats.price_change),
        price_change_percent=decimal_text(stats.price_change_percent),
        trade_count=stats.trade_count,
        window_start_time=timestamp_ns(stats.window_start_s * 1_000_000_000),
        update_time=timestamp_ns(time_ns or now_ns),
        seq=book.seq,
    )


TRADES_STREAM = "MD_TRADES"


def book_subject(market: str) -> str:
    return f"md.{market}.book"


def ticker_subject(market: str) -> str:
    return f"md.{market}.ticker"


def trades_subject(market: str) -> str:
    return f"md.{market}.trades"


class Hub:
    """Everything that leaves the process: streams, NATS subjects, Redis keys.

    Trades go to StreamTrades subscribers and to JetStream (`md.<market>.trades`,
    one `Trade` per message, Nats-Msg-Id "<market>:<trade_id>"). Every
    `ticker_interval_s` the tickers that changed go to StreamTickers
    subscribers and `md.<market>.ticker`; every `redis_interval_s` the books
    that moved and the tickers are written to Redis (`md:<market>:book`,
    `md:<market>:ticker`, serialized OrderBook and Ticker).
    """

    def __init__(
        self,
        settings: MarketDataSettings,
        *,
        nats: Nats | None = None,
        redis: Redis | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.settings = settings
        self.limits = Limits(
            settings.subscriber_max_levels, settings.subscriber_max_lag, settings.heartbeat_s
        )
        self._nats = nats
        self._js = nats.jetstream() if nats is not None else None
        self._redis = redis
        self._clock = clock
        self.feeds: dict[str, MarketFeed] = {}
        self.trade_subscribers: set[TradeSubscriber] = set()
        self.ticker_subscribers: set[TickerSubscriber] = set()
        self._stored_seq: dict[str, int] = {}

    def fanout(self, market: str) -> BookFanout:
        return BookFanout(
            market, self.limits, nats_depth=self.settings.nats_depth if self._nats else None
        )

    async def on_trades(self, market: str, trades: list[TradeFact]) -> None:
        messages = [trade_pb(t) for t in trades]
        for subscriber in self.trade_subscribers:
            if subscriber.wants(market):
                subscriber.offer(messages)
        if self._js is None:
            return
        subject = trades_subject(market)
        try:
            acks = [
                await self._js.publish_async(
                    subject,
                    m.SerializeToString(),
                    headers={"Nats-Msg-Id": f"{market}:{m.trade_id}"},
                )
                for m in messages
            ]
            for ack in acks:
                await ack
        except Exception as error:  # the tape in PostgreSQL is the record; JetStream a copy
            _log.warning("publishing %s trades to JetStream failed: %r", market, error)

    def ticker(self, market: str) -> md.Ticker | None:
        feed = self.feeds.get(market)
        if feed is None or feed.book is None:
            return None
        now = self._clock()
        return ticker_pb(market, feed.ticker.stats(now), feed.book, feed.time_ns, now)

    async def run(self) -> None:
        """Tickers out and Redis up to date, until cancelled."""
        s = self.settings
        tick = min(s.ticker_interval_s, s.redis_interval_s)
        last_tickers = 0.0
        while True:
            await asyncio.sleep(tick)
            try:
                now = time.monotonic()
                if now - last_tickers >= s.ticker_interval_s:
                    last_tickers = now
                    await self._tickers()
                await self._store_books()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                _log.warning("publishing tickers and snapshots failed: %r", error)

    async def _tickers(self) -> None:
        changed = []
        for market, feed in self.feeds.items():
            if feed.ticker_dirty and feed.ready:
                feed.ticker_dirty = False
                ticker = self.ticker(market)
                if ticker is not None:
                    changed.append(ticker)
        for ticker in changed:
            for subscriber in self.ticker_subscribers:
                if subscriber.wants(ticker.market):
                    subscriber.offer(ticker)
            data = ticker.SerializeToString()
            if self._nats is not None:
                await self._nats.publish(ticker_subject(ticker.market), data)
            if self._redis is not None:
                await self._redis.set(f"md:{ticker.market}:ticker", data)

    async def _store_books(self) -> None:
        if self._redis is None:
            return
        for market, feed in self.feeds.items():
            if feed.book is None or self._stored_seq.get(market) == feed.book.seq:
                continue
            self._stored_seq[market] = feed.book.seq
            snapshot = feed.fanout.snapshot(self.settings.max_depth)
            await self._redis.set(f"md:{market}:book", snapshot.SerializeToString())

    async def stored_book(self, market: str) -> md.OrderBook | None:
        if self._redis is None:
            return None
        data = await self._redis.get(f"md:{market}:book")
        return None if not isinstance(data, bytes) else md.OrderBook.FromString(data)

    async def stored_ticker(self, market: str) -> md.Ticker | None:
        if self._redis is None:
            return None
        data = await self._redis.get(f"md:{market}:ticker")
        return None if not isinstance(data, bytes) else md.Ticker.FromString(data)
