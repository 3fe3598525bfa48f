"""Withdrawals: the withdrawal saga's steps and what they do to the withdrawal's row.

    ledger_hold         pending transfer user -> sys:custody of amount + fee
                        (id wd:<id>:hold, kind WITHDRAWAL; the ledger refuses it
                        while its auditor has halted withdrawals).
                        Compensation: void it (wd:<id>:void), after pinning
                        its fate if the hold's own answer was lost.
    risk_check          risk.CheckWithdrawal (limits, velocity, kill switch,
                        auditor halt). A denial, or a risk service that does not
                        implement the check, is a refusal: the hold is voided.
    await_approval      above the asset's threshold (decided at the request):
                        waits for an operator's ApproveWithdrawal, read from the
                        withdrawal's row (a poll: read-only, no STARTED row). Its
                        guard, under the row lock, vetoes a rejection, and at the
                        deadline records EXPIRED and vetoes: the hold is voided.
                        Below the threshold it is done at once.
    (any of the above)  a frozen account (auth SUSPENDED or CLOSED, from the
                        chassis' copy: account_states.py) is vetoed by the
                        guard before each step up to the broadcast's first
                        start (FUNDING_ACCOUNT_SUSPENDED / _CLOSED): the hold
                        is voided and the withdrawal ends REJECTED. Before
                        the broadcast the copy must be fresh (auth answered
                        within account_state_max_age_s, else it is reloaded,
                        and the step waits while auth cannot answer).
    custody_broadcast   custody broadcast, idempotent by withdrawal id. Its
                        STARTED row is written together with `broadcast_started`
                        (under the withdrawal's row lock), after which the owner
                        can no longer cancel. Only a definite refusal fails it;
                        an unknown outcome is retried with the same id and, past
                        the deadline, parks the saga as STUCK: never voided.
    await_confirmations until the required confirmations; a dropped transaction
                        fails it (the funds never left: the hold is voided).
    ledger_post         post the hold and move the fee sys:custody -> sys:fees in
                        one linked chain. Never fails: retried until done or STUCK.

The hold comes before the risk check so that funds are reserved before anything
else looks at the withdrawal: of concurrent withdrawals of one balance only
those the ledger could hold reach risk (and its velocity counters).

What a request may be, and what each change of the saga means for the
withdrawal (its state, a veto by the owner's cancel), are domain.py's rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import grpc
from google.rpc import status_pb2

from cex.auth.v1 import auth_pb2
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import AccountStates, Asset

from . import store
from .custody import CustodyClient, CustodyRejected
from .domain import (
    APPROVAL_STEP,
    CUSTODY_ACCOUNT,
    FAILED,
    FEE_ACCOUNT,
    SUCCEEDED,
    WITHDRAWAL,
    Change,
    Done,
    Fail,
    Outcome,
    Retry,
    RetryPolicy,
    SagaRecord,
    Step,
    StepContext,
    Wait,
    approval_outcome,
    approval_veto,
    call_timeout,
    error_status,
    frozen_account_veto,
    guards_withdrawal,
    review_at_look,
    status_reason,
    withdrawal_event,
    withdrawal_ids,
    withdrawal_state,
    withdrawal_step_may_start,
)
from .orchestrator import Connection, SagaDefinition, rpc_status

__all__ = ["BEFORE_BROADCAST_RETRY", "WithdrawalSteps"]

_log = logging.getLogger("cex.funding.withdrawals")


_TRANSIENT_LEDGER = {"LEDGER_LINKED_EVENT_FAILED", "LEDGER_UNAVAILABLE"}
_FROZEN_STATE_NAMES: dict[int, str] = {
    auth_pb2.ACCOUNT_STATE_SUSPENDED: "SUSPENDED",
    auth_pb2.ACCOUNT_STATE_CLOSED: "CLOSED",
}


# The steps before the broadcast retry a transient failure (a dependency
# restarting: UNAVAILABLE from it or from the mesh, a timeout) for 33-66 s of
# backoff (0.05 s doubling to 5 s, 20 attempts), then give up: the hold is voided
# and the withdrawal ends REJECTED. A restart of the ledger, the writer or risk
# takes seconds, and must not refuse a withdrawal; an outage longer than this does.
BEFORE_BROADCAST_RETRY = RetryPolicy(max_s=5.0, max_attempts=20)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class WithdrawalSteps:
    """The withdrawal saga's actions, with the clients they need."""

    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub
    risk: risk_pb2_grpc.RiskServiceAsyncStub
    custody: CustodyClient
    assets: Mapping[str, Asset]
    step_timeout_s: float
    confirmation_poll_s: float
    deadline_s: float
    compensation_window_s: float
    pool: asyncpg.Pool
    approval_poll_s: float = 5.0
    clock: Callable[[], float] = time.time
    account_states: AccountStates | None = None  # auth's frozen accounts (chassis copy)
    account_state_max_age_s: float = 10.0

    def definition(self) -> SagaDefinition:
        until_deadline = RetryPolicy(initial_s=0.1, max_s=5.0, max_attempts=0)
        t = self.step_timeout_s
        return SagaDefinition(
            kind=WITHDRAWAL,
            deadline_s=self.deadline_s,
            compensation_window_s=self.compensation_window_s,
            steps=(
                Step("ledger_hold", self.hold, self.void, BEFORE_BROADCAST_RETRY, timeout_s=t),
                Step("risk_check", self.risk_check, None, BEFORE_BROADCAST_RETRY, timeout_s=t),
                Step(
                    APPROVAL_STEP,
                    self.approval,
                    None,
                    BEFORE_BROADCAST_RETRY,
                    timeout_s=t,
                    poll=True,
                ),
                Step(
                    "custody_broadcast",
                    self.broadcast,
                    None,
                    until_deadline,
                    timeout_s=t,
                    on_exhausted="stuck",
                ),
                Step(
                    "await_confirmations",
                    self.confirmations,
                    None,
                    until_deadline,
                    timeout_s=t,
                    on_exhausted="stuck",
                    poll=True,
                ),
                Step(
                    "ledger_post",
                    self.post,
                    None,
                    until_deadline,
                    timeout_s=t,
                    on_exhausted="stuck",
                ),
            ),
            guard=self.guard,
            on_change=self.on_change,
        )

    # -- actions ---------------------------------------------------------------

    def _hold(self, data: Mapping[str, str]) -> ledger_pb2.Transfer:
        wid = data["withdrawal_id"]
        return ledger_pb2.Transfer(
            id=withdrawal_ids(wid)["hold"],
            debit_account_id=data["account_id"],
            credit_account_id=CUSTODY_ACCOUNT,
            asset=data["asset"],
            amount=data["total"],
            kind=ledger_pb2.TRANSFER_KIND_WITHDRAWAL,
            reference=wid,
            flags=ledger_pb2.TransferFlags(pending=True),
        )

    async def _create(
        self, *transfers: ledger_pb2.Transfer
    ) -> list[ledger_pb2.CreateTransferResult]:
        reply = await self.ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(transfers=list(transfers)),
            timeout=call_timeout(self.step_timeout_s),
        )
        return list(reply.results)

    async def hold(self, ctx: StepContext) -> Outcome:
        (result,) = await self._create(self._hold(ctx.data))
        if result.status.code == 0:
            return Done({"hold_id": result.id})
        if status_reason(result.status) in _TRANSIENT_LEDGER:
            return Retry(result.status)
        # Insufficient funds, halted, unknown account...: remembered by the ledger
        # for this id, so the hold can never appear later.
        return Fail(result.status)

    async def void(self, ctx: StepContext) -> Outcome:
        ids = withdrawal_ids(ctx.data["withdrawal_id"])
        found = True
        try:
            await self.ledger.GetTransfer(
                ledger_pb2.GetTransferRequest(id=ids["hold"]),
                timeout=call_timeout(self.step_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            found = False
        if not found:
            # The hold's answer was lost, or it failed: send it again (same id, same
            # fields) so that its fate is fixed before deciding there is nothing to void.
            (pinned,) = await self._create(self._hold(ctx.data))
            if pinned.status.code != 0:
                reason = status_reason(pinned.status)
                if reason in _TRANSIENT_LEDGER:
                    return Retry(pinned.status)
                return Done({"void": "nothing held", "hold_failure": reason})
        void = ledger_pb2.Transfer(
            id=ids["void"],
            pending_id=ids["hold"],
            reference=ctx.data["withdrawal_id"],
            flags=ledger_pb2.TransferFlags(void_pending=True),
        )
        (result,) = await self._create(void)
        if result.status.code == 0:
            return Done({"void_id": result.id})
        reason = status_reason(result.status)
        if reason == "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED":
            return Done({"void": "already voided"})
        if reason in _TRANSIENT_LEDGER:
            return Retry(result.status)
        # Already posted or expired: money moved in a way this saga did not expect.
        return Fail(result.status)

    async def risk_check(self, ctx: StepContext) -> Outcome:
        d = ctx.data
        try:
            reply = await self.risk.CheckWithdrawal(
                risk_pb2.CheckWithdrawalRequest(
                    withdrawal_id=d["withdrawal_id"],
                    account_id=d["account_id"],
                    asset=d["asset"],
                    amount=d["total"],
                    network=d["network"],
                    address=d["address"],
                ),
                timeout=call_timeout(self.step_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (
                grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ):
                # No approval is not an approval.
                return Fail(rpc_status(error, "risk"))
            raise
        if reply.allowed:
            return Done({"risk": "allowed"})
        denial = reply.denial
        if denial.code == 0:
            denial = error_status(
                grpc.StatusCode.FAILED_PRECONDITION, "RISK_WITHDRAWAL_DENIED", "denied", "risk"
            )
        return Fail(denial)

    async def approval(self, ctx: StepContext) -> Outcome:
        if ctx.data.get("approval_required") != "true":
            return approval_outcome(required=False, review="", poll_s=self.approval_poll_s)
        row = await store.withdrawal(self.pool, ctx.reference_id)
        assert row is not None
        return approval_outcome(required=True, review=row.review, poll_s=self.approval_poll_s)

    async def broadcast(self, ctx: StepContext) -> Outcome:
        d = ctx.data
        try:
            sent = await self.custody.broadcast(
                d["withdrawal_id"],
                asset=d["asset"],
                network=d["network"],
                address=d["address"],
                amount=d["amount"],
                timeout_s=call_timeout(self.step_timeout_s),
            )
        except CustodyRejected as refused:
            return Fail(
                error_status(
                    grpc.StatusCode.FAILED_PRECONDITION, "FUNDING_CUSTODY_REJECTED", str(refused)
                )
            )
        except grpc.aio.AioRpcError as error:
            # Unknown outcome: it may have gone out. Retry with the same id.
            return Retry(rpc_status(error, "funding"))
        return Done({"txid": sent.txid})

    async def confirmations(self, ctx: StepContext) -> Outcome:
        d = ctx.data
        tx = await self.custody.withdrawal_status(d["withdrawal_id"])
        required = int(d["required_confirmations"])
        if tx.status == "dropped":
            return Fail(
                error_status(
                    grpc.StatusCode.ABORTED,
                    "FUNDING_TRANSACTION_DROPPED",
                    f"transaction {tx.txid} was dropped before confirmation",
                )
            )
        if tx.status == "unknown":
            return Retry(
                error_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "FUNDING_CUSTODY_UNKNOWN_WITHDRAWAL",
                    "custody does not know this withdrawal (yet)",
                )
            )
        if tx.status == "confirmed" and tx.confirmations >= required:
            return Done({"confirmations": str(tx.confirmations)})
        return Wait(self.confirmation_poll_s, {"confirmations": str(tx.confirmations)})

    async def post(self, ctx: StepContext) -> Outcome:
        d = ctx.data
        ids = withdrawal_ids(d["withdrawal_id"])
        fee = d["fee"]
        chain = [
            ledger_pb2.Transfer(
                id=ids["post"],
                pending_id=ids["hold"],
                reference=d["withdrawal_id"],
                flags=ledger_pb2.TransferFlags(post_pending=True, linked=fee != "0"),
            )
        ]
        if fee != "0":
            chain.append(
                ledger_pb2.Transfer(
                    id=ids["fee"],
                    debit_account_id=CUSTODY_ACCOUNT,
                    credit_account_id=FEE_ACCOUNT,
                    asset=d["asset"],
                    amount=fee,
                    kind=ledger_pb2.TRANSFER_KIND_FEE,
                    reference=d["withdrawal_id"],
                )
            )
        results = await self._create(*chain)
        bad = [r.status for r in results if r.status.code != 0]
        if not bad:
            return Done({"post_id": ids["post"]})
        # Never a Fail: after a broadcast the hold must be posted, not voided.
        _log.error(
            "posting a withdrawal hold failed",
            extra={
                "fields": {"withdrawal_id": d["withdrawal_id"], "reason": status_reason(bad[0])}
            },
        )
        return Retry(bad[0])

    # -- the domain's side of the saga -----------------------------------------------

    async def guard(self, conn: Connection, saga: SagaRecord, step: Step) -> None:
        """Before each guarded forward step, under the withdrawal's row lock."""
        if not guards_withdrawal(step.name):
            return
        row = await store.withdrawal(conn, saga.reference_id, lock=True)
        assert row is not None
        starts_broadcast = withdrawal_step_may_start(
            step.name,
            cancel_requested=row.cancel_requested,
            broadcast_started=row.broadcast_started,
        )
        if self.account_states is not None and not row.broadcast_started:
            if starts_broadcast:  # not on a copy older than this (a missed push)
                await self.account_states.fresh(self.account_state_max_age_s)
            frozen = self.account_states.frozen(row.account_id)
            frozen_account_veto(
                step.name,
                _FROZEN_STATE_NAMES.get(frozen.state, "") if frozen else "",
                broadcast_started=row.broadcast_started,
            )
        if starts_broadcast:
            await store.flag_withdrawal(conn, row.withdrawal_id, broadcast_started=True)
        if step.name == APPROVAL_STEP and row.approval_required:
            now = datetime.fromtimestamp(self.clock(), UTC)
            review = review_at_look(
                required=True, review=row.review, deadline=row.approval_deadline, now=now
            )
            if review != row.review:  # committed with the veto: a late approval is refused
                await store.review_withdrawal(
                    conn, row.withdrawal_id, review, by="funding", reason="deadline", now=now
                )
            approval_veto(review)

    async def on_change(self, conn: Connection, change: Change) -> None:
        wid = change.saga.reference_id
        failed = change.entry_state == FAILED and not change.compensation
        broadcast = change.step == "custody_broadcast" and change.entry_state == SUCCEEDED
        seen = change.outputs.get("confirmations")
        if failed or broadcast or seen is not None:
            await store.note_withdrawal(
                conn,
                wid,
                failure=(change.error or status_pb2.Status()).SerializeToString()
                if failed
                else None,
                txid=change.outputs.get("txid", "") if broadcast else None,
                confirmations=int(seen) if seen is not None else None,
            )
        state = withdrawal_state(change)
        if state is None:
            return
        row = await store.set_withdrawal_state(conn, wid, state)
        if row is None:
            return  # no news (e.g. another look while awaiting approval)
        await store.emit(
            conn,
            f"funding.withdrawals.{state.lower()}",
            withdrawal_event(
                withdrawal_id=wid,
                account_id=row.account_id,
                asset=self.assets[row.asset],
                amount=row.amount,
                fee=row.fee,
                state=state,
                txid=row.txid,
                saga_id=change.saga.saga_id,
            ),
        )
