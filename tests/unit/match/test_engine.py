"""The engine between the wire and the book: decoding, ids, fees, snapshots."""

from __future__ import annotations

import random

import pytest

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import InvalidArgument
from services.chassis.markets import DEFAULT_CATALOG
from services.match.engine import MarketEngine, decode

BTC = DEFAULT_CATALOG.markets["BTC-USDT"]


class Wire:
    """An engine fed wire commands, numbered and timed as the journal would."""

    def __init__(self, engine: MarketEngine | None = None) -> None:
        self.engine = engine or MarketEngine(BTC)
        self.n = 0

    def submit(self, **kind: object) -> list[match_pb2.MatchEvent]:
        self.n += 1
        command = match_pb2.Command(command_id=f"c{self.n}", market="BTC-USDT", **kind)  # type: ignore[arg-type]
        e = self.engine
        return e.apply(decode(BTC, command), e.command_seq + 1, 1_700_000_000_000_000_000 + self.n)

    def place(
        self, order_id: str, side: int, qty: str, price: str, account: str = "alice", **kw: object
    ) -> list[match_pb2.MatchEvent]:
        place = match_pb2.PlaceCommand(
            order_id=order_id,
            client_order_id=f"cl-{order_id}",
            account_id=account,
            side=side,  # type: ignore[arg-type]
            type=t.ORDER_TYPE_LIMIT,
            quantity=qty,
            price=price,
            **kw,  # type: ignore[arg-type]
        )
        return self.submit(place=place)

    def cancel(self, order_id: str, account: str = "alice") -> list[match_pb2.MatchEvent]:
        return self.submit(cancel=match_pb2.CancelCommand(order_id=order_id, account_id=account))


