"""funding's rules: the saga state machine, and what deposits and withdrawals decide.

Pure: no I/O, no clock, no ids drawn here; times, randomness and rows come in as
arguments and decisions go out as values. The orchestrator (orchestrator.py)
runs the machine against PostgreSQL (store.py); the servicer (server.py) turns
requests into what this module checks.

Invariants the saga machine keeps (`decide`):
- A step's outcome moves a saga only forward, into compensation, or to a
  terminal state (COMPLETED, COMPENSATED, STUCK); a terminal saga runs nothing.
- A definite failure (`Fail`) had no effect: compensation starts below the
  failed step. An exhausted retry is uncertain: compensation starts with the
  step itself (compensations tolerate "never happened"), unless the step's
  effect is irreversible (`on_exhausted="stuck"`): then the saga is STUCK.
- A `Wait` logs nothing and costs no attempt; the saga's deadline bounds it.
- Compensations are retried until done; one that fails for good, or runs past
  the deadline, makes the saga STUCK for an operator.

What an action returns:
- `Done(outputs)`: the step is done; outputs are merged into the saga's data.
- `Wait(after_s, outputs)`: not done yet, nothing failed (e.g. confirmations).
- `Retry(error)`: failed transiently (the effect may or may not have happened);
  retried with the same idempotency key after a backoff.
- `Fail(error)`: failed for good and had no effect; the saga compensates.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.chassis import (
    AlreadyExists,
    Asset,
    ExchangeError,
    FailedPrecondition,
    MoneyError,
    PermissionDenied,
    Violations,
    invalid_field,
    require_request_id,
)

from .config import AssetRules

__all__ = [
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "OPEN_STATES",
    "RUNNING",
    "STUCK",
    "Change",
    "Decision",
    "Done",
    "Fail",
    "LogEntry",
    "Outcome",
    "Progress",
    "Retry",
    "RetryPolicy",
    "SagaRecord",
    "Step",
    "StepContext",
    "Vetoed",
    "Wait",
    "WithdrawalSpec",
    "advance",
    "boundary",
    "decide",
    "error_status",
    "parse_withdrawal",
    "shift",
    "status_reason",
]

RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK = (
    "RUNNING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "STUCK",
)
OPEN_STATES = (RUNNING, COMPENSATING)
STARTED, SUCCEEDED, RETRYING, FAILED = "STARTED", "SUCCEEDED", "RETRYING", "FAILED"


# -- errors as google.rpc.Status ---------------------------------------------


def error_status(
    code: grpc.StatusCode, reason: str, message: str, domain: str = "funding"
) -> status_pb2.Status:
    return ExchangeError(reason, message, code=code, domain=domain).to_status(domain)


def status_reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def shift(moment: datetime, seconds: float) -> datetime:
    return datetime.fromtimestamp(moment.timestamp() + seconds, UTC)


# -- steps and outcomes ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    outputs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Wait:
    after_s: float
    outputs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Retry:
    error: status_pb2.Status


@dataclass(frozen=True, slots=True)
class Fail:
    error: status_pb2.Status


Outcome = Done | Wait | Retry | Fail


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": a delay in [d/2, d], d capped at max_s.
    max_attempts 0 means: until the saga's deadline."""

    initial_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 5.0
    max_attempts: int = 8

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        return base / 2 + rng.random() * base / 2

    def exhausted(self, attempt: int) -> bool:
        return self.max_attempts > 0 and attempt >= self.max_attempts


@dataclass(frozen=True, slots=True)
class StepContext:
    saga_id: str
    reference_id: str
    account_id: str
    step: str
    attempt: int
    data: Mapping[str, Any]

    @property
    def key(self) -> str:
        """The idempotency key of this step: the same for every attempt."""
        return f"{self.saga_id}:{self.step}"


