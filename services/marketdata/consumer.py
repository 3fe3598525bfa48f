"""The feed: one market's match events into its book, tape, candles and ticker.

Events arrive on core NATS from `match.events.<market>` (the subject match
publishes to JetStream; a plain subscription receives the same messages with
no consumer state, which suits replicas that each need every event). Nothing
here trusts that path: every batch is checked against the book's seq,
duplicates are dropped and a gap is filled from match's `ReplayEvents`, the
source of truth. After `idle_check_s` without events the feed asks match for
its seq, so a lost tail is found too.

Start (and restart after any failure): subscribe first (buffering), take
match's L2 book (GetOrderBook, all levels, at seq B), bring the stored tape and
candles from their cursor up to B through ReplayEvents, rebuild the ticker
from the stored one-minute candles, then apply the buffered and live events
after B. Every subscriber gets a fresh snapshot. So a process killed at any
point comes back consistent: the book is match's, and the tape and candles
hold every trade exactly once (store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2
from services.chassis import Market, match_events
from services.chassis.money import parse_decimal
from services.chassis.tracing import SpanKind, batch_span, message_context

from .config import MarketDataSettings
from .domain import ASK, BID, BUCKET_S, L2Book, Level, RollingTicker, TradeFact
from .fanout import BookFanout
from .store import Store

__all__ = ["GrpcMatchSource", "MarketFeed", "MatchSource", "trade_fact"]

_log = logging.getLogger("cex.marketdata.feed")
_PERSIST_IDLE_S = 2.0  # a cursor that moved without trades is written this often
_MAX_UNWRITTEN = 200_000  # trades waiting for PostgreSQL before the feed starts over


class MatchSource(Protocol):
    async def book(self, market: str, depth: int = 0) -> match_pb2.OrderBook: ...

    def replay(
        self, market: str, from_seq: int, to_seq: int
    ) -> AsyncIterator[Sequence[match_pb2.MatchEvent]]: ...


class GrpcMatchSource:
    """match's GetOrderBook and ReplayEvents over a channel (the mesh, or direct); the
    channel carries this service's token (match's methods are INTERNAL)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 30.0) -> None:
        self._stub = match_pb2_grpc.MatchServiceStub(channel)
        self._timeout = timeout_s

    async def book(self, market: str, depth: int = 0) -> match_pb2.OrderBook:
        request = match_pb2.GetOrderBookRequest(
            market=market, level=match_pb2.BOOK_LEVEL_L2, depth=depth
        )
        reply = await self._stub.GetOrderBook(request, timeout=self._timeout)
        return reply.book

    async def replay(
        self, market: str, from_seq: int, to_seq: int
    ) -> AsyncIterator[Sequence[match_pb2.MatchEvent]]:
        request = match_pb2.ReplayEventsRequest(market=market, from_seq=from_seq, to_seq=to_seq)
        async for response in self._stub.ReplayEvents(request, timeout=self._timeout):
            yield response.events


def trade_fact(event: match_pb2.MatchEvent) -> TradeFact:
    t = event.trade
    return TradeFact(
        event.market,
        event.seq,
        t.trade_id,
        parse_decimal(t.price),
        parse_decimal(t.quantity),
        parse_decimal(t.quote_quantity),
        t.taker_side,
        event.event_time.ToNanoseconds(),
    )


