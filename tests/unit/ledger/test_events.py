"""Match events as the ledger reads them."""

from __future__ import annotations

import pytest

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis import MoneyError, load_catalog
from services.ledger.settlement import Release, TradeSettlement, to_market_event

CATALOG = load_catalog({})


def _trade(taker_side: int, quantity: str = "0.5") -> match_pb2.MatchEvent:
    return match_pb2.MatchEvent(
        market="ETH-BTC",
        seq=7,
        trade=match_pb2.Trade(
            trade_id="42",
            price="0.05",
            quantity=quantity,
            quote_quantity="0.025",
            taker_side=taker_side,  # type: ignore[arg-type]
            maker_order_id="m",
            maker_account_id="maker",
            maker_remaining_quantity="1.5",
            maker_fee="-0.0001",
            maker_fee_asset="ETH",
            taker_order_id="t",
            taker_account_id="taker",
            taker_remaining_quantity="0",
            taker_fee="0.00001",
            taker_fee_asset="BTC",
        ),
    )


def test_a_taker_sell_makes_the_maker_the_buyer() -> None:
    event = to_market_event(CATALOG, _trade(types_pb2.SIDE_SELL))
    body = event.body
    assert isinstance(body, TradeSettlement)
    assert (body.base, body.quote, body.quantity, body.quote_quantity) == (
        "ETH",
        "BTC",
        50_000_000,
        2_500_000,
    )
    assert (body.buyer.account_id, body.buyer.fee, body.buyer.fee_asset) == (
        "maker",
        -10_000,
        "ETH",
    )
    assert (body.seller.account_id, body.seller.fee, body.seller.done) == ("taker", 1000, True)
    assert not body.buyer.done


def test_a_taker_buy_makes_the_taker_the_buyer() -> None:
    body = to_market_event(CATALOG, _trade(types_pb2.SIDE_BUY)).body
    assert isinstance(body, TradeSettlement) and body.buyer.order_id == "t"


def test_releases_and_other_events() -> None:
    done = match_pb2.MatchEvent(
        market="ETH-BTC",
        seq=1,
        cancelled=match_pb2.OrderCancelled(order_id="o", remaining_quantity="0.000"),
    )
    partial = match_pb2.MatchEvent(
        market="ETH-BTC",
        seq=2,
        cancelled=match_pb2.OrderCancelled(order_id="o", remaining_quantity="1"),
    )
    rejected = match_pb2.MatchEvent(
        market="ETH-BTC",
        seq=3,
        command_id="place:r",
        rejected=match_pb2.OrderRejected(order_id="r", reason="MATCH_POST_ONLY_WOULD_TAKE"),
    )
    accepted = match_pb2.MatchEvent(market="ETH-BTC", seq=4, accepted=match_pb2.OrderAccepted())
    assert to_market_event(CATALOG, done).body == Release("o")
    assert to_market_event(CATALOG, partial).body is None
    assert to_market_event(CATALOG, rejected).body == Release("r")
    assert to_market_event(CATALOG, accepted).body is None


def test_an_over_precise_amount_is_refused() -> None:
    with pytest.raises(MoneyError):
        to_market_event(CATALOG, _trade(types_pb2.SIDE_BUY, quantity="0.000000001"))


@pytest.mark.parametrize(
    ("command_id", "reason"),
    [
        ("amend:w:1", "MATCH_INVALID_AMEND"),
        ("amend:w:2", "MATCH_AMEND_QTY_TOO_LOW"),
        ("cancel:w", "MATCH_UNKNOWN_ORDER"),
        ("place:w", "MATCH_DUPLICATE_ORDER_ID"),
    ],
)
def test_a_refused_command_on_a_working_order_keeps_its_hold(command_id: str, reason: str) -> None:
    event = match_pb2.MatchEvent(
        market="ETH-BTC",
        seq=5,
        command_id=command_id,
        rejected=match_pb2.OrderRejected(order_id="w", reason=reason),
    )
    assert to_market_event(CATALOG, event).body is None