Action = Callable[[StepContext], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    action: Action
    compensation: Action | None = None
    retry: RetryPolicy = RetryPolicy()
    compensation_retry: RetryPolicy = RetryPolicy(max_s=5.0, max_attempts=0)
    timeout_s: float = 5.0
    # When retries run out: compensate (the effect can be undone, or never
    # happened), or park the saga as STUCK (an uncertain, irreversible effect).
    on_exhausted: Literal["compensate", "stuck"] = "compensate"
    # A read-only poll (e.g. confirmations): no STARTED entry per attempt.
    poll: bool = False


def call_timeout(step_timeout_s: float) -> float:
    """How long a step's call to another service may take: half a second less than
    the step (at least half a second), so the step sees the call's own answer."""
    return max(0.5, step_timeout_s - 0.5)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a saga is: forward at `step`, or compensating `step` (going down)."""

    state: str
    step: int
    attempt: int = 0  # attempts made of the current step (or compensation)


@dataclass(frozen=True, slots=True)
class LogEntry:
    name: str
    compensation: bool
    state: str
    attempt: int
    error: status_pb2.Status | None = None
    outputs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    progress: Progress
    entry: LogEntry | None  # None for a Wait: nothing new to log
    delay_s: float  # when to run again (ignored once terminal)
    outputs: Mapping[str, str] = field(default_factory=dict)
    failure: status_pb2.Status | None = None  # the error that made the saga compensate


def _compensation_from(steps: Sequence[Step], index: int) -> int:
    """The highest step index <= index that has a compensation, or -1."""
    while index >= 0 and steps[index].compensation is None:
        index -= 1
    return index


def _begin_compensating(steps: Sequence[Step], from_index: int) -> Progress:
    index = _compensation_from(steps, from_index)
    return Progress(COMPENSATED if index < 0 else COMPENSATING, index, 0)


def decide(
    steps: Sequence[Step],
    progress: Progress,
    outcome: Outcome,
    *,
    past_deadline: bool,
    rng: random.Random,
) -> Decision:
    """The state machine: what an outcome of the current step (or compensation) does."""
    if progress.state not in OPEN_STATES:
        raise ValueError(f"saga is {progress.state}: nothing runs")
    step = steps[progress.step]
    attempt = progress.attempt + 1
    if progress.state == RUNNING:
        if isinstance(outcome, Done):
            entry = LogEntry(step.name, False, SUCCEEDED, attempt, outputs=outcome.outputs)
            nxt = progress.step + 1
            state = COMPLETED if nxt == len(steps) else RUNNING
            return Decision(Progress(state, nxt, 0), entry, 0.0, outcome.outputs)
        if isinstance(outcome, Wait):
            if past_deadline:
                return _exhausted(steps, progress, step, attempt, _deadline_error(step))
            return Decision(progress, None, outcome.after_s, outcome.outputs)
        if isinstance(outcome, Fail):
            entry = LogEntry(step.name, False, FAILED, attempt, outcome.error)
            # A definite failure had no effect: undo what came before it.
            undo = _begin_compensating(steps, progress.step - 1)
            return Decision(undo, entry, 0.0, failure=outcome.error)
        if step.retry.exhausted(attempt) or past_deadline:
            return _exhausted(steps, progress, step, attempt, outcome.error)
        entry = LogEntry(step.name, False, RETRYING, attempt, outcome.error)
        return Decision(replace(progress, attempt=attempt), entry, step.retry.delay(attempt, rng))
    # COMPENSATING
    if isinstance(outcome, Done):
        entry = LogEntry(step.name, True, SUCCEEDED, attempt, outputs=outcome.outputs)
        return Decision(_begin_compensating(steps, progress.step - 1), entry, 0.0, outcome.outputs)
    if isinstance(outcome, Wait):
        if past_deadline:
            return _stuck(
                progress, LogEntry(step.name, True, FAILED, attempt, _deadline_error(step))
            )
        return Decision(progress, None, outcome.after_s, outcome.outputs)
    if isinstance(outcome, Fail) or past_deadline:
        error = outcome.error if not past_deadline else _deadline_error(step)
        return _stuck(progress, LogEntry(step.name, True, FAILED, attempt, error))
    policy = step.compensation_retry
    if policy.exhausted(attempt):
        return _stuck(progress, LogEntry(step.name, True, FAILED, attempt, outcome.error))
    entry = LogEntry(step.name, True, RETRYING, attempt, outcome.error)
    return Decision(replace(progress, attempt=attempt), entry, policy.delay(attempt, rng))


def _deadline_error(step: Step) -> status_pb2.Status:
    return error_status(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "FUNDING_SAGA_DEADLINE_EXCEEDED",
        f"step {step.name} did not finish before the saga's deadline",
    )


def _stuck(progress: Progress, entry: LogEntry) -> Decision:
    return Decision(Progress(STUCK, progress.step, entry.attempt), entry, 0.0)


def _exhausted(
    steps: Sequence[Step], progress: Progress, step: Step, attempt: int, error: status_pb2.Status
) -> Decision:
    entry = LogEntry(step.name, False, FAILED, attempt, error)
    if step.on_exhausted == "stuck":
        return _stuck(progress, entry)
    # The outcome is uncertain: compensate this step too (compensations tolerate
    # "never happened").
    return Decision(_begin_compensating(steps, progress.step), entry, 0.0, failure=error)


# -- a saga as committed, and what a decision makes of it ---------------------


@dataclass(frozen=True, slots=True)
class SagaRecord:
    saga_id: str
    kind: str
    reference_id: str
    account_id: str
    state: str
    step_index: int
    attempt: int
    data: dict[str, Any]
    deadline: datetime
    epoch: int
    failure: bytes | None
    # W3C trace context of the saga's creation: every step is a span of that trace.
    trace_context: Mapping[str, str] | None = None

    @property
    def progress(self) -> Progress:
        return Progress(self.state, self.step_index, self.attempt)


def boundary(moment: str, step: Step, compensating: bool) -> str:
    """The name of a step boundary the orchestrator crosses: `started:`, `acted:` or
    `committed:` + the step's name, `~` before a compensation's (crash tests name these)."""
    return f"{moment}:{'~' if compensating else ''}{step.name}"


def learnt_nothing(saga: SagaRecord, decision: Decision, short_s: float) -> bool:
    """A poll that changed nothing and comes back soon: there is nothing to commit."""
    return (
        decision.entry is None
        and decision.progress == saga.progress
        and all(saga.data.get(k) == v for k, v in decision.outputs.items())
        and decision.delay_s <= short_s
    )


def advance(
    saga: SagaRecord,
    step: Step,
    decision: Decision,
    *,
    now: datetime,
    compensation_window_s: float,
) -> SagaRecord:
    """The saga once `decision` about `step` is taken: its progress, its data with the
    step's outputs (and where it failed), a deadline that leaves compensations their
    window, and why it compensates."""
    p = decision.progress
    data = {**saga.data, **decision.outputs}
    if decision.failure is not None:
        data["failed_step"] = step.name
    deadline = saga.deadline
    if p.state == COMPENSATING and saga.state == RUNNING:
        deadline = max(deadline, shift(now, compensation_window_s))
    failure = decision.failure.SerializeToString() if decision.failure is not None else saga.failure
    return replace(
        saga,
        state=p.state,
        step_index=p.step,
        attempt=p.attempt,
        data=data,
        failure=failure,
        deadline=deadline,
    )


def step_name(steps: Sequence[Step], index: int, fallback: str) -> str:
    """The step a saga is at (a terminal saga: the last one that ran)."""
    return steps[index].name if 0 <= index < len(steps) else fallback


@dataclass(frozen=True, slots=True)
class Change:
    """What just happened to a saga, for the domain's rows and events (same transaction)."""

    saga: SagaRecord
    step: str
    compensation: bool
    entry_state: str  # STARTED / SUCCEEDED / RETRYING / FAILED, or "" for a Wait
    state: str  # the saga's state after the change
    outputs: Mapping[str, str]
    error: status_pb2.Status | None
    failure: status_pb2.Status | None  # why the saga is compensating, if it is


class Vetoed(Exception):
    """Raised by a guard: the step must not start (e.g. the owner cancelled)."""

    def __init__(self, error: status_pb2.Status) -> None:
        super().__init__(error.message)
        self.error = error


# -- withdrawals ----------------------------------------------------------------

WITHDRAWAL = "withdrawal"
CUSTODY_ACCOUNT = "sys:custody"
FEE_ACCOUNT = "sys:fees"
APPROVAL_STEP = "await_approval"
BEFORE_BROADCAST = ("ledger_hold", "risk_check", APPROVAL_STEP)
TERMINAL_WITHDRAWAL = ("COMPLETED", "CANCELLED", "REJECTED", "FAILED")


@dataclass(frozen=True, slots=True)
class WithdrawalSpec:
    asset: str
    network: str
    amount: int
    fee: int
    address: str
    memo: str
    required_confirmations: int
    fingerprint: str


def check_request_id(request_id: str) -> None:
    """A call that changes state names itself by a valid idempotency key."""
    require_request_id(request_id, "FUNDING_REQUEST_ID_INVALID")


def parse_withdrawal(
    *,
    request_id: str,
    asset_code: str,
    network: str,
    amount: str,
    address: str,
    memo: str,
    max_fee: str,
    assets: Mapping[str, Asset],
    rules: Mapping[str, AssetRules],
) -> WithdrawalSpec:
    """A RequestWithdrawal's fields, checked and in minor units."""
    check_request_id(request_id)
    asset = assets.get(asset_code)
    rule = rules.get(asset_code)
    if asset is None or rule is None:
        raise invalid_field(
            "FUNDING_ASSET_UNSUPPORTED", "asset", f"{asset_code!r} cannot be withdrawn"
        )
    if network and network != rule.network:
        raise invalid_field(
            "FUNDING_NETWORK_UNSUPPORTED", "network", f"{asset_code} moves on {rule.network} only"
        )
    try:
        minor = asset.to_minor(amount)
    except MoneyError as error:
        raise invalid_field("FUNDING_AMOUNT_INVALID", "amount", str(error), error.reason) from None
    if minor <= 0:
        raise invalid_field("FUNDING_AMOUNT_INVALID", "amount", "must be positive")
    minimum = asset.to_minor(rule.min_withdrawal)
    if minor < minimum:
        raise invalid_field(
            "FUNDING_AMOUNT_BELOW_MINIMUM",
            "amount",
            f"the minimum {asset_code} withdrawal is {rule.min_withdrawal}",
        )
    if not rule.address_ok(address):
        raise invalid_field("FUNDING_ADDRESS_INVALID", "address", f"not a {rule.network} address")
    if memo:
        raise invalid_field("FUNDING_MEMO_NOT_SUPPORTED", "memo", f"{rule.network} takes no memo")
    fee = asset.to_minor(rule.withdrawal_fee)
    if max_fee:
        try:
            ceiling = asset.to_minor(max_fee)
        except MoneyError as error:
            raise invalid_field(
                "FUNDING_MAX_FEE_INVALID", "max_fee", str(error), error.reason
            ) from None
        if fee > ceiling:
            raise FailedPrecondition(
                "FUNDING_FEE_TOO_HIGH",
                f"the fee is {rule.withdrawal_fee} {asset_code}, above max_fee {max_fee}",
                metadata={"fee": rule.withdrawal_fee},
            )
    fingerprint = hashlib.sha256(
        "\x1f".join((asset_code, rule.network, str(minor), address, memo, max_fee)).encode()
    ).hexdigest()
    return WithdrawalSpec(
        asset_code,
        rule.network,
        minor,
        fee,
        address,
        memo,
        rule.withdrawal_confirmations,
        fingerprint,
    )


def withdrawal_ids(withdrawal_id: str) -> dict[str, str]:
    """The ledger transfer ids of a withdrawal: fixed, so that every retry is the same call."""
    return {
        "hold": f"wd:{withdrawal_id}:hold",
        "void": f"wd:{withdrawal_id}:void",
        "post": f"wd:{withdrawal_id}:post",
        "fee": f"wd:{withdrawal_id}:fee",
    }


def withdrawal_saga_data(
    *,
    withdrawal_id: str,
    account_id: str,
    spec: WithdrawalSpec,
    asset: Asset,
    approval_required: bool = False,
) -> dict[str, str]:
    return {
        "approval_required": "true" if approval_required else "false",
        "withdrawal_id": withdrawal_id,
        "account_id": account_id,
        "asset": spec.asset,
        "network": spec.network,
        "amount": asset.format(spec.amount),
        "fee": asset.format(spec.fee),
        "total": asset.format(spec.amount + spec.fee),
        "address": spec.address,
        "required_confirmations": str(spec.required_confirmations),
    }


def withdrawal_event(
    *,
    withdrawal_id: str,
    account_id: str,
    asset: Asset,
    amount: int,
    fee: int,
    state: str,
    saga_id: str,
    txid: str | None = None,
) -> dict[str, Any]:
    """The payload of a funding.withdrawals.<state> event."""
    event: dict[str, Any] = {
        "withdrawal_id": withdrawal_id,
        "account_id": account_id,
        "asset": asset.symbol,
        "amount": asset.format(amount),
        "fee": asset.format(fee),
        "state": state,
    }
    if txid is not None:
        event["txid"] = txid
    event["saga_id"] = saga_id
    return event


def guards_withdrawal(step: str) -> bool:
    """Whether a forward step looks at the withdrawal's row before it starts."""
    return step in (*BEFORE_BROADCAST, "custody_broadcast")


def withdrawal_step_may_start(
    step: str, *, cancel_requested: bool, broadcast_started: bool
) -> bool:
    """Before a guarded step: an owner's cancel stops the saga (Vetoed) until the
    broadcast started; True when this start is the broadcast's, which makes the
    withdrawal uncancellable from then on."""
    if cancel_requested and not broadcast_started:
        raise Vetoed(
            error_status(
                grpc.StatusCode.CANCELLED, "FUNDING_WITHDRAWAL_CANCELLED", "cancelled by the owner"
            )
        )
    return step == "custody_broadcast" and not broadcast_started


# A frozen account's withdrawals stop before the broadcast (issue 21): the reason
# the saga ends with, by the account's state at auth.
FROZEN_ACCOUNT_REASONS = {
    "SUSPENDED": ("FUNDING_ACCOUNT_SUSPENDED", "the account was suspended"),
    "CLOSED": ("FUNDING_ACCOUNT_CLOSED", "the account was closed"),
}


def frozen_account_veto(step: str, account_state: str, *, broadcast_started: bool) -> None:
    """Stops a withdrawal of a frozen (`SUSPENDED` or `CLOSED`) account before any
    guarded step up to and including the broadcast's first start; once the
    broadcast started it may have gone out, so the saga goes on (at most once)."""
    if broadcast_started or not guards_withdrawal(step):
        return
    found = FROZEN_ACCOUNT_REASONS.get(account_state)
    if found is not None:
        reason, message = found
        raise Vetoed(error_status(grpc.StatusCode.FAILED_PRECONDITION, reason, message))


def withdrawal_state(change: Change) -> str | None:
    """The withdrawal's new state after a change of its saga, if it has one."""
    if change.step == APPROVAL_STEP and change.state == RUNNING:
        if change.entry_state == SUCCEEDED:
            return "PENDING"  # approved (or no approval needed): on to the broadcast
        if change.outputs.get("approval") == "awaiting":
            return "AWAITING_APPROVAL"
    if change.state == COMPLETED:
        return "COMPLETED"
    if change.state == COMPENSATED:
        reason = status_reason(change.failure) if change.failure else ""
        failed_at = change.saga.data.get("failed_step", "")
        if reason == "FUNDING_WITHDRAWAL_CANCELLED":
            return "CANCELLED"
        if (
            failed_at in BEFORE_BROADCAST
            or reason.startswith(("LEDGER_", "RISK_"))
            or reason in _FROZEN_REASON_CODES
        ):
            return "REJECTED"
        return "FAILED"
    if change.step == "custody_broadcast" and change.entry_state == SUCCEEDED:
        return "BROADCAST"
    return None


_FROZEN_REASON_CODES = {reason for reason, _ in FROZEN_ACCOUNT_REASONS.values()}


def cancel_withdrawal(
    withdrawal_id: str, state: str, txid: str, *, cancel_requested: bool, broadcast_started: bool
) -> bool:
    """Whether a cancel is to be requested now: False when it was already (the same
    answer again); refused once the withdrawal is broadcast or finished."""
    if state == "CANCELLED" or (cancel_requested and not broadcast_started):
        return False
    if broadcast_started:
        raise FailedPrecondition(
            "FUNDING_WITHDRAWAL_ALREADY_BROADCAST",
            "the withdrawal was handed to custody and can no longer be cancelled",
            metadata={"withdrawal_id": withdrawal_id, "txid": txid},
        )
    if state in TERMINAL_WITHDRAWAL:
        raise FailedPrecondition(
            "FUNDING_WITHDRAWAL_NOT_CANCELLABLE",
            f"the withdrawal is already {state}",
            metadata={"withdrawal_id": withdrawal_id, "state": state},
        )
    return True


# -- approvals -------------------------------------------------------------------
#
# A withdrawal above its asset's threshold waits, after the hold and risk's check
# and before the broadcast, for an operator's review (the `await_approval` step).
# The review is written once on the withdrawal's row, under its lock: APPROVED or
# REJECTED by ApproveWithdrawal / RejectWithdrawal before the deadline, or
# EXPIRED by the saga's guard at its first look after it. A rejection or expiry
# vetoes the step: the hold is voided and the withdrawal ends REJECTED.

APPROVED, REJECTED, EXPIRED = "APPROVED", "REJECTED", "EXPIRED"


def needs_approval(amount: int, threshold: int | None) -> bool:
    """Whether a withdrawal of `amount` (minor units) waits for an operator:
    above its asset's threshold; an asset without one never does."""
    return threshold is not None and amount > threshold


def review_at_look(*, required: bool, review: str, deadline: datetime | None, now: datetime) -> str:
    """The review as the saga finds it, under the withdrawal's row lock, before each
    look of `await_approval`: EXPIRED once the deadline passed without a review
    (the caller records it, so that a late approval is refused)."""
    if required and not review and deadline is not None and now >= deadline:
        return EXPIRED
    return review


def approval_veto(review: str) -> None:
    """Stops the saga at `await_approval` when the operator said no, or too late."""
    if review == REJECTED:
        raise Vetoed(
            error_status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "FUNDING_WITHDRAWAL_REJECTED_BY_OPERATOR",
                "an operator rejected the withdrawal",
            )
        )
    if review == EXPIRED:
        raise Vetoed(
            error_status(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "FUNDING_APPROVAL_EXPIRED",
                "no operator approved the withdrawal before its approval deadline",
            )
        )