class MarketFeed:
    def __init__(
        self,
        market: Market,
        *,
        nats: Nats,
        source: MatchSource,
        store: Store,
        fanout: BookFanout,
        settings: MarketDataSettings,
        on_trades: Callable[[str, list[TradeFact]], Awaitable[None]],
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.market = market
        self._nats = nats
        self._source = source
        self._store = store
        self.fanout = fanout
        self._settings = settings
        self._on_trades = on_trades
        self._clock = clock
        self.ticker = RollingTicker(bucket_s=BUCKET_S)
        self.book: L2Book | None = None
        self.status_reason = ""  # why the market has its status (book.status)
        self.time_ns = 0
        self.ticker_dirty = False
        self.events = 0
        self.gaps = 0
        self.dropped = 0
        self.restarts = 0
        self._persisted_seq = 0
        self._unwritten: list[TradeFact] = []
        self._unwritten_seq = 0
        self._to_write = asyncio.Event()
        self._nats_snapshot_at = 0.0
        self._delay = 0.5  # back-off between restarts; reset once ready

    @property
    def ready(self) -> bool:
        return self.book is not None

    async def run(self) -> None:
        """Follow the market until cancelled; start over (with back-off) after any failure."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.restarts += 1
                if self.book is None:  # not up yet (match or the mesh still starting)
                    _log.info("feed %s waits for match: %r", self.market.symbol, error)
                else:
                    _log.warning("feed %s restarts after: %r", self.market.symbol, error)
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, 5.0)

    async def _follow(self) -> None:
        s = self._settings
        queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=s.max_batch * 100)

        async def on_message(message: Msg) -> None:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.dropped += 1  # the gap is filled from match later

        subject = f"match.events.{self.market.symbol}"
        sub = await self._nats.subscribe(subject, cb=on_message, pending_msgs_limit=1_000_000)
        writer: asyncio.Task[None] | None = None
        try:
            await self._bootstrap()
            writer = asyncio.create_task(self._write(), name=f"tape-{self.market.symbol}")
            idle_since = time.monotonic()
            dropped_seen = self.dropped
            while True:
                if writer.done():  # PostgreSQL failed: start over from the stored cursor
                    writer.result()
                    raise RuntimeError("the tape writer stopped")
                try:
                    first = await asyncio.wait_for(queue.get(), timeout=s.heartbeat_s)
                except TimeoutError:
                    self.fanout.heartbeat()
                    if time.monotonic() - idle_since >= s.idle_check_s:
                        await self._check_tail()
                        idle_since = time.monotonic()
                    await self._publish_nats()
                    continue
                raw = [first]
                while len(raw) < s.max_batch and not queue.empty():
                    raw.append(queue.get_nowait())
                events: list[match_pb2.MatchEvent] = []
                for message in raw:
                    try:
                        events += match_events(message.data)
                    except DecodeError:
                        _log.warning("unreadable match event on %s; replay fills it", subject)
                traces = map(message_context, raw)
                with batch_span("marketdata.apply", traces, kind=SpanKind.CONSUMER):
                    await self.apply(events)
                idle_since = time.monotonic()
                if self.dropped != dropped_seen and queue.empty():
                    dropped_seen = self.dropped  # we lost some ourselves: is it the tail?
                    await self._check_tail()
        finally:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            await sub.unsubscribe()

    async def _bootstrap(self) -> None:
        symbol = self.market.symbol
        engine = await self._source.book(symbol)
        cursor = await self._store.cursor(symbol)
        if cursor < engine.seq:
            await self._catch_up(cursor, engine.seq)
        elif cursor > engine.seq:
            _log.error(
                "%s: the stored tape (seq %s) is ahead of match (%s)", symbol, cursor, engine.seq
            )
        book = L2Book.of(
            engine.seq,
            (self._level(lv) for lv in engine.bids),
            (self._level(lv) for lv in engine.asks),
            engine.status or types_pb2.MARKET_STATUS_TRADING,
        )
        self.status_reason = engine.status_reason
        now = self._clock()
        start = self.ticker.window_start(now)
        bars = await self._store.candles(
            symbol, BUCKET_S, start_s=start, end_s=now // 1_000_000_000 + BUCKET_S, limit=100_000
        )
        self.ticker = RollingTicker(bucket_s=BUCKET_S)
        self.ticker.load(bars, await self._store.last_trade(symbol), max(cursor, engine.seq))
        self._persisted_seq = self._unwritten_seq = max(cursor, engine.seq)
        self._unwritten = []
        self.book, self.time_ns = book, now
        self._delay = 0.5
        self.fanout.reset(book, now)
        self.ticker_dirty = True
        await self._publish_nats()
        _log.info("feed %s ready at seq %s (tape from %s)", symbol, engine.seq, cursor)

    def _level(self, level: types_pb2.PriceLevel) -> Level:
        return Level(self.market.ticks(level.price), level.price, level.quantity, level.order_count)

    async def _catch_up(self, cursor: int, to_seq: int) -> None:
        """Trades between the stored cursor and the bootstrap book into the store."""
        symbol = self.market.symbol
        async for events in self._source.replay(symbol, cursor + 1, to_seq):
            if events:
                trades = [trade_fact(e) for e in events if e.WhichOneof("kind") == "trade"]
                await self._store.persist(symbol, trades, events[-1].seq)

    async def _check_tail(self) -> None:
        """Quiet for a while: did match write events we never received?"""
        assert self.book is not None
        engine = await self._source.book(self.market.symbol, depth=1)
        if engine.seq > self.book.seq:
            _log.warning(
                "%s: match is at seq %s, the feed at %s; replaying",
                self.market.symbol, engine.seq, self.book.seq,
            )  # fmt: skip
            missing = [
                e
                async for batch in self._source.replay(
                    self.market.symbol, self.book.seq + 1, engine.seq
                )
                for e in batch
            ]
            await self.apply(missing)

    async def _fill(self, events: Sequence[match_pb2.MatchEvent]) -> list[match_pb2.MatchEvent]:
        """The new events in seq order without duplicates or gaps (gaps from match)."""
        assert self.book is not None
        expected = self.book.seq + 1
        fresh = {e.seq: e for e in events if e.seq >= expected}
        out: list[match_pb2.MatchEvent] = []
        for seq in sorted(fresh):
            if seq > expected:
                self.gaps += 1
                async for batch in self._source.replay(self.market.symbol, expected, seq - 1):
                    for event in batch:
                        if event.seq != expected:
                            raise RuntimeError(
                                f"ReplayEvents gave seq {event.seq}, expected {expected}"
                            )
                        out.append(event)
                        expected += 1
                if expected != seq:
                    raise RuntimeError(f"ReplayEvents stopped at {expected}, before {seq}")
            out.append(fresh[seq])
            expected = seq + 1
        return out

    async def apply(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        """Apply a batch (any order, duplicates allowed) and fan out what changed."""
        book = self.book
        assert book is not None
        todo = await self._fill(events)
        if not todo:
            return
        top = (book.top(BID, 1), book.top(ASK, 1))
        trades: list[TradeFact] = []
        ticks = self.market.ticks
        for event in todo:
            kind = event.WhichOneof("kind")
            if kind == "level_changed":
                lc = event.level_changed
                book.set(lc.side, Level(ticks(lc.price), lc.price, lc.quantity, lc.order_count))
            elif kind == "trade":
                trades.append(trade_fact(event))
            elif kind == "status_changed":
                book.status = event.status_changed.status
                self.status_reason = event.status_changed.reason
        book.seq = todo[-1].seq
        self.time_ns = todo[-1].event_time.ToNanoseconds()
        self.events += len(todo)
        self.fanout.update(self.time_ns)
        await self._publish_nats()
        for trade in trades:
            self.ticker.add(trade)
        if trades or top != (book.top(BID, 1), book.top(ASK, 1)):
            self.ticker_dirty = True
        self._unwritten.extend(trades)
        self._unwritten_seq = book.seq
        self._to_write.set()
        if len(self._unwritten) > _MAX_UNWRITTEN:
            raise RuntimeError(f"{len(self._unwritten)} trades wait for PostgreSQL")

    async def _write(self) -> None:
        """The tape writer: what the feed applied, into PostgreSQL in groups (one
        transaction for whatever accumulated meanwhile), then out to trade streams.
        Book deltas never wait for it."""
        symbol = self.market.symbol
        written_at = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_write.wait(), _PERSIST_IDLE_S)
            self._to_write.clear()
            trades, seq = self._unwritten, self._unwritten_seq
            if seq <= self._persisted_seq or (
                not trades and time.monotonic() - written_at < _PERSIST_IDLE_S
            ):
                continue
            self._unwritten = []
            await self._store.persist(symbol, trades, seq)
            self._persisted_seq, written_at = seq, time.monotonic()
            if trades:
                await self._on_trades(symbol, trades)

    async def _publish_nats(self) -> None:
        now = time.monotonic()
        if now - self._nats_snapshot_at >= self._settings.nats_snapshot_s:
            self._nats_snapshot_at = now
            self.fanout.nats_snapshot()
        subject = f"md.{self.market.symbol}.book"
        for data in self.fanout.take_nats():
            await self._nats.publish(subject, data)
