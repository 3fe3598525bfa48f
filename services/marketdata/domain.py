"""Market data's pure rules: L2 books and their depth views, candles, the rolling ticker.

No I/O, no clock: times come in as arguments (the feed, the fan-out, the store
and the servicer do the I/O around these values).

Books. Prices are kept as integer ticks (for ordering) next to the exact
decimal strings match sent (for the wire and the checksum); quantities stay the
strings match sent, since a level's quantity is only ever replaced, never
computed here. A `DepthView` is what a subscriber at one depth holds: the top
`depth` levels per side. `DepthView.advance` turns a batch of level changes
into the delta that brings such a holder from the previous view to the next
one, including levels that enter the top from below (with their full quantity)
and levels pushed out of it (quantity "0"), so a client applying deltas holds
exactly the top `depth` levels without knowing anything beyond them.

Candles are aligned on the Unix epoch in UTC (a day candle opens at 00:00
UTC), by the trade's match event time. A batch of trades becomes one `Bar` per
(interval, open time) it touches; the store merges each into the stored candle
(first open stays, last close wins, high/low/volumes/counts combine), which is
exact because trades reach it once each, in seq order.

The rolling 24-hour ticker keeps its window as one-minute buckets (1,440 of
them at most), so memory does not grow with the trade rate; the window
therefore moves a minute at a time: at time t it covers the buckets opening
from minute(t) - 23h59m on. The buckets are the same as the 1-minute candles,
so after a restart the ticker is rebuilt from the stored candles.
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2

__all__ = [
    "ASK",
    "BID",
    "BUCKET_S",
    "CHECKSUM_LEVELS",
    "INTERVALS",
    "WINDOW_S",
    "Bar",
    "BookDelta",
    "DepthView",
    "L2Book",
    "Level",
    "RollingTicker",
    "TickerStats",
    "TradeFact",
    "bars",
    "bucket",
    "checksum",
    "diff",
    "merge",
]


BID = 1  # cex.type.v1.SIDE_BUY
ASK = 2  # cex.type.v1.SIDE_SELL
CHECKSUM_LEVELS = 25
ZERO = "0"
TRADING = types_pb2.MARKET_STATUS_TRADING
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Level:
    """One aggregated price level: the price as ticks and as match wrote it."""

    ticks: int
    price: str
    quantity: str
    order_count: int


@dataclass(frozen=True, slots=True)
class BookDelta:
    """Changed levels (quantity "0" = removed) and the checksum of the view after them."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    checksum: int
    status_changed: bool = False  # the market's status moved (a delta even without levels)

    @property
    def empty(self) -> bool:
        return not self.bids and not self.asks and not self.status_changed


class _Side:
    """Levels of one side; `keys` sorted so that keys[0] is the best level."""

    def __init__(self, side: int) -> None:
        self.sign = -1 if side == BID else 1
        self.levels: dict[int, Level] = {}
        self.keys: list[int] = []

    def set(self, level: Level) -> None:
        key = self.sign * level.ticks
        if level.quantity == ZERO:
            if self.levels.pop(level.ticks, None) is not None:
                del self.keys[bisect.bisect_left(self.keys, key)]
            return
        if level.ticks not in self.levels:
            bisect.insort(self.keys, key)
        self.levels[level.ticks] = level

    def top(self, depth: int | None) -> list[Level]:
        keys = self.keys if depth is None else self.keys[:depth]
        return [self.levels[self.sign * k] for k in keys]


class L2Book:
    """A market's whole L2 book at `seq` (the last match event applied)."""

    def __init__(self, seq: int = 0, status: int = TRADING) -> None:
        self.seq = seq
        self.status = status  # the market's (cex.type.v1.MarketStatus) as of seq
        self._sides = {BID: _Side(BID), ASK: _Side(ASK)}

    @classmethod
    def of(
        cls, seq: int, bids: Iterable[Level], asks: Iterable[Level], status: int = TRADING
    ) -> L2Book:
        book = cls(seq, status)
        for level in bids:
            book.set(BID, level)
        for level in asks:
            book.set(ASK, level)
        return book

    def set(self, side: int, level: Level) -> None:
        """Replace a level's quantity ("0" removes it)."""
        self._sides[side].set(level)

    def top(self, side: int, depth: int | None = None) -> list[Level]:
        return self._sides[side].top(depth)

    def level(self, side: int, ticks: int) -> Level | None:
        return self._sides[side].levels.get(ticks)

    def size(self, side: int) -> int:
        return len(self._sides[side].keys)