def approval_outcome(*, required: bool, review: str, poll_s: float) -> Outcome:
    """The `await_approval` step's look: done when no approval is needed or an
    operator approved; else wait (a review wakes the saga at once)."""
    if not required:
        return Done({"approval": "not required"})
    if review == APPROVED:
        return Done({"approval": "approved"})
    return Wait(poll_s, {"approval": "awaiting"})


def review_withdrawal(
    withdrawal_id: str,
    decision: str,
    *,
    state: str,
    required: bool,
    review: str,
    cancel_requested: bool,
    deadline: datetime | None,
    now: datetime,
) -> bool:
    """Whether an operator's decision is to be recorded now: False when it was
    already taken (the same answer again); refused when the withdrawal needs no
    review, was reviewed otherwise, is past its deadline or no longer waits."""
    if review == decision:
        return False
    meta = {"withdrawal_id": withdrawal_id}
    if not required:
        raise FailedPrecondition(
            "FUNDING_APPROVAL_NOT_REQUIRED",
            "the withdrawal is below its asset's approval threshold",
            metadata=meta,
        )
    if review == EXPIRED or (not review and deadline is not None and now >= deadline):
        raise FailedPrecondition(
            "FUNDING_APPROVAL_EXPIRED",
            "the withdrawal's approval deadline has passed; it is rejected",
            metadata=meta,
        )
    if review:
        raise FailedPrecondition(
            "FUNDING_WITHDRAWAL_ALREADY_REVIEWED",
            f"the withdrawal was already {review.lower()}",
            metadata={**meta, "review": review},
        )
    if cancel_requested or state in TERMINAL_WITHDRAWAL:
        raise FailedPrecondition(
            "FUNDING_WITHDRAWAL_NOT_AWAITING_APPROVAL",
            f"the withdrawal is {'being cancelled' if cancel_requested else state}",
            metadata={**meta, "state": state},
        )
    return True


