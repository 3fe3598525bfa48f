"""Trades and OHLCV candles: pure values and the bucketing rule.

Candles are aligned on the Unix epoch in UTC (a day candle opens at 00:00
UTC), by the trade's match event time. A batch of trades becomes one `Bar` per
(interval, open time) it touches; the store merges each into the stored candle
(first open stays, last close wins, high/low/volumes/counts combine), which is
exact because trades reach it once each, in seq order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from cex.marketdata.v1 import marketdata_pb2 as md

__all__ = ["INTERVALS", "Bar", "TradeFact", "bars", "bucket", "merge"]

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
_NS = 1_000_000_000


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
