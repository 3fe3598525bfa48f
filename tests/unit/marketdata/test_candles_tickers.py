"""Candle bucketing and merging; the rolling 24-hour ticker."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata.domain import INTERVALS, Bar, RollingTicker, TradeFact, bars, bucket, merge

S = 1_000_000_000
DAY = 86_400


def trade(seq: int, t_s: float, price: str, qty: str = "1") -> TradeFact:
    p, q = Decimal(price), Decimal(qty)
    return TradeFact("BTC-USDT", seq, str(seq), p, q, p * q, 1, int(t_s * S))


def test_buckets_are_utc_aligned() -> None:
    t = 1_700_000_123 * S + 999  # 2023-11-14T22:15:23Z
    assert bucket(t, 60) == 1_700_000_100
    assert bucket(t, 300) % 300 == 0 and 0 <= 1_700_000_123 - bucket(t, 300) < 300
    assert bucket(t, DAY) == 1_699_920_000  # 2023-11-14T00:00:00Z
    assert bucket(t, 14_400) == 1_699_992_000  # 20:00Z
    assert set(INTERVALS.values()) == {60, 300, 900, 1800, 3600, 14_400, DAY}


def test_bars_of_a_run_of_trades() -> None:
    run = [trade(1, 60.5, "10"), trade(2, 61, "12", "2"), trade(3, 119, "9"), trade(4, 120, "11")]
    minute = {b.open_time_s: b for b in bars(run, [60])}
    assert minute[60] == Bar(60, 60, Decimal(10), Decimal(12), Decimal(9), Decimal(9),
                             Decimal(4), Decimal(43), 3)  # fmt: skip
    assert minute[120].open == minute[120].close == Decimal(11)
    (hour,) = bars(run, [3600])
    assert (hour.open, hour.close, hour.high, hour.low, hour.trade_count) == (
        Decimal(10), Decimal(11), Decimal(12), Decimal(9), 4,
    )  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    prices=st.lists(st.integers(1, 1000), min_size=1, max_size=40),
    cut=st.integers(0, 40),
)
def test_merging_two_runs_equals_one_run(prices: list[int], cut: int) -> None:
    """What the store does with consecutive batches: merge == one batch of all."""
    run = [trade(i + 1, 1000 + i * 7, str(p)) for i, p in enumerate(prices)]
    first, second = run[:cut], run[cut:]
    whole = {(b.width_s, b.open_time_s): b for b in bars(run)}
    merged = {(b.width_s, b.open_time_s): b for b in bars(first)}
    for b in bars(second):
        key = (b.width_s, b.open_time_s)
        merged[key] = merge(merged[key], b) if key in merged else b
    assert merged == whole


def test_the_ticker_rolls_by_the_minute() -> None:
    ticker = RollingTicker()
    t0 = 1_700_000_000
    ticker.add(trade(1, t0, "100", "2"))
    ticker.add(trade(2, t0 + 3600, "120"))
    ticker.add(trade(3, t0 + 7200, "90", "0.5"))
    now = (t0 + 7300) * S
    s = ticker.stats(now)
    assert (s.open, s.high, s.low, s.last_price, s.last_quantity) == (
        Decimal(100), Decimal(120), Decimal(90), Decimal(90), Decimal("0.5"),
    )  # fmt: skip
    assert (s.volume, s.trade_count, s.seq) == (Decimal("3.5"), 3, 3)
    assert s.price_change == Decimal(-10) and s.price_change_percent == Decimal("-10.00")
    # 24 hours after the first trade's minute, it leaves the window; the last price stays.
    s = ticker.stats((t0 + DAY + 60) * S)
    assert (s.open, s.trade_count, s.volume) == (Decimal(120), 2, Decimal("1.5"))
    s = ticker.stats((t0 + 2 * DAY) * S)
    assert (s.open, s.high, s.trade_count, s.last_price) == (None, None, 0, Decimal(90))
    assert s.price_change is None


def test_the_ticker_loads_from_minute_candles() -> None:
    t0 = 1_700_000_000
    run = [trade(1, t0, "5"), trade(2, t0 + 30, "7"), trade(3, t0 + 600, "6")]
    loaded = RollingTicker()
    loaded.load(bars(run, [60]), run[-1], 3)
    fed = RollingTicker()
    for t in run:
        fed.add(t)
    now = (t0 + 900) * S
    assert loaded.stats(now) == fed.stats(now)