def reviewer_may_review(reviewer_account: str, owner_account: str) -> None:
    """Four eyes: nobody reviews a withdrawal of their own account."""
    if reviewer_account and reviewer_account == owner_account:
        raise PermissionDenied(
            "FUNDING_SELF_REVIEW", "an operator cannot review their own account's withdrawal"
        )


def require_reason(reason: str) -> str:
    if not reason.strip() or len(reason) > 500:
        raise invalid_field("FUNDING_REASON_INVALID", "reason", "required: 1 to 500 characters")
    return reason


# -- address allowlist -------------------------------------------------------------
#
# When an account's allowlist is on, its withdrawals go only to addresses on it
# whose cooling period has passed. Turning it on and removing an address protect
# and take effect at once; adding an address and turning the allowlist off loosen
# and wait the cooling period, so that a stolen withdraw key cannot add its own
# address (or turn the list off) and withdraw at once: the owner has the cooling
# period to notice (the events) and react.

MAX_LABEL = 64


def parse_withdrawal_address(
    *,
    request_id: str,
    asset_code: str,
    network: str,
    address: str,
    label: str,
    rules: Mapping[str, AssetRules],
) -> AssetRules:
    """An AddWithdrawalAddress request's fields, checked: the asset's rules."""
    check_request_id(request_id)
    rule = rules.get(asset_code)
    if rule is None:
        raise invalid_field(
            "FUNDING_ASSET_UNSUPPORTED", "asset", f"{asset_code!r} cannot be withdrawn"
        )
    problems = Violations()
    if network and network != rule.network:
        problems.add("network", f"{asset_code} moves on {rule.network} only")
    if not rule.address_ok(address):
        problems.add("address", f"not a {rule.network} address")
    if len(label) > MAX_LABEL:
        problems.add("label", f"at most {MAX_LABEL} characters")
    problems.raise_if_any("FUNDING_WITHDRAWAL_ADDRESS_INVALID")
    return rule


