"""Deposits: the chain watcher and the deposit saga.

The watcher reads custody's notification log by cursor. In one transaction per
batch it records each output sent to one of our addresses (unique per
(network, txid, output_index), so a duplicate notification changes nothing),
raises its confirmations, marks it reverted when the chain drops it, starts one
deposit saga per new output, and advances the cursor.

    await_confirmations  until the asset's required confirmations (read from the
                         deposit row); a reverted output fails it: CANCELLED,
                         nothing credited.
    ledger_credit        sys:custody -> the account, transfer id
                         dep:<network>:<txid>:<output_index> (once, forever).
                         Its STARTED row is written under the deposit's row lock
                         after checking it is not reverted; from then on a
                         revert is an anomaly for an operator, not a cancel.

Two things the chain can do are anomalies no saga settles: a revert after the
credit started, and a chain whose notification log ends before the watcher's
cursor (a reorg deeper than anything read, or custody that lost its state;
before issue 18 the simulator did this on every restart and the watcher waited
forever). Each is logged at ERROR, counted in
`funding_chain_anomalies_total{kind}` and recorded in `chain_anomalies` for an
operator. For the second, the watcher then moves its cursor back to the
chain's tip and reads on: what it already recorded is unique per output, so
reading it again changes nothing, and new deposits are seen again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.chassis import Asset, MoneyError, poll_until_cancelled

from . import store
from .config import AssetRules
from .custody import CustodyClient
from .domain import (
    CHAIN_BEHIND_CURSOR,
    CUSTODY_ACCOUNT,
    DEPOSIT,
    DEPOSIT_REVERTED_AFTER_CREDIT,
    Change,
    Done,
    Outcome,
    Retry,
    RetryPolicy,
    SagaRecord,
    Step,
    StepContext,
    call_timeout,
    deposit_confirmed,
    deposit_event,
    deposit_may_credit,
    deposit_state,
    deposit_transfer_id,
    known_output,
    stale_report,
)
from .orchestrator import Connection, Orchestrator, SagaDefinition

__all__ = ["ChainMetrics", "ChainWatcher", "DepositSteps"]

_log = logging.getLogger("cex.funding.deposits")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class DepositSteps:
    pool: asyncpg.Pool
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub
    assets: Mapping[str, Asset]
    step_timeout_s: float
    poll_s: float
    deadline_s: float

    def definition(self) -> SagaDefinition:
        until_deadline = RetryPolicy(initial_s=0.1, max_s=5.0, max_attempts=0)
        return SagaDefinition(
            kind=DEPOSIT,
            deadline_s=self.deadline_s,
            steps=(
                Step(
                    "await_confirmations",
                    self.confirmations,
                    None,
                    until_deadline,
                    timeout_s=self.step_timeout_s,
                    poll=True,
                ),
                Step(
                    "ledger_credit",
                    self.credit,
                    None,
                    until_deadline,
                    timeout_s=self.step_timeout_s,
                    on_exhausted="stuck",
                ),
            ),
            guard=self.guard,
            on_change=self.on_change,
        )

    async def confirmations(self, ctx: StepContext) -> Outcome:
        row = await store.deposit(self.pool, ctx.reference_id)
        assert row is not None
        return deposit_confirmed(
            txid=row.txid,
            output_index=row.output_index,
            reverted=row.reverted,
            confirmations=row.confirmations,
            required=row.required_confirmations,
            poll_s=self.poll_s,
        )

    async def credit(self, ctx: StepContext) -> Outcome:
        d = ctx.data
        (result,) = (
            await self.ledger.CreateTransfers(
                ledger_pb2.CreateTransfersRequest(
                    transfers=[
                        ledger_pb2.Transfer(
                            id=d["transfer_id"],
                            debit_account_id=CUSTODY_ACCOUNT,
                            credit_account_id=d["account_id"],
                            asset=d["asset"],
                            amount=d["amount"],
                            kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                            reference=d["reference"],
                        )
                    ]
                ),
                timeout=call_timeout(self.step_timeout_s),
            )
        ).results
        if result.status.code == 0:
            return Done({"transfer_id": result.id})
        return Retry(result.status)  # a credit is owed: never given up, STUCK at worst

    async def guard(self, conn: Connection, saga: SagaRecord, step: Step) -> None:
        if step.name != "ledger_credit":
            return
        row = await store.deposit(conn, saga.reference_id, lock=True)
        assert row is not None
        deposit_may_credit(reverted=row.reverted)

    async def on_change(self, conn: Connection, change: Change) -> None:
        state = deposit_state(change)
        if state is None:
            return
        row = await store.set_deposit_state(
            conn, change.saga.reference_id, state, change.saga.data.get("transfer_id", "")
        )
        await store.emit(
            conn,
            f"funding.deposits.{state.lower()}",
            deposit_event(
                deposit_id=row.deposit_id,
                account_id=row.account_id,
                asset=self.assets[row.asset],
                amount=row.amount,
                txid=row.txid,
                output_index=row.output_index,
                state=state,
            ),
        )


class ChainMetrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.anomalies = Counter(
            "funding_chain_anomalies_total",
            "What the chain did that needs an operator (table chain_anomalies).",
            ("kind",),
            registry=registry,
        )


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ChainWatcher:
    """Reads custody's notifications by cursor into deposits (and their sagas)."""

    pool: asyncpg.Pool
    custody: CustodyClient
    orchestrator: Orchestrator
    assets: Mapping[str, Asset]
    rules: Mapping[str, AssetRules]
    poll_s: float
    clock: Callable[[], float]
    metrics: ChainMetrics | None = None

    async def run(self) -> None:
        await poll_until_cancelled(
            self.poll_once, self.poll_s, log=_log, failed="reading the chain failed"
        )

    async def poll_once(self) -> int:
        """Reads one batch of notifications; returns how many."""
        cursor = await store.chain_cursor(self.pool)
        batch = await self.custody.events(cursor)
        events = batch.events
        if not events:
            if batch.last_seq is not None and batch.last_seq < cursor:
                await self._chain_behind(cursor, batch.last_seq, batch.height or 0)
            return 0
        started = False
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await store.chain_cursor(conn, lock=True)
            if locked != cursor:
                return 0  # another replica read this batch
            for event in events:
                started |= await self._apply(conn, event)
            await store.move_chain_cursor(conn, int(events[-1]["seq"]))
        if started:
            self.orchestrator.wake()
        return len(events)

    async def _chain_behind(self, cursor: int, chain_seq: int, height: int) -> None:
        """The chain ends before our cursor: report it, then read on from its tip."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await store.chain_cursor(conn, lock=True) != cursor:
                return  # another replica handled it
            await store.record_chain_anomaly(
                conn,
                CHAIN_BEHIND_CURSOR,
                cursor_seq=cursor,
                chain_seq=chain_seq,
                chain_height=height,
                detail=(
                    f"the chain's notifications end at {chain_seq} (height {height}) but "
                    f"{cursor} were read: a reorg deeper than anything read, or custody lost "
                    f"its state; reading on from {chain_seq}"
                ),
            )
            await store.move_chain_cursor(conn, chain_seq)
        self._count(CHAIN_BEHIND_CURSOR)
        _log.error(
            "the chain is behind the deposit watcher's cursor: deep reorg; needs an operator",
            extra={"fields": {"cursor": cursor, "chain_seq": chain_seq, "height": height}},
        )

    def _count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.anomalies.labels(kind).inc()

    async def _apply(self, conn: Connection, event: Mapping[str, Any]) -> bool:
        """Records one chain report; True when it started a deposit saga."""
        if event.get("type") != "deposit":
            return False
        network, txid, index = str(event["network"]), str(event["txid"]), int(event["output_index"])
        owner = await store.address_owner(conn, network, str(event["address"]))
        if owner is None or owner["asset"] != event["asset"]:
            return False
        status = str(event["status"])
        confirmations = int(event["confirmations"])
        seen = await store.deposit_by_output(conn, network, txid, index)
        if seen is not None and stale_report(
            state=seen.state,
            reverted=seen.reverted,
            known_confirmations=seen.confirmations,
            status=status,
            confirmations=confirmations,
        ):
            return False  # no row lock for what the saga no longer needs
        existing = await store.deposit_by_output(conn, network, txid, index, lock=True)
        if existing is not None:
            await self._known(conn, existing, event, status, confirmations)
            return False
        if status == "reverted":
            return False
        return await self._new(conn, event, owner, self.assets[owner["asset"]], confirmations)

    async def _known(
        self,
        conn: Connection,
        deposit: store.DepositRow,
        event: Mapping[str, Any],
        status: str,
        confirmations: int,
    ) -> None:
        started = (
            status == "reverted"
            and deposit.state == "PENDING"
            and await store.credit_started(conn, deposit.saga_id)
        )
        action = known_output(
            state=deposit.state,
            reverted=deposit.reverted,
            known_confirmations=deposit.confirmations,
            status=status,
            confirmations=confirmations,
            credit_started=started,
        )
        if action == "revert":
            await store.deposit_seen(conn, deposit.deposit_id, confirmations=0, reverted=True)
        elif action == "confirm":
            await store.deposit_seen(conn, deposit.deposit_id, confirmations=confirmations)
        elif action == "anomaly":
            await store.record_chain_anomaly(
                conn,
                DEPOSIT_REVERTED_AFTER_CREDIT,
                deposit_id=deposit.deposit_id,
                cursor_seq=int(event["seq"]),
                chain_seq=int(event["seq"]),
                chain_height=int(event.get("height", 0)),
                detail=f"{deposit.txid}:{deposit.output_index} left the chain after its "
                "credit started",
            )
            self._count(DEPOSIT_REVERTED_AFTER_CREDIT)
            _log.error(
                "a deposit left the chain after its credit started: needs an operator",
                extra={"fields": {"deposit_id": deposit.deposit_id}},
            )

    async def _new(
        self,
        conn: Connection,
        event: Mapping[str, Any],
        owner: asyncpg.Record,
        asset: Asset,
        confirmations: int,
    ) -> bool:
        network, txid, index = str(event["network"]), str(event["txid"]), int(event["output_index"])
        try:
            amount = asset.to_minor(str(event["amount"]))
        except MoneyError:
            _log.error("unreadable deposit amount", extra={"fields": {"txid": txid}})
            return False
        if amount <= 0:
            return False
        deposit_id = f"dep_{uuid.uuid4().hex}"
        now = datetime.fromtimestamp(self.clock(), UTC)
        saga_id = await self.orchestrator.create(
            conn,
            DEPOSIT,
            reference_id=deposit_id,
            account_id=owner["account_id"],
            data={
                "deposit_id": deposit_id,
                "account_id": owner["account_id"],
                "asset": asset.symbol,
                "amount": asset.format(amount),
                "transfer_id": deposit_transfer_id(network, txid, index),
                "reference": f"{txid}:{index}",
            },
        )
        row = store.DepositRow(
            deposit_id=deposit_id,
            txid=txid,
            output_index=index,
            account_id=owner["account_id"],
            asset=asset.symbol,
            network=network,
            amount=amount,
            address=str(event["address"]),
            memo="",
            confirmations=confirmations,
            required_confirmations=self.rules[asset.symbol].deposit_confirmations,
            state="PENDING",
            reverted=False,
            ledger_transfer_id="",
            saga_id=saga_id,
            detect_time=now,
            credit_time=None,
            update_time=now,
        )
        await store.insert_deposit(conn, row)
        await store.emit(
            conn,
            "funding.deposits.pending",
            deposit_event(
                deposit_id=deposit_id,
                account_id=row.account_id,
                asset=asset,
                amount=amount,
                txid=txid,
                output_index=index,
                state="PENDING",
            ),
        )
        return True
