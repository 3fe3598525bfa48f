"""A market's status in the engine (ADR 0015): what each status lets through, the
status change as an event in the market's sequence, a delisting's cancels, and
the status in the snapshot."""

from __future__ import annotations

import pytest

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import InvalidArgument
from services.match.engine import MarketEngine, decode
from tests.unit.match.test_engine import BTC, Wire, kinds


def command(**kind: object) -> match_pb2.Command:
    return match_pb2.Command(command_id="x", market="BTC-USDT", **kind)  # type: ignore[arg-type]


def set_status(w: Wire, status: int, reason: str = "ops") -> list[match_pb2.MatchEvent]:
    st = match_pb2.SetMarketStatusCommand(
        status=status,  # type: ignore[arg-type]
        reason=reason,
        request_id=f"r{w.n}",
        updated_by="admin",
    )
    return w.submit(set_status=st)


def place(order_id: str = "n", *, post_only: bool = False, kind: int = t.ORDER_TYPE_LIMIT,
          price: str = "100", side: int = t.SIDE_BUY) -> match_pb2.Command:  # fmt: skip
    return command(
        place=match_pb2.PlaceCommand(
            order_id=order_id,
            account_id="alice",
            side=side,  # type: ignore[arg-type]
            type=kind,  # type: ignore[arg-type]
            time_in_force=t.TIME_IN_FORCE_IOC if kind == t.ORDER_TYPE_MARKET else 0,  # type: ignore[arg-type]
            quantity="1",
            price=price,
            post_only=post_only,
        )
    )


CANCEL = command(cancel=match_pb2.CancelCommand(order_id="b1", account_id="alice"))
MASS = command(mass_cancel=match_pb2.MassCancelCommand(account_id="alice"))
AMEND_QTY = command(amend=match_pb2.AmendCommand(order_id="b1", account_id="alice", quantity="1"))
AMEND_CROSS = command(amend=match_pb2.AmendCommand(order_id="b1", account_id="alice", price="110"))
EXPIRE = command(expire=match_pb2.ExpireCommand())


def refusal(engine: MarketEngine, cmd: match_pb2.Command) -> str | None:
    refused = engine.refusal(decode(BTC, cmd))
    return None if refused is None else refused.reason


@pytest.fixture
def w() -> Wire:
    w = Wire()
    w.place("b1", t.SIDE_BUY, "2", "100")
    w.place("s1", t.SIDE_SELL, "1", "110", account="bob")
    return w


def test_trading_refuses_nothing(w: Wire) -> None:
    for cmd in (place(), place(kind=t.ORDER_TYPE_MARKET), CANCEL, MASS, AMEND_CROSS, EXPIRE):
        assert refusal(w.engine, cmd) is None


def test_the_change_is_an_event_in_the_markets_sequence(w: Wire) -> None:
    seq = w.engine.seq
    events = set_status(w, t.MARKET_STATUS_HALTED, "incident 42")
    assert kinds(events) == ["status_changed"]
    assert events[0].seq == seq + 1
    changed = events[0].status_changed
    assert (changed.status, changed.previous_status) == (
        t.MARKET_STATUS_HALTED,
        t.MARKET_STATUS_TRADING,
    )
    assert (changed.reason, changed.updated_by) == ("incident 42", "admin")
    assert (w.engine.status, w.engine.status_reason) == (t.MARKET_STATUS_HALTED, "incident 42")
    assert [o.order_id for o in w.engine.book.l3()] != []  # resting orders stay


def test_halted_refuses_places_and_amends_and_lets_cancels_through(w: Wire) -> None:
    set_status(w, t.MARKET_STATUS_HALTED)
    assert refusal(w.engine, place()) == "MATCH_MARKET_HALTED"
    assert refusal(w.engine, place(post_only=True)) == "MATCH_MARKET_HALTED"
    assert refusal(w.engine, AMEND_QTY) == "MATCH_MARKET_HALTED"
    for cmd in (CANCEL, MASS, EXPIRE):
        assert refusal(w.engine, cmd) is None
    refused = w.engine.refusal(decode(BTC, place()))
    assert refused is not None and refused.metadata == {"market": "BTC-USDT", "status": "HALTED"}
    assert "BTC-USDT is halted" in refused.message
    assert kinds(w.cancel("b1"))[0] == "cancelled"