def allowlist_on(enabled: bool, disable_time: datetime | None, now: datetime) -> bool:
    """Whether the allowlist applies now (a turn-off applies from disable_time)."""
    return enabled and (disable_time is None or now < disable_time)


def allowlist_change(
    *, enabled: bool, disable_time: datetime | None, want: bool, now: datetime, cooling_s: float
) -> tuple[bool, datetime | None]:
    """(enabled, disable_time) after a SetWithdrawalAllowlist: on at once (cancelling
    a turn-off that waits); off after the cooling period, never sooner than one
    already asked for (asking again does not push it back)."""
    if want:
        return True, None
    if not allowlist_on(enabled, disable_time, now):
        return False, None
    if disable_time is not None:
        return True, disable_time
    return True, shift(now, cooling_s)


def check_destination(
    *, on: bool, usable_time: datetime | None, address: str, asset: str, now: datetime
) -> None:
    """With the allowlist on, a withdrawal goes only to a listed address past its
    cooling period; FAILED_PRECONDITION otherwise, before anything is held."""
    if not on:
        return
    if usable_time is None:
        raise FailedPrecondition(
            "FUNDING_ADDRESS_NOT_ALLOWED",
            f"{address} is not on the account's {asset} withdrawal allowlist",
            metadata={"address": address, "asset": asset},
        )
    if now < usable_time:
        raise FailedPrecondition(
            "FUNDING_ADDRESS_COOLING",
            f"{address} is usable for withdrawals from {usable_time.isoformat()}",
            metadata={"address": address, "asset": asset, "usable_time": usable_time.isoformat()},
        )


