"""The order domain without I/O: validation, holds, amends, match events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import FailedPrecondition, InvalidArgument
from services.chassis.markets import DEFAULT_CATALOG
from services.order.domain import (
    apply_event,
    check_amend,
    fingerprint,
    hold_for,
    place_command,
    placed_record,
    protection_price,
    validate_place,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BTC = DEFAULT_CATALOG.markets["BTC-USDT"]
D = Decimal


def req(**fields: object) -> order_pb2.PlaceOrderRequest:
    base: dict[str, object] = {
        "client_order_id": "c-1",
        "market": "BTC-USDT",
        "side": t.SIDE_BUY,
        "type": t.ORDER_TYPE_LIMIT,
        "price": "100",
        "quantity": "0.5",
    }
    return order_pb2.PlaceOrderRequest(**{**base, **fields})  # type: ignore[arg-type]


def violations(**fields: object) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as failure:
        validate_place(req(**fields), DEFAULT_CATALOG, NOW)
    return [(v.field, v.reason) for v in failure.value.violations]


def test_a_valid_limit_order_defaults_to_gtc_and_cancel_newest() -> None:
    order = validate_place(req(), DEFAULT_CATALOG, NOW)
    assert (order.time_in_force, order.self_trade_prevention) == (
        t.TIME_IN_FORCE_GTC,
        t.SELF_TRADE_PREVENTION_CANCEL_NEWEST,
    )
    assert (order.price, order.quantity) == (D(100), D("0.5"))


def test_every_bad_field_is_reported_at_once() -> None:
    found = violations(client_order_id="", market="BTC-USDT", price="1.001", quantity="abc")
    assert found == [
        ("client_order_id", "ORDER_INVALID_CLIENT_ORDER_ID"),
        ("price", "ORDER_PRICE_OFF_TICK"),
        ("quantity", "ORDER_INVALID_QUANTITY"),
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"price": "1", "quantity": "1"}, ("quantity", "ORDER_NOTIONAL_TOO_SMALL")),
        ({"quantity": "0.000001"}, ("quantity", "ORDER_QUANTITY_OFF_LOT")),
        ({"quantity": "9001"}, ("quantity", "ORDER_QUANTITY_TOO_LARGE")),
        ({"quantity": "1" + "0" * 20}, ("quantity", "ORDER_QUANTITY_TOO_LARGE")),
        ({"price": "-1"}, ("price", "ORDER_INVALID_PRICE")),
        ({"price": "1e2"}, ("price", "ORDER_INVALID_PRICE")),
        ({"market": "NOPE"}, ("market", "ORDER_UNKNOWN_MARKET")),
        ({"type": t.ORDER_TYPE_MARKET}, ("price", "ORDER_INVALID_PRICE")),
        ({"type": t.ORDER_TYPE_STOP_LIMIT}, ("stop_price", "ORDER_INVALID_STOP_PRICE")),
        ({"post_only": True, "time_in_force": t.TIME_IN_FORCE_IOC},
         ("post_only", "ORDER_INVALID_POST_ONLY")),
        ({"time_in_force": t.TIME_IN_FORCE_GTD}, ("expire_time", "ORDER_INVALID_EXPIRE_TIME")),
        ({"side": t.SIDE_SELL, "quote_quantity": "10", "quantity": ""},
         ("quote_quantity", "ORDER_INVALID_QUOTE_QUANTITY")),
    ],
)  # fmt: skip
def test_bad_input(fields: dict[str, object], expected: tuple[str, str]) -> None:
    assert expected in violations(**fields)


def test_the_fingerprint_ignores_the_account_but_not_the_body() -> None:
    assert fingerprint(req(account_id="a")) == fingerprint(req(account_id="b"))
    assert fingerprint(req(price="101")) != fingerprint(req())


def test_holds_are_what_the_order_can_spend() -> None:
    buy = validate_place(req(price="100.01", quantity="0.33333"), DEFAULT_CATALOG, NOW)
    assert hold_for(buy, None) == ("USDT", 3_333_633_330)  # 33.3363333 USDT, exact
    sell = validate_place(req(side=t.SIDE_SELL), DEFAULT_CATALOG, NOW)
    assert hold_for(sell, None) == ("BTC", 50_000_000)
    budget = validate_place(
        req(type=t.ORDER_TYPE_MARKET, price="", quantity="", quote_quantity="25"),
        DEFAULT_CATALOG,
        NOW,
    )
    assert budget.time_in_force == t.TIME_IN_FORCE_IOC
    assert hold_for(budget, None) == ("USDT", 2_500_000_000)
    market = validate_place(req(type=t.ORDER_TYPE_MARKET, price=""), DEFAULT_CATALOG, NOW)
    bound = protection_price(BTC, t.SIDE_BUY, D("100.005"), D("0.05"))
    assert bound == D("105.00")  # 105.00525 rounded down to the tick
    assert hold_for(market, bound) == ("USDT", 5_250_000_000)
    assert protection_price(BTC, t.SIDE_SELL, D("100"), D("0.05")) == D("95.00")


def _record(side: int = t.SIDE_BUY, price: str = "100", qty: str = "1") -> object:
    order = validate_place(req(side=side, price=price, quantity=qty), DEFAULT_CATALOG, NOW)
    command = place_command(
        order, order_id="o1", account_id="acc", protection=None, session_id="", fees=("0", "0")
    )
    return placed_record(BTC, command.place, NOW)


def test_an_amend_may_use_only_what_the_hold_still_covers() -> None:
    buy = _record()
    check_amend(buy, BTC, D("99"), None)  # cheaper: fine
    check_amend(buy, BTC, None, D("0.5"))  # smaller: fine
    with pytest.raises(FailedPrecondition) as dearer:
        check_amend(buy, BTC, D("101"), None)
    assert dearer.value.reason == "ORDER_AMEND_EXCEEDS_HOLD"
    check_amend(buy, BTC, D("200"), D("0.5"))  # twice the price for half: the same money
    sell = _record(side=t.SIDE_SELL)
    check_amend(sell, BTC, D("150"), None)  # a sell holds base: any price
    with pytest.raises(FailedPrecondition):
        check_amend(sell, BTC, None, D("1.1"))
    sell.filled_quantity = D("0.4")
    with pytest.raises(FailedPrecondition) as low:
        check_amend(sell, BTC, None, D("0.4"))
    assert low.value.reason == "ORDER_AMEND_QUANTITY_TOO_LOW"


def _event(seq: int, command_id: str = "place:o1", **kind: object) -> match_pb2.MatchEvent:
    event = match_pb2.MatchEvent(market="BTC-USDT", seq=seq, command_id=command_id, **kind)  # type: ignore[arg-type]
    event.event_time.FromDatetime(NOW + timedelta(seconds=seq))
    return event


def test_match_events_drive_the_order_once_each() -> None:
    order = _record()
    accepted = _event(5, accepted=match_pb2.OrderAccepted(order_id="o1", quantity="1"))
    new = apply_event(order, accepted)
    assert new is not None and new.execution_type == 1 and order.state == t.ORDER_STATE_OPEN
    trade = match_pb2.Trade(
        trade_id="7",
        price="99",
        quantity="0.25",
        quote_quantity="24.75",
        taker_side=t.SIDE_SELL,
        maker_order_id="o1",
        maker_remaining_quantity="0.75",
        maker_fee="0.00025",
        maker_fee_asset="BTC",
        taker_order_id="o2",
        taker_remaining_quantity="0",
    )
    fill = apply_event(order, _event(6, "place:o2", trade=trade))
    assert fill is not None and fill.liquidity == t.LIQUIDITY_MAKER
    assert (order.state, order.filled_quantity, order.remaining_quantity) == (
        t.ORDER_STATE_PARTIALLY_FILLED,
        D("0.25"),
        D("0.75"),
    )
    assert apply_event(order, _event(6, "place:o2", trade=trade)) is None  # a redelivery
    assert order.filled_quantity == D("0.25")
    # A refused cancel of this order does not reject the order.
    refused = match_pb2.OrderRejected(order_id="o1", reason="MATCH_UNKNOWN_ORDER")
    assert apply_event(order, _event(7, "cancel:o1", rejected=refused)) is None
    cancelled = match_pb2.OrderCancelled(
        order_id="o1", remaining_quantity="0", reason=t.CANCEL_REASON_USER_REQUESTED
    )
    done = apply_event(order, _event(8, "cancel:o1", cancelled=cancelled))
    assert done is not None and order.state == t.ORDER_STATE_CANCELLED
    assert order.version == 4 and order.last_seq == 8


def test_the_record_built_from_a_place_command_is_the_order_that_was_sent() -> None:
    request = req(type=t.ORDER_TYPE_MARKET, price="", time_in_force=t.TIME_IN_FORCE_IOC)
    order = validate_place(request, DEFAULT_CATALOG, NOW)
    bound = protection_price(BTC, t.SIDE_BUY, D("100"), D("0.05"))
    command = place_command(
        order, order_id="o9", account_id="acc", protection=bound, session_id="s", fees=("0", "0")
    )
    assert command.command_id == "place:o9" and command.place.price == "105"
    record = placed_record(BTC, command.place, NOW)
    assert (record.price, record.protection_price, record.quantity) == (None, bound, order.quantity)
    assert (record.hold_asset, record.hold_amount) == hold_for(order, bound)
    assert (record.session_id, record.fingerprint) == ("s", order.fingerprint)
    assert (record.type, record.time_in_force, record.state) == (
        t.ORDER_TYPE_MARKET,
        t.TIME_IN_FORCE_IOC,
        t.ORDER_STATE_PENDING_NEW,
    )
    request = req(time_in_force=t.TIME_IN_FORCE_GTD)
    request.expire_time.FromDatetime(NOW + timedelta(hours=1))
    gtd = validate_place(request, DEFAULT_CATALOG, NOW)
    place = place_command(
        gtd, order_id="o8", account_id="acc", protection=None, session_id="", fees=("0", "0")
    ).place
    assert placed_record(BTC, place, NOW).expire_time == NOW + timedelta(hours=1)
