"""Withdrawal protections (pure): the operator's approval step and the address allowlist.

The approval step's transitions through the saga machine (`decide`) with the
withdrawal saga's own steps, what each change makes of the withdrawal's state, an
operator's review, and the allowlist's rules (cooling, turning it off)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.chassis import ExchangeError
from services.funding.config import DEFAULT_ASSETS, FundingConfig, thresholds_from
from services.funding.domain import (
    APPROVED,
    COMPENSATED,
    COMPENSATING,
    EXPIRED,
    REJECTED,
    RUNNING,
    SUCCEEDED,
    Change,
    Done,
    Fail,
    Progress,
    RetryPolicy,
    SagaRecord,
    Step,
    Vetoed,
    Wait,
    allowlist_change,
    allowlist_on,
    approval_outcome,
    approval_veto,
    check_destination,
    decide,
    needs_approval,
    parse_withdrawal_address,
    request_fingerprint,
    review_at_look,
    review_withdrawal,
    same_request,
    withdrawal_state,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)
ETH = "0x" + "ab" * 20
RNG = random.Random(3)


async def _noop(ctx: object) -> Done:
    return Done()


# The withdrawal saga's shape: hold (compensable) -> risk -> approval (a poll) ->
# broadcast (irreversible) -> confirmations -> post.
STEPS = (
    Step("ledger_hold", _noop, _noop, RetryPolicy(max_attempts=8)),
    Step("risk_check", _noop, None, RetryPolicy(max_attempts=8)),
    Step("await_approval", _noop, None, RetryPolicy(max_attempts=8), poll=True),
    Step("custody_broadcast", _noop, None, RetryPolicy(max_attempts=0), on_exhausted="stuck"),
    Step("await_confirmations", _noop, None, RetryPolicy(max_attempts=0), on_exhausted="stuck"),
    Step("ledger_post", _noop, None, RetryPolicy(max_attempts=0), on_exhausted="stuck"),
)
AT_APPROVAL = Progress(RUNNING, 2)


def _veto(review: str) -> Fail:
    with pytest.raises(Vetoed) as vetoed:
        approval_veto(review)
    return Fail(vetoed.value.error)


def _change(step: str, entry_state: str, state: str, outputs: dict[str, str], failure=None):  # type: ignore[no-untyped-def]
    saga = SagaRecord("s", "withdrawal", "wd", "acc", state, 0, 0, {}, NOW, 1, None)
    if failure is not None:
        saga = SagaRecord(
            "s", "withdrawal", "wd", "acc", state, 0, 0, {"failed_step": step}, NOW, 1, None
        )
    return Change(saga, step, False, entry_state, state, outputs, None, failure)


# -- the approval step in the saga machine ---------------------------------------


def test_waiting_for_approval_logs_nothing_and_stays_at_the_step() -> None:
    look = approval_outcome(required=True, review="", poll_s=5.0)
    assert look == Wait(5.0, {"approval": "awaiting"})
    d = decide(STEPS, AT_APPROVAL, look, past_deadline=False, rng=RNG)
    assert d.progress == AT_APPROVAL and d.entry is None and d.delay_s == 5.0
    assert d.outputs == {"approval": "awaiting"}


def test_an_approval_goes_on_to_the_broadcast() -> None:
    look = approval_outcome(required=True, review=APPROVED, poll_s=5.0)
    d = decide(STEPS, AT_APPROVAL, look, past_deadline=False, rng=RNG)
    assert d.progress == Progress(RUNNING, 3) and d.entry is not None
    assert (d.entry.name, d.entry.state) == ("await_approval", SUCCEEDED)


def test_no_approval_needed_is_done_at_once() -> None:
    assert approval_outcome(required=False, review="", poll_s=5.0) == Done(
        {"approval": "not required"}
    )


@pytest.mark.parametrize(
    ("review", "reason"),
    [
        (REJECTED, "FUNDING_WITHDRAWAL_REJECTED_BY_OPERATOR"),
        (EXPIRED, "FUNDING_APPROVAL_EXPIRED"),
    ],
)
def test_a_rejection_or_expiry_voids_the_hold(review: str, reason: str) -> None:
    d = decide(STEPS, AT_APPROVAL, _veto(review), past_deadline=False, rng=RNG)
    # risk_check has no compensation: the hold's void is next, then nothing.
    assert d.progress == Progress(COMPENSATING, 0) and d.failure is not None
    assert d.entry is not None and d.entry.state == "FAILED"
    assert reason.encode() in d.failure.SerializeToString()
    undone = decide(STEPS, d.progress, Done({"void_id": "v"}), past_deadline=False, rng=RNG)
    assert undone.progress.state == COMPENSATED


def test_waiting_past_the_sagas_deadline_compensates_never_sticks() -> None:
    look = approval_outcome(required=True, review="", poll_s=5.0)
    d = decide(STEPS, AT_APPROVAL, look, past_deadline=True, rng=RNG)
    assert d.progress == Progress(COMPENSATING, 0)


def test_nothing_is_vetoed_without_a_no() -> None:
    approval_veto("")
    approval_veto(APPROVED)


def test_the_deadline_turns_no_review_into_expired_only_when_required() -> None:
    assert review_at_look(required=True, review="", deadline=NOW, now=NOW) == EXPIRED
    assert review_at_look(required=True, review="", deadline=LATER, now=NOW) == ""
    assert review_at_look(required=True, review=APPROVED, deadline=NOW, now=LATER) == APPROVED
    assert review_at_look(required=False, review="", deadline=None, now=LATER) == ""


# -- what the changes make of the withdrawal -----------------------------------------


def test_the_withdrawal_awaits_approval_then_is_pending_again() -> None:
    waiting = _change("await_approval", "", RUNNING, {"approval": "awaiting"})
    assert withdrawal_state(waiting) == "AWAITING_APPROVAL"
    approved = _change("await_approval", SUCCEEDED, RUNNING, {"approval": "approved"})
    assert withdrawal_state(approved) == "PENDING"
    assert withdrawal_state(_change("await_approval", "STARTED", RUNNING, {})) is None


def test_a_rejected_or_expired_withdrawal_ends_rejected() -> None:
    for review in (REJECTED, EXPIRED):
        failure = _veto(review).error
        ended = _change("await_approval", SUCCEEDED, COMPENSATED, {}, failure)
        assert withdrawal_state(ended) == "REJECTED"


# -- an operator's review ---------------------------------------------------------------


def review(decision: str, **overrides: object) -> bool:
    fields: dict[str, object] = {
        "state": "AWAITING_APPROVAL", "required": True, "review": "",
        "cancel_requested": False, "deadline": LATER, "now": NOW,
    }  # fmt: skip
    fields.update(overrides)
    return review_withdrawal("wd_1", decision, **fields)  # type: ignore[arg-type]


def test_a_review_is_taken_once_and_the_same_again_is_no_news() -> None:
    assert review(APPROVED) is True
    assert review(REJECTED) is True
    assert review(APPROVED, state="PENDING") is True  # before the saga reached the step
    assert review(APPROVED, review=APPROVED) is False
    assert review(REJECTED, review=REJECTED, state="REJECTED") is False


@pytest.mark.parametrize(
    ("decision", "overrides", "reason"),
    [
        (APPROVED, {"required": False}, "FUNDING_APPROVAL_NOT_REQUIRED"),
        (APPROVED, {"now": LATER}, "FUNDING_APPROVAL_EXPIRED"),
        (APPROVED, {"review": EXPIRED, "state": "REJECTED"}, "FUNDING_APPROVAL_EXPIRED"),
        (REJECTED, {"review": APPROVED}, "FUNDING_WITHDRAWAL_ALREADY_REVIEWED"),
        (APPROVED, {"review": REJECTED}, "FUNDING_WITHDRAWAL_ALREADY_REVIEWED"),
        (APPROVED, {"cancel_requested": True}, "FUNDING_WITHDRAWAL_NOT_AWAITING_APPROVAL"),
        (APPROVED, {"state": "CANCELLED"}, "FUNDING_WITHDRAWAL_NOT_AWAITING_APPROVAL"),
    ],
)
def test_reviews_refused_name_their_reason(
    decision: str, overrides: dict[str, object], reason: str
) -> None:
    with pytest.raises(ExchangeError) as refused:
        review(decision, **overrides)
    assert refused.value.reason == reason
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_approval_is_above_the_threshold_only() -> None:
    assert needs_approval(101, 100) and not needs_approval(100, 100)
    assert not needs_approval(10**20, None)


def test_thresholds_setting() -> None:
    assert thresholds_from("BTC=1, USDT=1000") == {"BTC": "1", "USDT": "1000"}
    assert thresholds_from("off") == {}
    with pytest.raises(ValueError):
        thresholds_from("BTC")
    config = FundingConfig.from_env({"FUNDING_APPROVAL_THRESHOLDS": "ETH=5"})
    assert config.approval_thresholds == {"ETH": "5"}
    assert FundingConfig.from_env({}).approval_thresholds["BTC"] == "10"
    assert FundingConfig.from_env({}).address_cooling_s == 86400.0


# -- the allowlist ----------------------------------------------------------------------


def test_with_the_allowlist_on_only_a_cooled_listed_address_passes() -> None:
    check_destination(on=False, usable_time=None, address=ETH, asset="USDT", now=NOW)
    check_destination(on=True, usable_time=NOW, address=ETH, asset="USDT", now=NOW)
    for usable, reason in (
        (None, "FUNDING_ADDRESS_NOT_ALLOWED"),
        (LATER, "FUNDING_ADDRESS_COOLING"),
    ):
        with pytest.raises(ExchangeError) as refused:
            check_destination(on=True, usable_time=usable, address=ETH, asset="USDT", now=NOW)
        assert refused.value.reason == reason
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_on_is_at_once_off_waits_the_cooling_period() -> None:
    on = allowlist_change(enabled=False, disable_time=None, want=True, now=NOW, cooling_s=3600)
    assert on == (True, None) and allowlist_on(*on, NOW)
    off = allowlist_change(enabled=True, disable_time=None, want=False, now=NOW, cooling_s=3600)
    assert off == (True, LATER)
    assert allowlist_on(*off, NOW) and allowlist_on(*off, LATER - timedelta(seconds=1))
    assert not allowlist_on(*off, LATER)
    # Asking again does not push the turn-off back; turning on again cancels it.
    assert change(True, LATER, False, NOW + timedelta(minutes=5)) == (True, LATER)
    assert change(True, LATER, True, NOW) == (True, None)
    # Off once the turn-off took effect; off stays off.
    assert change(True, NOW, False, LATER) == (False, None)
    assert change(False, None, False, NOW) == (False, None)


def change(
    enabled: bool, disable_time: datetime | None, want: bool, now: datetime
) -> tuple[bool, datetime | None]:
    return allowlist_change(
        enabled=enabled, disable_time=disable_time, want=want, now=now, cooling_s=3600
    )


def test_an_address_to_add_is_checked_field_by_field() -> None:
    rule = parse_withdrawal_address(
        request_id="r",
        asset_code="USDT",
        network="",
        address=ETH,
        label="cold",
        rules=DEFAULT_ASSETS,
    )
    assert rule.network == "ethereum"
    with pytest.raises(ExchangeError) as refused:
        parse_withdrawal_address(
            request_id="r", asset_code="USDT", network="bitcoin", address="nope", label="x" * 65,
            rules=DEFAULT_ASSETS,
        )  # fmt: skip
    assert refused.value.reason == "FUNDING_WITHDRAWAL_ADDRESS_INVALID"
    assert {v.field for v in refused.value.violations} == {"network", "address", "label"}
    for bad in ({"request_id": ""}, {"asset_code": "DOGE"}):
        fields = {
            "request_id": "r",
            "asset_code": "USDT",
            "network": "",
            "address": ETH,
            "label": "",
        }
        fields.update(bad)
        with pytest.raises(ExchangeError):
            parse_withdrawal_address(**fields, rules=DEFAULT_ASSETS)


def test_a_request_id_names_one_call() -> None:
    first = request_fingerprint("SetWithdrawalAllowlist", "True")
    same_request(stored=(first, "acc"), fingerprint=first, target="acc")
    with pytest.raises(ExchangeError) as reused:
        other = request_fingerprint("SetWithdrawalAllowlist", "False")
        same_request(stored=(first, "acc"), fingerprint=other, target="acc")
    assert reused.value.reason == "FUNDING_REQUEST_ID_REUSED"