def checksum(bids: Sequence[Level], asks: Sequence[Level], levels: int = CHECKSUM_LEVELS) -> int:
    """CRC-32 of the top `levels`: bid i then ask i as "price:quantity", joined by ":"."""
    parts: list[str] = []
    for i in range(levels):
        if i < len(bids):
            parts.append(f"{bids[i].price}:{bids[i].quantity}")
        if i < len(asks):
            parts.append(f"{asks[i].price}:{asks[i].quantity}")
        if i >= len(bids) and i >= len(asks):
            break
    return zlib.crc32(":".join(parts).encode())


@dataclass(slots=True)
class DepthView:
    """The top `depth` levels per side of a book, as last sent to its holders."""

    depth: int
    bids: list[Level] = field(default_factory=list)
    asks: list[Level] = field(default_factory=list)
    checksum: int = 0
    status: int = TRADING

    @classmethod
    def of(cls, book: L2Book, depth: int) -> DepthView:
        bids, asks = book.top(BID, depth), book.top(ASK, depth)
        return cls(depth, bids, asks, checksum(bids, asks), book.status)

    def advance(self, book: L2Book) -> BookDelta:
        """Move to the book's current top and return the delta that does the same."""
        new_bids, new_asks = book.top(BID, self.depth), book.top(ASK, self.depth)
        bids, asks = diff(self.bids, new_bids), diff(self.asks, new_asks)
        moved = book.status != self.status
        self.status = book.status
        if not bids and not asks:  # the batch changed nothing within this depth
            return BookDelta((), (), self.checksum, moved)
        delta = BookDelta(bids, asks, checksum(new_bids, new_asks), moved)
        self.bids, self.asks, self.checksum = new_bids, new_asks, delta.checksum
        return delta


def diff(old: list[Level], new: list[Level]) -> tuple[Level, ...]:
    """Levels of `new` that differ from `old`, then the levels that left (quantity "0")."""
    if old == new:
        return ()
    before = {level.ticks: level for level in old}
    after = {level.ticks for level in new}
    changed = [level for level in new if before.get(level.ticks) != level]
    removed = [Level(lv.ticks, lv.price, ZERO, 0) for lv in old if lv.ticks not in after]
    return (*changed, *removed)


# -- trades and candles ---------------------------------------------------------

# CandleInterval -> width in seconds.
INTERVALS: dict[int, int] = {
    md.CANDLE_INTERVAL_ONE_MINUTE: 60,
    md.CANDLE_INTERVAL_FIVE_MINUTES: 300,
    md.CANDLE_INTERVAL_FIFTEEN_MINUTES: 900,
    md.CANDLE_INTERVAL_THIRTY_MINUTES: 1800,
    md.CANDLE_INTERVAL_ONE_HOUR: 3600,
    md.CANDLE_INTERVAL_FOUR_HOURS: 14_400,
    md.CANDLE_INTERVAL_ONE_DAY: 86_400,
}


@dataclass(frozen=True, slots=True)
class TradeFact:
    """A public trade: exact decimals, the taker's side, the event time (ns)."""

    market: str
    seq: int
    trade_id: str
    price: Decimal
    quantity: Decimal
    quote_quantity: Decimal
    taker_side: int
    time_ns: int


@dataclass(frozen=True, slots=True)
class Bar:
    width_s: int
    open_time_s: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal
    trade_count: int

    @classmethod
    def of(cls, width_s: int, trade: TradeFact) -> Bar:
        p = trade.price
        return cls(
            width_s, bucket(trade.time_ns, width_s), p, p, p, p,
            trade.quantity, trade.quote_quantity, 1,
        )  # fmt: skip


def bucket(time_ns: int, width_s: int) -> int:
    """Open time (Unix seconds) of the candle of this width holding `time_ns`."""
    seconds = time_ns // _NS
    return seconds - seconds % width_s


