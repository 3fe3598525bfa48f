"""funding's pure rules beside the state machine: what a saga's change does to its
withdrawal or deposit, a cancel, a chain report, and a decision applied to a saga."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from services.chassis import FailedPrecondition
from services.funding.domain import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    RUNNING,
    Change,
    Decision,
    LogEntry,
    Progress,
    SagaRecord,
    Step,
    Vetoed,
    advance,
    cancel_withdrawal,
    deposit_state,
    error_status,
    frozen_account_veto,
    known_output,
    learnt_nothing,
    stale_report,
    status_reason,
    withdrawal_state,
    withdrawal_step_may_start,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _saga(**data: str) -> SagaRecord:
    return SagaRecord(
        "saga_1", "withdrawal", "wd_1", "acc_1", RUNNING, 0, 0, dict(data), T0, 1, None
    )


def _change(step: str, entry: str, state: str, failure: str = "", **data: str) -> Change:
    error = error_status(grpc.StatusCode.ABORTED, failure, "x") if failure else None
    return Change(_saga(**data), step, False, entry, state, {}, None, error)


def test_a_withdrawal_follows_its_saga() -> None:
    assert withdrawal_state(_change("custody_broadcast", "SUCCEEDED", RUNNING)) == "BROADCAST"
    assert withdrawal_state(_change("ledger_post", "SUCCEEDED", COMPLETED)) == "COMPLETED"
    assert withdrawal_state(_change("ledger_hold", "STARTED", RUNNING)) is None
    cancelled = _change("ledger_hold", "SUCCEEDED", COMPENSATED, "FUNDING_WITHDRAWAL_CANCELLED")
    assert withdrawal_state(cancelled) == "CANCELLED"
    refused = _change("ledger_hold", "SUCCEEDED", COMPENSATED, "RISK_LIMIT", failed_step="x")
    assert withdrawal_state(refused) == "REJECTED"
    early = _change("ledger_hold", "SUCCEEDED", COMPENSATED, "FUNDING_X", failed_step="risk_check")
    assert withdrawal_state(early) == "REJECTED"
    dropped = _change(
        "ledger_hold", "SUCCEEDED", COMPENSATED, "FUNDING_TRANSACTION_DROPPED",
        failed_step="await_confirmations",
    )  # fmt: skip
    assert withdrawal_state(dropped) == "FAILED"


def test_a_deposit_follows_its_saga() -> None:
    assert deposit_state(_change("ledger_credit", "SUCCEEDED", COMPLETED)) == "CREDITED"
    assert deposit_state(_change("await_confirmations", "FAILED", COMPENSATED)) == "CANCELLED"
    assert deposit_state(_change("ledger_credit", "STARTED", RUNNING)) is None


def test_an_owners_cancel_vetoes_until_the_broadcast_started() -> None:
    with pytest.raises(Vetoed) as vetoed:
        withdrawal_step_may_start("risk_check", cancel_requested=True, broadcast_started=False)
    assert status_reason(vetoed.value.error) == "FUNDING_WITHDRAWAL_CANCELLED"
    assert withdrawal_step_may_start(
        "custody_broadcast", cancel_requested=False, broadcast_started=False
    )
    assert not withdrawal_step_may_start(
        "custody_broadcast", cancel_requested=True, broadcast_started=True
    )


def test_a_frozen_accounts_withdrawal_stops_before_the_broadcast_only() -> None:
    for step in ("ledger_hold", "risk_check", "await_approval", "custody_broadcast"):
        for state, reason in (
            ("SUSPENDED", "FUNDING_ACCOUNT_SUSPENDED"),
            ("CLOSED", "FUNDING_ACCOUNT_CLOSED"),
        ):
            with pytest.raises(Vetoed) as vetoed:
                frozen_account_veto(step, state, broadcast_started=False)
            assert status_reason(vetoed.value.error) == reason
        frozen_account_veto(step, "", broadcast_started=False)  # not frozen
    # Once the broadcast started it may have gone out: at most once, never voided.
    frozen_account_veto("custody_broadcast", "SUSPENDED", broadcast_started=True)
    frozen_account_veto("await_confirmations", "SUSPENDED", broadcast_started=False)
    vetoed_at_broadcast = _change(
        "ledger_hold", "SUCCEEDED", COMPENSATED, "FUNDING_ACCOUNT_SUSPENDED",
        failed_step="custody_broadcast",
    )  # fmt: skip
    assert withdrawal_state(vetoed_at_broadcast) == "REJECTED"


def test_a_cancel_is_requested_once_and_refused_after_the_broadcast() -> None:
    def cancel(state: str, requested: bool = False, started: bool = False) -> bool:
        return cancel_withdrawal(
            "wd_1", state, "tx", cancel_requested=requested, broadcast_started=started
        )

    assert cancel("PENDING")
    assert not cancel("PENDING", requested=True)
    assert not cancel("CANCELLED")
    for state, started, reason in (
        ("BROADCAST", True, "FUNDING_WITHDRAWAL_ALREADY_BROADCAST"),
        ("REJECTED", False, "FUNDING_WITHDRAWAL_NOT_CANCELLABLE"),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            cancel(state, started=started)
        assert refused.value.reason == reason


def test_chain_reports_about_a_known_output() -> None:
    def known(status: str, state: str = "PENDING", **kw: object) -> str:
        args: dict[str, object] = {
            "reverted": False, "known_confirmations": 2, "confirmations": 2,
            "credit_started": False,
        }  # fmt: skip
        args.update(kw)
        return known_output(state=state, status=status, **args)  # type: ignore[arg-type]

    assert known("reverted") == "revert"
    assert known("reverted", credit_started=True) == "anomaly"
    assert known("reverted", state="CREDITED") == "anomaly"
    assert known("reverted", state="CREDITED", reverted=True) == "nothing"
    assert known("confirmed", confirmations=3) == "confirm"
    assert known("confirmed", confirmations=2) == "nothing"
    assert stale_report(
        state="PENDING", reverted=False, known_confirmations=2, status="confirmed", confirmations=2
    )
    assert not stale_report(
        state="PENDING", reverted=False, known_confirmations=2, status="confirmed", confirmations=3
    )
    assert not stale_report(
        state="CREDITED", reverted=False, known_confirmations=2, status="reverted", confirmations=0
    )


async def _noop(_ctx: object) -> None:
    return None


def test_a_decision_applied_to_a_saga() -> None:
    step = Step("hold", _noop)  # type: ignore[arg-type]
    error = error_status(grpc.StatusCode.ABORTED, "FUNDING_X", "x")
    undo = Decision(
        Progress(COMPENSATING, 0), LogEntry("hold", False, "FAILED", 1, error), 0.0, {"a": "1"},
        error,
    )  # fmt: skip
    later = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    after = advance(_saga(), step, undo, now=later, compensation_window_s=600)
    assert (after.state, after.step_index, after.attempt) == (COMPENSATING, 0, 0)
    assert after.data == {"a": "1", "failed_step": "hold"}
    assert after.deadline == datetime(2026, 1, 1, 0, 40, tzinfo=UTC)  # the window, not T0
    assert after.failure == error.SerializeToString()
    poll = Decision(Progress(RUNNING, 0), None, 0.1, {})
    assert learnt_nothing(_saga(), poll, 0.4)
    assert not learnt_nothing(_saga(), Decision(Progress(RUNNING, 0), None, 0.1, {"c": "2"}), 0.4)
    assert not learnt_nothing(_saga(), Decision(Progress(RUNNING, 0), None, 1.0, {}), 0.4)
