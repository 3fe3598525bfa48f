"""The ledger's pure logic: a Book in memory, no database."""

from __future__ import annotations

from services.chassis import ExchangeError
from services.ledger.domain import (
    Account,
    Book,
    Kind,
    Op,
    State,
    Transfer,
    TransferInput,
    split_chains,
)
from services.ledger.settlement import (
    MarketEvent,
    Party,
    Release,
    TradeSettlement,
    apply_events,
)

ASSETS = frozenset({"BTC", "USDT"})


def book(now: int = 1_000) -> Book:
    return Book(now_ns=now, last_sequence=0, halted=False, assets=ASSETS)


def single(tid: str, debit: str, credit: str, amount: int, **kw: object) -> TransferInput:
    return TransferInput(
        tid,
        Op.SINGLE,
        debit,
        credit,
        kw.pop("asset", "USDT"),
        amount,
        kind=Kind.DEPOSIT,
        **kw,  # type: ignore[arg-type]
    )


def pending(tid: str, account: str, amount: int, timeout_ns: int = 0) -> TransferInput:
    return TransferInput(
        tid,
        Op.PENDING,
        account,
        "sys:orders",
        "USDT",
        amount,
        timeout_ns=timeout_ns,
        kind=Kind.ORDER_HOLD,
    )


def reasons(outcomes: list[Transfer | ExchangeError]) -> list[str]:
    return [o.reason if isinstance(o, ExchangeError) else "" for o in outcomes]


def test_split_chains() -> None:
    assert split_chains([False, True, True, False, True]) == [
        ([0], True),
        ([1, 2, 3], True),
        ([4], False),
    ]


def test_user_accounts_cannot_go_negative_system_accounts_can() -> None:
    b = book()
    assert reasons(b.apply_chain([single("d", "sys:custody", "alice", 100)])) == [""]
    assert reasons(b.apply_chain([single("t", "alice", "bob", 101)])) == [
        "LEDGER_INSUFFICIENT_FUNDS"
    ]
    # zero is a balance: never having held USDT is having too little of it
    assert reasons(b.apply_chain([single("u", "carol", "bob", 1)])) == ["LEDGER_INSUFFICIENT_FUNDS"]
    custody = b.account("sys:custody", "USDT")
    assert custody is not None and custody.available == -100
    assert [f.id for f in b.new_failures] == ["t", "u"]


def test_a_failed_chain_leaves_no_trace() -> None:
    b = book()
    b.apply_chain([single("d", "sys:custody", "alice", 10)])
    before = {k: a.values for k, a in b.accounts.items()}
    out = b.apply_chain(
        [
            single("a", "alice", "bob", 6, linked=True),
            pending("h", "alice", 3),
            single("c", "alice", "carol", 2),  # 6 + 3 + 2 > 10
        ]
    )
    assert reasons(out) == [
        "LEDGER_LINKED_EVENT_FAILED",
        "LEDGER_LINKED_EVENT_FAILED",
        "LEDGER_INSUFFICIENT_FUNDS",
    ]
    # "h" was not linked to "c": chains are split by the caller; here all three were
    # passed as one chain, so all roll back.
    assert {k: a.values for k, a in b.accounts.items() if a.changed} == {
        k: v for k, v in before.items() if v != (0, 0, 0, 0)
    }
    assert b.last_sequence == 1 and len(b.new_transfers) == 1 and "a" not in b.transfers


def test_hold_consumed_in_parts_then_released_resolves_once() -> None:
    b = book()
    b.apply_chain([single("d", "sys:custody", "alice", 100), pending("h", "alice", 60)])
    alice = b.account("alice", "USDT")
    assert alice is not None and alice.available == 40 and alice.debits_pending == 60
    for i, amount in enumerate((10, 20)):
        (out,) = b.apply_chain(
            [TransferInput(f"c{i}", Op.CONSUME, pending_id="h", amount=amount, kind=Kind.TRADE)]
        )
        assert isinstance(out, Transfer) and out.state == State.POSTED
    assert b.transfers["h"].remaining == 30 and b.transfers["h"].state == State.PENDING
    (too_much,) = b.apply_chain(
        [TransferInput("c9", Op.CONSUME, pending_id="h", amount=31, kind=Kind.TRADE)]
    )
    assert reasons([too_much]) == ["LEDGER_AMOUNT_EXCEEDS_PENDING"]
    (released,) = b.apply_chain([TransferInput("v", Op.VOID, pending_id="h")])
    assert isinstance(released, Transfer) and released.amount == 30
    assert b.transfers["h"].state == State.VOIDED
    assert (alice.debits_posted, alice.credits_posted, alice.debits_pending) == (30, 100, 0)
    assert reasons(b.apply_chain([TransferInput("p", Op.POST, pending_id="h")])) == [
        "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED"
    ]