def kinds(events: list[match_pb2.MatchEvent]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


def _violations(command: match_pb2.Command) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as err:
        decode(BTC, command)
    return {v.field: v.reason for v in err.value.violations}


def test_malformed_commands_are_refused_with_every_violation() -> None:
    place = match_pb2.PlaceCommand(
        order_id="",
        account_id="a",
        side=t.SIDE_UNSPECIFIED,
        type=t.ORDER_TYPE_LIMIT,
        price="100.001",  # off the 0.01 tick
        quantity="1e-3",  # not a plain decimal
        taker_fee_rate="-0.001",  # takers get no rebate
    )
    found = _violations(match_pb2.Command(command_id="x", market="BTC-USDT", place=place))
    assert found == {
        "command.place.order_id": "MATCH_FIELD_REQUIRED",
        "command.place.side": "MATCH_INVALID_ENUM",
        "command.place.price": "MATCH_INVALID_TICK",
        "command.place.quantity": "MATCH_INVALID_DECIMAL",
        "command.place.taker_fee_rate": "MATCH_INVALID_FEE_RATE",
    }


def test_off_lot_quantity_and_empty_command_are_refused() -> None:
    place = match_pb2.PlaceCommand(
        order_id="o", account_id="a", side=t.SIDE_BUY, type=t.ORDER_TYPE_LIMIT,
        price="100", quantity="0.000001",
    )  # fmt: skip
    assert _violations(match_pb2.Command(command_id="x", place=place)) == {
        "command.place.quantity": "MATCH_INVALID_LOT"
    }
    assert _violations(match_pb2.Command(command_id="x")) == {
        "command.kind": "MATCH_FIELD_REQUIRED"
    }
    assert _violations(match_pb2.Command(cancel=match_pb2.CancelCommand(order_id="o"))) == {
        "command.command_id": "MATCH_FIELD_REQUIRED",
        "command.cancel.account_id": "MATCH_FIELD_REQUIRED",
    }


def test_a_trade_carries_wire_ids_decimals_and_fees() -> None:
    w = Wire()
    w.place("s1", t.SIDE_SELL, "0.5", "65000.01", account="maker", maker_fee_rate="0.001")
    events = w.place("b1", t.SIDE_BUY, "0.8", "65100", account="taker", taker_fee_rate="0.002")
    assert kinds(events) == ["accepted", "trade", "level_changed", "level_changed"]
    trade = events[1].trade
    assert (trade.price, trade.quantity, trade.quote_quantity) == ("65000.01", "0.5", "32500.005")
    assert (trade.maker_order_id, trade.maker_client_order_id, trade.maker_account_id) == (
        "s1",
        "cl-s1",
        "maker",
    )
    assert (trade.taker_order_id, trade.taker_account_id) == ("b1", "taker")
    assert trade.taker_side == t.SIDE_BUY
    # The seller (maker) receives quote and pays 0.1% of 32500.005 USDT, rounded up
    # to the 8th decimal; the buyer (taker) receives base and pays 0.2% of 0.5 BTC.
    assert (trade.maker_fee, trade.maker_fee_asset) == ("32.500005", "USDT")
    assert (trade.taker_fee, trade.taker_fee_asset) == ("0.001", "BTC")
    assert (trade.maker_remaining_quantity, trade.taker_remaining_quantity) == ("0", "0.3")
    bid, ask = events[2].level_changed, events[3].level_changed
    assert (bid.side, bid.price, bid.quantity, bid.order_count) == (t.SIDE_BUY, "65100", "0.3", 1)
    assert (ask.side, ask.price, ask.quantity, ask.order_count) == (t.SIDE_SELL, "65000.01", "0", 0)
    assert [e.seq for e in events] == [3, 4, 5, 6]
    assert {e.command_seq for e in events} == {2}
    assert {e.command_id for e in events} == {"c2"}


def test_a_rebate_rounds_towards_zero() -> None:
    w = Wire()
    w.place("s1", t.SIDE_SELL, "0.01", "1000.03", account="m", maker_fee_rate="-0.00013")
    trade = w.place("b1", t.SIDE_BUY, "0.01", "1000.03", account="x")[1].trade
    # 10.0003 USDT x -0.00013 = -0.001300039 -> -0.00130003 (not -0.00130004)
    assert trade.maker_fee == "-0.00130003"
    assert trade.taker_fee == "0"


def test_unknown_and_foreign_orders_are_rejected_with_the_wire_ids() -> None:
    w = Wire()
    w.place("o1", t.SIDE_BUY, "1", "100", account="alice")
    (rejected,) = w.cancel("nope")
    assert rejected.rejected.reason == "MATCH_UNKNOWN_ORDER"
    assert (rejected.rejected.order_id, rejected.rejected.account_id) == ("nope", "alice")
    (foreign,) = w.cancel("o1", account="mallory")
    assert foreign.rejected.reason == "MATCH_UNKNOWN_ORDER"
    assert foreign.rejected.client_order_id == "cl-o1"
    assert w.engine.book.l2() == ([(10_000, 100_000)], [])


def test_a_live_order_id_cannot_be_placed_twice_but_a_finished_one_can() -> None:
    w = Wire()
    w.place("o1", t.SIDE_BUY, "1", "100")
    (dup,) = w.place("o1", t.SIDE_BUY, "2", "101")
    assert dup.rejected.reason == "MATCH_DUPLICATE_ORDER_ID"
    assert dup.rejected.client_order_id == "cl-o1"
    assert w.engine.book.l2() == ([(10_000, 100_000)], [])
    cancelled = w.cancel("o1")[0].cancelled
    assert (cancelled.order_id, cancelled.reason) == ("o1", t.CANCEL_REASON_USER_REQUESTED)
    assert kinds(w.place("o1", t.SIDE_BUY, "2", "101"))[0] == "accepted"


def test_mass_cancel_carries_the_reason_it_was_given() -> None:
    w = Wire()
    w.place("o1", t.SIDE_BUY, "1", "100")
    w.place("o2", t.SIDE_SELL, "1", "200")
    events = w.submit(
        mass_cancel=match_pb2.MassCancelCommand(
            account_id="alice", reason=t.CANCEL_REASON_CANCEL_ON_DISCONNECT
        )
    )
    reasons = [
        (e.cancelled.order_id, e.cancelled.reason) for e in events if e.HasField("cancelled")
    ]
    assert reasons == [
        ("o1", t.CANCEL_REASON_CANCEL_ON_DISCONNECT),
        ("o2", t.CANCEL_REASON_CANCEL_ON_DISCONNECT),
    ]


def test_amend_reports_old_and_new_price() -> None:
    w = Wire()
    w.place("o1", t.SIDE_BUY, "1", "100")
    (amended, *_) = w.submit(
        amend=match_pb2.AmendCommand(order_id="o1", account_id="alice", price="99.5")
    )
    a = amended.amended
    assert (a.old_price, a.price, a.quantity, a.priority_kept) == ("100", "99.5", "1", False)


def _random_commands(w: Wire, rng: random.Random, n: int) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(n):
        roll = rng.random()
        oid = f"o{rng.randrange(60)}"
        account = rng.choice(["a", "b", "c"])
        if roll < 0.6:
            side = rng.choice([t.SIDE_BUY, t.SIDE_SELL])
            price = str(100 + rng.randrange(-5, 6))
            events = w.place(oid, side, str(rng.randrange(1, 5)), price, account=account,
                             maker_fee_rate="0.0005", taker_fee_rate="0.001")  # fmt: skip
        elif roll < 0.8:
            events = w.cancel(oid, account=account)
        else:
            events = w.submit(
                amend=match_pb2.AmendCommand(order_id=oid, account_id=account, quantity="1")
            )
        out += [e.SerializeToString() for e in events]
    return out


def test_snapshot_restore_continues_byte_for_byte() -> None:
    rng = random.Random(7)
    straight = Wire()
    _random_commands(straight, rng, 400)
    restored = Wire(MarketEngine.restore(BTC, straight.engine.snapshot()))
    restored.n = straight.n
    assert restored.engine.state_hash() == straight.engine.state_hash()
    state = rng.getstate()
    a = _random_commands(straight, rng, 400)
    rng.setstate(state)
    b = _random_commands(restored, rng, 400)
    assert a == b
    assert restored.engine.state_hash() == straight.engine.state_hash()
    assert restored.engine.command_seq == straight.engine.command_seq == 800


def test_restore_refuses_another_market() -> None:
    snapshot = MarketEngine(BTC).snapshot()
    with pytest.raises(ValueError):
        MarketEngine.restore(DEFAULT_CATALOG.markets["ETH-USDT"], snapshot)
