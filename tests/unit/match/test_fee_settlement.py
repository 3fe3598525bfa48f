"""Tier rates through the engine and the writer's settlement (ADR 0016): whatever
the two sides' rates, a maker rebate included, the trade settles with its fees,
the rebate comes from the fee account (even one holding nothing yet), the fees
round never in the trader's favour, and every asset sums to zero."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from cex.type.v1 import types_pb2 as t
from services.chassis.fee_tiers import bps_rate
from services.chassis.markets import DEFAULT_CATALOG
from services.ledger.domain import Book, Kind, Op, TransferInput
from services.ledger.settlement import FEE_ACCOUNT, apply_events, hold_id, to_market_event
from tests.unit.match.test_engine import BTC, Wire

UNIT = Decimal("0.00000001")  # both assets' minor unit


def _minor(text: str) -> int:
    return int(Decimal(text) / UNIT)


@settings(max_examples=150, deadline=None)
@given(
    maker_bps=st.integers(min_value=-10_000, max_value=100_000).map(lambda n: Decimal(n) / 100),
    taker_extra=st.integers(min_value=0, max_value=100_000).map(lambda n: Decimal(n) / 100),
    lots=st.integers(min_value=5_000, max_value=10**6),  # 0.05 to 10 BTC
    ticks=st.integers(
        min_value=10_000, max_value=10**7
    ),  # 100 to 100,000 USDT: above the minimum notional
    taker_buys=st.booleans(),
)
def test_any_tier_rates_settle_to_zero_per_asset(
    maker_bps: Decimal, taker_extra: Decimal, lots: int, ticks: int, taker_buys: bool
) -> None:
    taker_bps = min(max(Decimal(0), -maker_bps) + taker_extra, Decimal(1000))
    quantity = str(lots * BTC.lot_size)
    price = str(ticks * BTC.tick_size)
    notional = Decimal(quantity) * Decimal(price)
    book = Book(now_ns=1, last_sequence=0, halted=False, assets=frozenset({"BTC", "USDT"}))
    maker_side, taker_side = (t.SIDE_SELL, t.SIDE_BUY) if taker_buys else (t.SIDE_BUY, t.SIDE_SELL)
    for account, order, side in (("m", "om", maker_side), ("k", "ok", taker_side)):
        asset, amount = ("USDT", notional) if side == t.SIDE_BUY else ("BTC", Decimal(quantity))
        minor = int((amount / UNIT).to_integral_value(rounding=ROUND_CEILING))
        book.apply_chain(
            [
                TransferInput(
                    f"d{account}", Op.SINGLE, "sys:custody", account, asset, minor,
                    kind=Kind.DEPOSIT,
                ),
                TransferInput(
                    hold_id(order), Op.PENDING, account, "sys:orders", asset, minor,
                    kind=Kind.ORDER_HOLD,
                ),
            ]
        )  # fmt: skip
    wire = Wire()
    wire.place(
        "om", maker_side, quantity, price, account="m", maker_fee_rate=bps_rate(str(maker_bps))
    )
    events = wire.place(
        "ok", taker_side, quantity, price, account="k", taker_fee_rate=bps_rate(str(taker_bps))
    )
    trade = next(e for e in events if e.WhichOneof("kind") == "trade").trade
    settled = apply_events(book, [to_market_event(DEFAULT_CATALOG, e) for e in events])
    assert settled == 1 and not book.anomalies
    for asset in ("BTC", "USDT"):
        net = [
            a.credits_posted - a.debits_posted for a in book.accounts.values() if a.asset == asset
        ]
        assert sum(net) == 0, asset
    # Each side's fee, in what it receives; a fee rounds up, a rebate towards zero.
    maker_gets = Decimal(trade.quote_quantity if taker_buys else trade.quantity)
    exact = maker_gets * Decimal(bps_rate(str(maker_bps)))
    charged = Decimal(trade.maker_fee)
    assert charged >= exact and charged - exact < UNIT
    received = book.accounts[("m", trade.maker_fee_asset)]
    assert received.credits_posted - received.debits_posted >= 0
    if charged < 0:  # the rebate: paid by the fee account, to the maker
        fees = book.accounts[(FEE_ACCOUNT, trade.maker_fee_asset)]
        fee_net = fees.credits_posted - fees.debits_posted
        taker_paid = (
            _minor(trade.taker_fee) if trade.taker_fee_asset == trade.maker_fee_asset else 0
        )
        assert fee_net == _minor(trade.maker_fee) + taker_paid
