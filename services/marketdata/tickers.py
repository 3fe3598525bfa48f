"""The rolling 24-hour ticker: pure, fed with trades and the time.

The window is kept as one-minute buckets (1,440 of them at most), so memory
does not grow with the trade rate; the window therefore moves a minute at a
time: at time t it covers the buckets opening from minute(t) - 23h59m on.
The buckets are the same as the 1-minute candles, so after a restart the
ticker is rebuilt from the stored candles.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal

from .candles import Bar, TradeFact, bucket, merge

__all__ = ["BUCKET_S", "WINDOW_S", "RollingTicker", "TickerStats"]

BUCKET_S = 60
WINDOW_S = 86_400
_NS = 1_000_000_000
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
