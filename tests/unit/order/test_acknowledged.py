"""What order answered and its read model has not stored yet, per account."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from cex.type.v1 import types_pb2 as t
from services.chassis.markets import DEFAULT_CATALOG
from services.order.acknowledged import Acknowledged
from services.order.domain import OrderRecord, place_command, placed_record, validate_place
from tests.unit.order.test_domain import req

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def answered(order_id: str, account: str, market: str = "BTC-USDT") -> OrderRecord:
    price = "2000" if market == "ETH-USDT" else "100"
    new = validate_place(
        req(client_order_id=f"c-{order_id}", market=market, price=price), DEFAULT_CATALOG, NOW
    )
    command = place_command(
        new, order_id=order_id, account_id=account, protection=None, session_id="", fees=("0", "0")
    )
    return placed_record(DEFAULT_CATALOG.markets[market], command.place, NOW)


def test_an_answer_is_read_as_answered_until_the_consumer_stores_it() -> None:
    cursors = {"BTC-USDT": 0, "ETH-USDT": 0}
    acked = Acknowledged(cursors.__getitem__)
    o1, o2 = answered("o1", "a"), answered("o2", "a", "ETH-USDT")
    acked.add(o1, 5)
    acked.add(o2, 3)
    acked.add(answered("o3", "a"), 6)
    acked.add(answered("o4", "b"), 7)
    assert acked.order("a", "o1", "") == o1
    assert acked.order("a", "", "c-o2") == o2  # by client_order_id
    assert acked.order("b", "o1", "") is None  # another account's answer is not read
    assert acked.awaited("a") == {"BTC-USDT": 6, "ETH-USDT": 3}
    assert acked.awaited() == {"BTC-USDT": 7, "ETH-USDT": 3}

    cancelled = dataclasses.replace(o2, state=t.ORDER_STATE_CANCELLED)
    acked.add(cancelled, 4)  # a later answer about the same order
    acked.add(o2, 2)  # an older one changes nothing
    assert acked.order("a", "o2", "") == cancelled

    cursors["BTC-USDT"] = 6  # the consumer stored BTC-USDT up to 6: the store shows those
    assert acked.order("a", "o1", "") is None
    assert acked.awaited("a") == {"ETH-USDT": 4}
    assert acked.awaited("b") == {"BTC-USDT": 7}
    cursors["ETH-USDT"] = cursors["BTC-USDT"] = 9
    assert acked.awaited() == {} and acked.order("a", "o2", "") is None