def test_cancel_only_refuses_places_and_amends(w: Wire) -> None:
    set_status(w, t.MARKET_STATUS_CANCEL_ONLY)
    assert refusal(w.engine, place(post_only=True)) == "MATCH_MARKET_CANCEL_ONLY"
    assert refusal(w.engine, AMEND_QTY) == "MATCH_MARKET_CANCEL_ONLY"
    assert refusal(w.engine, CANCEL) is None and refusal(w.engine, MASS) is None


def test_post_only_accepts_post_only_limits_and_amends_that_do_not_cross(w: Wire) -> None:
    set_status(w, t.MARKET_STATUS_POST_ONLY)
    assert refusal(w.engine, place(post_only=True)) is None
    assert refusal(w.engine, place()) == "MATCH_MARKET_POST_ONLY"
    assert refusal(w.engine, place(kind=t.ORDER_TYPE_MARKET)) == "MATCH_MARKET_POST_ONLY"
    assert refusal(w.engine, AMEND_QTY) is None
    assert refusal(w.engine, AMEND_CROSS) == "MATCH_MARKET_POST_ONLY"  # up to the best ask
    below = command(amend=match_pb2.AmendCommand(order_id="b1", account_id="alice", price="109"))
    assert refusal(w.engine, below) is None
    assert refusal(w.engine, CANCEL) is None


def test_delisting_cancels_every_open_order_and_refuses_everything_after(w: Wire) -> None:
    events = set_status(w, t.MARKET_STATUS_DELISTED, "delisted")
    assert kinds(events) == [
        "status_changed", "cancelled", "cancelled", "level_changed", "level_changed",
    ]  # fmt: skip
    cancelled = [e.cancelled for e in events if e.HasField("cancelled")]
    assert [(c.order_id, c.account_id) for c in cancelled] == [("b1", "alice"), ("s1", "bob")]
    assert {c.reason for c in cancelled} == {t.CANCEL_REASON_MARKET_HALTED}
    assert w.engine.working_orders("alice") == w.engine.working_orders("bob") == 0
    for cmd in (place(post_only=True), CANCEL, AMEND_QTY):
        assert refusal(w.engine, cmd) == "MATCH_MARKET_DELISTED"
    again = command(
        set_status=match_pb2.SetMarketStatusCommand(
            status=t.MARKET_STATUS_TRADING, reason="relist", request_id="r"
        )
    )
    assert refusal(w.engine, again) == "MATCH_MARKET_DELISTED"  # final
    assert refusal(w.engine, MASS) is None  # finds nothing: sweeps keep working
    assert refusal(w.engine, EXPIRE) is None


def test_resume_lets_everything_through_again(w: Wire) -> None:
    set_status(w, t.MARKET_STATUS_HALTED)
    events = set_status(w, t.MARKET_STATUS_TRADING, "resumed")
    assert events[0].status_changed.previous_status == t.MARKET_STATUS_HALTED
    assert refusal(w.engine, place()) is None


def test_malformed_status_commands_are_refused() -> None:
    bad = command(
        set_status=match_pb2.SetMarketStatusCommand(status=t.MARKET_STATUS_UNSPECIFIED, reason=" ")
    )
    with pytest.raises(InvalidArgument) as err:
        decode(BTC, bad)
    assert {v.field: v.reason for v in err.value.violations} == {
        "command.set_status.status": "MATCH_INVALID_ENUM",
        "command.set_status.request_id": "MATCH_FIELD_REQUIRED",
        "command.set_status.reason": "MATCH_FIELD_REQUIRED",
    }


def test_the_snapshot_carries_the_status_and_restores_it(w: Wire) -> None:
    plain = w.engine.snapshot()
    assert b'"status"' not in plain  # never set: the bytes are as before statuses
    set_status(w, t.MARKET_STATUS_POST_ONLY, "opening auction")
    restored = MarketEngine.restore(BTC, w.engine.snapshot())
    assert (restored.status, restored.status_reason) == (
        t.MARKET_STATUS_POST_ONLY,
        "opening auction",
    )
    assert restored.snapshot() == w.engine.snapshot()
    assert refusal(restored, place()) == "MATCH_MARKET_POST_ONLY"