# -- idempotency keys of the allowlist and review calls -------------------------------


def request_fingerprint(method: str, *fields: str) -> str:
    return hashlib.sha256("\x1f".join((method, *fields)).encode()).hexdigest()


def same_request(*, stored: tuple[str, str], fingerprint: str, target: str) -> None:
    """A request_id seen before must name the same call (ADR 0003)."""
    stored_fingerprint, stored_target = stored
    if stored_fingerprint != fingerprint:
        raise AlreadyExists(
            "FUNDING_REQUEST_ID_REUSED",
            "request_id was used for a different call",
            metadata={"target": stored_target or target},
        )


# -- deposits -------------------------------------------------------------------

DEPOSIT = "deposit"
CHAIN_BEHIND_CURSOR = "CHAIN_BEHIND_CURSOR"
DEPOSIT_REVERTED_AFTER_CREDIT = "DEPOSIT_REVERTED_AFTER_CREDIT"


def deposit_transfer_id(network: str, txid: str, output_index: int) -> str:
    return f"dep:{network}:{txid}:{output_index}"


def deposit_event(
    *,
    deposit_id: str,
    account_id: str,
    asset: Asset,
    amount: int,
    txid: str,
    output_index: int,
    state: str,
) -> dict[str, Any]:
    """The payload of a funding.deposits.<state> event."""
    return {
        "deposit_id": deposit_id,
        "account_id": account_id,
        "asset": asset.symbol,
        "amount": asset.format(amount),
        "txid": txid,
        "output_index": output_index,
        "state": state,
    }