def test_post_releases_the_rest_and_expiry_is_decided_at_apply_time() -> None:
    b = book(now=1_000)
    b.apply_chain(
        [
            single("d", "sys:custody", "alice", 100),
            pending("h1", "alice", 50),
            pending("h2", "alice", 20, timeout_ns=500),
        ]
    )
    b.apply_chain([TransferInput("p", Op.POST, pending_id="h1", amount=5)])
    assert b.transfers["h1"].state == State.POSTED and b.transfers["h1"].remaining == 0
    b.now_ns = 1_500
    assert reasons(b.apply_chain([TransferInput("p2", Op.POST, pending_id="h2")])) == [
        "LEDGER_PENDING_TRANSFER_EXPIRED"
    ]
    alice = b.account("alice", "USDT")
    assert alice is not None and alice.available == 95 and alice.debits_pending == 0


def test_idempotency_same_fields_same_result_other_fields_refused() -> None:
    b = book()
    first = b.apply_chain([single("d", "sys:custody", "alice", 100)])[0]
    assert b.apply_chain([single("d", "sys:custody", "alice", 100)])[0] is first
    assert reasons(b.apply_chain([single("d", "sys:custody", "alice", 101)])) == [
        "LEDGER_TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS"
    ]
    assert b.last_sequence == 1


def test_halt_refuses_new_withdrawals_only() -> None:
    b = book()
    b.apply_chain([single("d", "sys:custody", "alice", 100)])
    b.halted = True
    wd = TransferInput("w", Op.PENDING, "alice", "sys:custody", "USDT", 5, kind=Kind.WITHDRAWAL)
    assert reasons(b.apply_chain([wd])) == ["LEDGER_HALTED"]
    assert reasons(b.apply_chain([single("t", "alice", "bob", 5)])) == [""]


def _trade(seq: int, tid: str, buyer_fee: int = 0, seller_fee: int = 0) -> MarketEvent:
    return MarketEvent(
        "BTC-USDT",
        seq,
        TradeSettlement(
            tid,
            "BTC",
            "USDT",
            quantity=2,
            quote_quantity=200,
            buyer=Party("bob", "ob", buyer_fee, "BTC", done=False),
            seller=Party("sam", "os", seller_fee, "USDT", done=True),
        ),
    )


def _funded() -> Book:
    b = book()
    b.apply_chain(
        [
            single("d1", "sys:custody", "bob", 1000),
            single("d2", "sys:custody", "sam", 10, asset="BTC"),
            pending("hold:ob", "bob", 500),
            TransferInput(
                "hold:os", Op.PENDING, "sam", "sys:orders", "BTC", 2, kind=Kind.ORDER_HOLD
            ),
        ]
    )
    return b


def test_settlement_moves_both_legs_and_fees_once() -> None:
    b = _funded()
    assert apply_events(b, [_trade(1, "t1", buyer_fee=1, seller_fee=-3)]) == 1
    bal = {k: a.available for k, a in b.accounts.items()}
    assert bal[("bob", "USDT")] == 500 and bal[("bob", "BTC")] == 1
    assert bal[("sam", "USDT")] == 203 and bal[("sam", "BTC")] == 8
    assert bal[("sys:fees", "BTC")] == 1 and bal[("sys:fees", "USDT")] == -3
    assert b.transfers["hold:os"].state == State.POSTED
    assert b.transfers["hold:ob"].remaining == 300
    assert apply_events(b, [_trade(2, "t1")]) == 0  # trade t1 does not settle again
    assert b.account("bob", "BTC").available == 1  # type: ignore[union-attr]
    for asset in ("USDT", "BTC"):
        assert (
            sum(a.credits_posted - a.debits_posted for a in b.accounts.values() if a.asset == asset)
            == 0
        )


def test_settlement_survives_missing_holds() -> None:
    b = _funded()
    b.apply_chain([TransferInput("v", Op.VOID, pending_id="hold:ob")])
    events = [
        MarketEvent("BTC-USDT", 1, None),
        _trade(2, "t2"),
        MarketEvent("BTC-USDT", 3, Release("nope")),
    ]
    assert apply_events(b, events) == 1
    assert [(a.kind, a.order_id) for a in b.anomalies] == [
        ("HOLD_SHORT", "ob"),
        ("HOLD_MISSING", "nope"),
    ]
    # bob's hold was voided: the quote came from his available balance instead.
    assert b.account("bob", "USDT").available == 800  # type: ignore[union-attr]


def test_account_changed_tracks_new_and_loaded_rows() -> None:
    new = Account("a", "USDT")
    assert not new.changed
    loaded = Account("a", "USDT", 1, 2, 0, 0, stored=(1, 2, 0, 0))
    assert not loaded.changed
    loaded.credits_posted += 1
    assert loaded.changed


def test_an_unreadable_event_is_recorded_and_passed() -> None:
    from services.ledger.settlement import Unreadable

    b = book()
    assert apply_events(b, [MarketEvent("X-Y", 1, Unreadable("KeyError('X-Y')"))]) == 0
    assert [(a.kind, a.detail) for a in b.anomalies] == [("EVENT_UNREADABLE", "KeyError('X-Y')")]