def merge(earlier: Bar, later: Bar) -> Bar:
    """One bar from two consecutive runs of trades in the same candle."""
    assert (earlier.width_s, earlier.open_time_s) == (later.width_s, later.open_time_s)
    return Bar(
        earlier.width_s,
        earlier.open_time_s,
        earlier.open,
        max(earlier.high, later.high),
        min(earlier.low, later.low),
        later.close,
        earlier.volume + later.volume,
        earlier.quote_volume + later.quote_volume,
        earlier.trade_count + later.trade_count,
    )


def bars(trades: Iterable[TradeFact], widths: Iterable[int] = INTERVALS.values()) -> list[Bar]:
    """The bars a run of trades (in seq order) makes at every width."""
    out: dict[tuple[int, int], Bar] = {}
    widths = tuple(widths)
    for trade in trades:
        for width in widths:
            bar = Bar.of(width, trade)
            key = (width, bar.open_time_s)
            known = out.get(key)
            out[key] = bar if known is None else merge(known, bar)
    return list(out.values())


# -- the rolling ticker ---------------------------------------------------------

BUCKET_S = 60
WINDOW_S = 86_400
_HUNDRED = Decimal(100)
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class TickerStats:
    last_price: Decimal | None
    last_quantity: Decimal | None
    open: Decimal | None
    high: Decimal | None
    low: Decimal | None
    volume: Decimal
    quote_volume: Decimal
    trade_count: int
    window_start_s: int
    seq: int

    @property
    def price_change(self) -> Decimal | None:
        if self.open is None or self.last_price is None:
            return None
        return self.last_price - self.open

    @property
    def price_change_percent(self) -> Decimal | None:
        change = self.price_change
        if change is None or self.open is None or not self.open:
            return None
        return (change * _HUNDRED / self.open).quantize(_CENT)


class RollingTicker:
    def __init__(self, window_s: int = WINDOW_S, bucket_s: int = BUCKET_S) -> None:
        if window_s % bucket_s:
            raise ValueError("the window must be a whole number of buckets")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._bars: deque[Bar] = deque()
        self.last_price: Decimal | None = None
        self.last_quantity: Decimal | None = None
        self.seq = 0

    def load(self, bars: Iterable[Bar], last: TradeFact | None, seq: int) -> None:
        """Start from stored one-minute candles (oldest first) and the last trade."""
        self._bars = deque(b for b in bars if b.width_s == self.bucket_s)
        if last is not None:
            self.last_price, self.last_quantity = last.price, last.quantity
        self.seq = seq

    def add(self, trade: TradeFact) -> None:
        bar = Bar.of(self.bucket_s, trade)
        if self._bars and self._bars[-1].open_time_s == bar.open_time_s:
            self._bars[-1] = merge(self._bars[-1], bar)
        elif not self._bars or self._bars[-1].open_time_s < bar.open_time_s:
            self._bars.append(bar)
        else:  # an older minute than the newest (match's clock stepped back): count it there
            last = self._bars[-1]
            self._bars[-1] = merge(last, replace(bar, open_time_s=last.open_time_s))
        self.last_price, self.last_quantity = trade.price, trade.quantity
        self.seq = max(self.seq, trade.seq)

    def window_start(self, now_ns: int) -> int:
        return bucket(now_ns, self.bucket_s) + self.bucket_s - self.window_s

    def stats(self, now_ns: int) -> TickerStats:
        start = self.window_start(now_ns)
        while self._bars and self._bars[0].open_time_s < start:
            self._bars.popleft()
        bars = self._bars
        if not bars:
            return TickerStats(
                self.last_price, self.last_quantity, None, None, None,
                Decimal(0), Decimal(0), 0, start, self.seq,
            )  # fmt: skip
        return TickerStats(
            self.last_price,
            self.last_quantity,
            bars[0].open,
            max(b.high for b in bars),
            min(b.low for b in bars),
            sum((b.volume for b in bars), Decimal(0)),
            sum((b.quote_volume for b in bars), Decimal(0)),
            sum(b.trade_count for b in bars),
            start,
            self.seq,
        )