def deposit_confirmed(
    *,
    txid: str,
    output_index: int,
    reverted: bool,
    confirmations: int,
    required: int,
    poll_s: float,
) -> Outcome:
    """The confirmations step, from the deposit as the chain watcher last saw it."""
    if reverted:
        return Fail(
            error_status(
                grpc.StatusCode.ABORTED,
                "FUNDING_DEPOSIT_REVERTED",
                f"{txid}:{output_index} left the chain before confirmation",
            )
        )
    if confirmations >= required:
        return Done({"confirmations": str(confirmations)})
    return Wait(poll_s)


def deposit_may_credit(*, reverted: bool) -> None:
    """Before the credit starts, under the deposit's row lock: a reverted output is not credited."""
    if reverted:
        raise Vetoed(
            error_status(
                grpc.StatusCode.ABORTED, "FUNDING_DEPOSIT_REVERTED", "reverted before credit"
            )
        )


def deposit_state(change: Change) -> str | None:
    """The deposit's new state after a change of its saga, if it has one."""
    if change.step == "ledger_credit" and change.entry_state == SUCCEEDED:
        return "CREDITED"
    if change.state == COMPENSATED:
        return "CANCELLED"
    return None


def stale_report(
    *, state: str, reverted: bool, known_confirmations: int, status: str, confirmations: int
) -> bool:
    """A chain report about a known output that tells the deposit nothing new (a
    duplicate, or about an output no longer pending): no row lock is needed."""
    if reverted:
        return True
    return status != "reverted" and (confirmations <= known_confirmations or state != "PENDING")


def known_output(
    *,
    state: str,
    reverted: bool,
    known_confirmations: int,
    status: str,
    confirmations: int,
    credit_started: bool,
) -> Literal["revert", "anomaly", "confirm", "nothing"]:
    """What a chain report does to an output already recorded: a revert before its
    credit started cancels it, after that it is an anomaly for an operator; more
    confirmations are recorded."""
    if status == "reverted":
        if state == "PENDING" and not credit_started:
            return "revert"
        return "nothing" if reverted else "anomaly"
    if confirmations > known_confirmations and not reverted:
        return "confirm"
    return "nothing"
