"""A generic saga orchestrator: named steps, compensations, retries, leases.

A saga is a named sequence of `Step`s. Each step has an action, an optional
compensation, a retry policy (exponential backoff with jitter, bounded) and a
timeout. The orchestrator commits the saga's state and every step's outcome in
PostgreSQL before the next step starts:

    STARTED (own transaction, before the side effect)
      -> the action (idempotency key saga_id:step; timeout)
      -> SUCCEEDED / RETRYING / FAILED (own transaction, with the domain's rows
         and outbox events through `SagaDefinition.on_change`)

`decide` is the state machine: pure, no I/O, no clock (unit-tested on its own).
`Orchestrator` runs it: it claims due sagas with a row lease (FOR UPDATE SKIP
LOCKED, lease owner and epoch), so several replicas never run one saga at the
same time, and every write is fenced by the epoch it claimed with. After a
crash, another replica takes the saga when the lease expires; the same
instance (same FUNDING_INSTANCE) takes its own sagas back at once.

What an action returns:
- `Done(outputs)`: the step is done; outputs are merged into the saga's data.
- `Wait(after_s, outputs)`: not done yet, nothing failed (e.g. confirmations);
  asked again later, without using up attempts (bounded by the deadline).
- `Retry(error)`: failed transiently (the effect may or may not have happened);
  retried with the same idempotency key after a backoff.
- `Fail(error)`: failed for good and had no effect; the saga compensates.
An exception is a `Retry`. When retries run out, a step whose outcome may be
uncertain and must not be undone blindly (`on_exhausted="stuck"`) parks the
saga as STUCK for an operator; otherwise the saga compensates, starting with
the exhausted step itself (compensations tolerate "never happened").

Compensations run in reverse order and are retried until done; a compensation
that fails for good, or a saga past its deadline, becomes STUCK (metric
`funding_sagas_stuck_total`), visible with its step log in ListSagas/GetSaga.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from services.chassis import ExchangeError
from services.chassis.tracing import Context, carrier, context_of, tracer

__all__ = [
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "RUNNING",
    "STUCK",
    "Change",
    "Decision",
    "Done",
    "Fail",
    "LogEntry",
    "Orchestrator",
    "Outcome",
    "Progress",
    "Retry",
    "RetryPolicy",
    "SagaDefinition",
    "SagaRecord",
    "Step",
    "StepContext",
    "Wait",
    "decide",
    "error_status",
]

_log = logging.getLogger("cex.funding.saga")
_CLAIM_BACKOFF_MAX_S = 5.0  # the longest wait between claims while PostgreSQL fails
_tracer = tracer("cex.funding.saga")
_OBSERVE_EVERY_S = 5.0  # funding_saga_oldest_age_seconds refresh

RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK = (
    "RUNNING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "STUCK",
)
OPEN_STATES = (RUNNING, COMPENSATING)
STARTED, SUCCEEDED, RETRYING, FAILED = "STARTED", "SUCCEEDED", "RETRYING", "FAILED"

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


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


def rpc_status(error: grpc.aio.AioRpcError, component: str) -> status_pb2.Status:
    """The rich status a failed call carried, or one built from its code."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    code = error.code()
    return error_status(
        code, f"{component.upper()}_{code.name}", error.details() or code.name, component
    )


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


# -- persistence-facing types -----------------------------------------------


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

    @classmethod
    def of(cls, row: asyncpg.Record) -> SagaRecord:
        return cls(
            saga_id=row["saga_id"],
            kind=row["kind"],
            reference_id=row["reference_id"],
            account_id=row["account_id"],
            state=row["state"],
            step_index=row["step_index"],
            attempt=row["attempt"],
            data=json.loads(row["data"]),
            deadline=row["deadline"],
            epoch=row["lease_epoch"],
            failure=row["failure"],
            trace_context=json.loads(row["trace_context"]) if row["trace_context"] else None,
        )


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


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    kind: str
    steps: Sequence[Step]
    deadline_s: float
    # Extra time compensations get once a saga starts compensating.
    compensation_window_s: float = 600.0
    # Runs inside the STARTED transaction of each forward step; raise Vetoed to
    # stop the saga (it compensates what ran before).
    guard: Callable[[Connection, SagaRecord, Step], Awaitable[None]] | None = None
    on_change: Callable[[Connection, Change], Awaitable[None]] | None = None

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


class SagaMetrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.finished = Counter(
            "funding_sagas_finished_total",
            "Sagas reaching a terminal state.",
            ("kind", "state"),
            registry=registry,
        )
        self.stuck = Counter(
            "funding_sagas_stuck_total",
            "Sagas marked for manual attention.",
            ("kind",),
            registry=registry,
        )
        self.step_seconds = Histogram(
            "funding_saga_step_seconds",
            "Time of one step attempt.",
            ("kind", "step"),
            registry=registry,
        )
        self.running = Gauge(
            "funding_sagas_in_flight", "Sagas this replica is driving now.", registry=registry
        )
        self.oldest_age = Gauge(
            "funding_saga_oldest_age_seconds",
            "Age of the oldest unfinished (running or compensating) saga; 0 when none.",
            ("kind",),
            registry=registry,
        )


# -- the runner ---------------------------------------------------------------


def _now(clock: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


def _shift(moment: datetime, seconds: float) -> datetime:
    return datetime.fromtimestamp(moment.timestamp() + seconds, UTC)


class LeaseLost(Exception):
    """Another replica owns the saga now: stop touching it."""


class Orchestrator:
    def __init__(
        self,
        pool: asyncpg.Pool,
        definitions: Sequence[SagaDefinition],
        *,
        owner: str,
        metrics: SagaMetrics,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        concurrency: int = 32,
        lease_s: float = 15.0,
        poll_s: float = 0.2,
        crash_points: frozenset[str] = frozenset(),
    ) -> None:
        self._pool = pool
        self._crash_points = crash_points
        self._definitions = {d.kind: d for d in definitions}
        self._owner = owner
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._waiting = 0  # active sagas sleeping through a short wait
        self._changed: dict[str, asyncio.Event] = {}

    # -- starting sagas (inside the caller's transaction) ---------------------

    async def create(
        self,
        conn: Connection,
        kind: str,
        *,
        reference_id: str,
        account_id: str,
        data: Mapping[str, Any],
        saga_id: str | None = None,
    ) -> str:
        definition = self._definitions[kind]
        saga_id = saga_id or f"saga_{uuid.uuid4().hex}"
        now = _now(self._clock)
        # A span for the saga's start (the request's child, or a trace's root for a
        # deposit the chain reported); its context is stored for the steps.
        with _tracer.start_as_current_span(
            f"saga {kind} start", attributes={"cex.saga_id": saga_id}
        ):
            trace_context = carrier()
        await conn.execute(
            """INSERT INTO sagas (saga_id, kind, reference_id, account_id, state, step_index,
                   attempt, current_step, data, deadline, next_run_at, create_time, update_time,
                   trace_context)
               VALUES ($1, $2, $3, $4, 'RUNNING', 0, 0, $5, $6, $7, $8, $8, $8, $9)""",
            saga_id,
            kind,
            reference_id,
            account_id,
            definition.steps[0].name,
            json.dumps(dict(data)),
            _shift(now, definition.deadline_s),
            now,
            json.dumps(trace_context) if trace_context else None,
        )
        return saga_id

    def wake(self) -> None:
        self._wake.set()

    def _crash_point(self, moment: str, step: Step, compensating: bool) -> None:
        """Fault injection for the crash tests: SIGKILL this process at a step boundary
        (`started:`, `acted:` or `committed:` + step name, `~` before a compensation)."""
        if self._crash_points and (
            f"{moment}:{'~' if compensating else ''}{step.name}" in self._crash_points
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    async def nudge(self, conn: Connection, saga_id: str) -> None:
        """Run the saga now (e.g. after a cancel), instead of at its next retry."""
        await conn.execute(
            "UPDATE sagas SET next_run_at = $2 WHERE saga_id = $1 AND state = ANY($3)",
            saga_id,
            _now(self._clock),
            list(OPEN_STATES),
        )

    async def wait_changed(self, saga_id: str, timeout_s: float) -> None:
        event = self._changed.setdefault(saga_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def _signal(self, saga_id: str) -> None:
        event = self._changed.pop(saga_id, None)
        if event is not None:
            event.set()

    # -- the loop ---------------------------------------------------------------

    async def observe_oldest(self) -> None:
        """Set funding_saga_oldest_age_seconds per kind from the committed sagas."""
        now = _now(self._clock)
        rows = await self._pool.fetch(
            """SELECT kind, min(create_time) AS oldest FROM sagas
               WHERE state IN ('RUNNING', 'COMPENSATING') GROUP BY kind"""
        )
        oldest = {row["kind"]: row["oldest"] for row in rows}
        for kind in self._definitions:
            since = oldest.get(kind)
            age = 0.0 if since is None else max((now - since).total_seconds(), 0.0)
            self._metrics.oldest_age.labels(kind).set(age)

    async def run(self) -> None:
        failures = 0  # in a row: PostgreSQL away is logged once, then retried with backoff
        observed = 0.0
        while True:
            if time.monotonic() - observed >= _OBSERVE_EVERY_S:
                observed = time.monotonic()
                try:
                    await self.observe_oldest()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.warning("observing the oldest saga failed", exc_info=True)
            try:
                claimed = await self._claim()
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                if failures == 1:
                    _log.exception("claiming sagas failed; retrying with backoff")
                await asyncio.sleep(min(self._poll_s * 2**failures, _CLAIM_BACKOFF_MAX_S))
                continue
            if failures:
                _log.warning("claiming sagas works again after %d failures", failures)
                failures = 0
            for record in claimed:
                task = asyncio.ensure_future(self._drive(record))
                self._active[record.saga_id] = task
                task.add_done_callback(self._done_callback(record.saga_id))
            self._metrics.running.set(len(self._active))
            if len(claimed) and len(self._active) - self._waiting < self._concurrency:
                continue  # there may be more due right now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    def _done_callback(self, saga_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._active.pop(saga_id, None)
            self._wake.set()

        return done

    async def close(self) -> None:
        tasks = list(self._active.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _claim(self) -> list[SagaRecord]:
        free = self._concurrency - (len(self._active) - self._waiting)
        if free <= 0:
            return []
        now = _now(self._clock)
        rows = await self._pool.fetch(
            """UPDATE sagas s SET lease_owner = $1, lease_until = $2,
                      lease_epoch = s.lease_epoch + 1
               FROM (SELECT saga_id FROM sagas
                     WHERE state IN ('RUNNING', 'COMPENSATING') AND next_run_at <= $3
                       AND (lease_until IS NULL OR lease_until < $3 OR lease_owner = $1)
                       AND NOT (saga_id = ANY($4::text[]))
                     ORDER BY next_run_at LIMIT $5
                     FOR UPDATE SKIP LOCKED) due
               WHERE s.saga_id = due.saga_id
               RETURNING s.*""",
            self._owner,
            _shift(now, self._lease_s),
            now,
            list(self._active),
            free,
        )
        return [SagaRecord.of(row) for row in rows]

    async def _locked(self, conn: Connection, saga: SagaRecord) -> SagaRecord:
        row = await conn.fetchrow("SELECT * FROM sagas WHERE saga_id = $1 FOR UPDATE", saga.saga_id)
        if row is None or row["lease_epoch"] != saga.epoch or row["lease_owner"] != self._owner:
            raise LeaseLost(saga.saga_id)
        return SagaRecord.of(row)

    async def _append(self, conn: Connection, saga_id: str, entry: LogEntry, now: datetime) -> None:
        await conn.execute(
            """WITH n AS (UPDATE sagas SET log_count = log_count + 1 WHERE saga_id = $1
                          RETURNING log_count)
               INSERT INTO saga_steps (saga_id, idx, name, compensation, state, attempt, error,
                                       outputs, record_time)
               SELECT $1, n.log_count, $2, $3, $4, $5, $6, $7, $8 FROM n""",
            saga_id,
            entry.name,
            entry.compensation,
            entry.state,
            entry.attempt,
            entry.error.SerializeToString() if entry.error is not None else None,
            json.dumps(dict(entry.outputs)),
            now,
        )

    async def _drive(self, saga: SagaRecord) -> None:
        definition = self._definitions[saga.kind]
        try:
            while saga.state in OPEN_STATES:
                saga, delay = await self._step(definition, saga)
                if saga.state not in OPEN_STATES:
                    break
                if delay > 2 * self._poll_s:
                    await self._release(saga)
                    return
                # A short wait keeps the lease but not the slot: new sagas may start.
                self._waiting += 1
                self._wake.set()
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._waiting -= 1
        except LeaseLost:
            _log.warning("lease lost", extra={"fields": {"saga_id": saga.saga_id}})
        except asyncio.CancelledError:
            raise
        except Exception:
            # Bookkeeping failed (e.g. the database is away): leave the saga as it
            # is committed; it is claimed again when its lease runs out.
            _log.exception(
                "saga step bookkeeping failed", extra={"fields": {"saga_id": saga.saga_id}}
            )
            await asyncio.sleep(self._poll_s)
        finally:
            self._signal(saga.saga_id)

    async def _release(self, saga: SagaRecord) -> None:
        await self._pool.execute(
            """UPDATE sagas SET lease_until = NULL
               WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3""",
            saga.saga_id,
            saga.epoch,
            self._owner,
        )

    async def _step(self, definition: SagaDefinition, saga: SagaRecord) -> tuple[SagaRecord, float]:
        """One attempt of the current step or compensation, as a span of the saga's
        trace (its calls to other services are its children); returns the delay."""
        compensating = saga.state == COMPENSATING
        step = definition.steps[saga.step_index]
        with _tracer.start_as_current_span(
            f"saga {saga.kind} {'undo ' if compensating else ''}{step.name}",
            context=context_of(saga.trace_context) or Context(),
            attributes={
                "cex.saga_id": saga.saga_id,
                "cex.saga.step": step.name,
                "cex.saga.attempt": saga.attempt + 1,
                "cex.saga.compensating": compensating,
            },
        ) as span:
            updated, delay = await self._attempt_step(definition, saga)
            span.set_attribute("cex.saga.state", updated.state)
            return updated, delay

    async def _attempt_step(
        self, definition: SagaDefinition, saga: SagaRecord
    ) -> tuple[SagaRecord, float]:
        steps = definition.steps
        compensating = saga.state == COMPENSATING
        step = steps[saga.step_index]
        now = _now(self._clock)
        vetoed: Vetoed | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked(conn, saga)
            if not compensating and definition.guard is not None:
                try:
                    await definition.guard(conn, current, step)
                except Vetoed as veto:
                    vetoed = veto
            if vetoed is None and not step.poll:
                await self._append(
                    conn,
                    saga.saga_id,
                    LogEntry(step.name, compensating, STARTED, saga.attempt + 1),
                    now,
                )
                await conn.execute(
                    """UPDATE sagas SET current_step = $2, lease_until = $3, update_time = $4
                       WHERE saga_id = $1""",
                    saga.saga_id,
                    step.name,
                    _shift(now, self._lease_s),
                    now,
                )
                if definition.on_change is not None:
                    await definition.on_change(
                        conn,
                        Change(
                            current, step.name, compensating, STARTED, current.state, {}, None, None
                        ),
                    )
        if vetoed is None:
            self._crash_point("started", step, compensating)
        outcome: Outcome
        if vetoed is not None:
            outcome = Fail(vetoed.error)
        else:
            ctx = StepContext(
                saga.saga_id,
                saga.reference_id,
                saga.account_id,
                step.name,
                saga.attempt + 1,
                saga.data,
            )
            action = step.compensation if compensating else step.action
            assert action is not None
            began = time.perf_counter()
            outcome = await self._attempt(action, ctx, step.timeout_s)
            self._metrics.step_seconds.labels(saga.kind, step.name).observe(
                time.perf_counter() - began
            )
            self._crash_point("acted", step, compensating)
        now = _now(self._clock)
        decision = decide(
            steps,
            Progress(saga.state, saga.step_index, saga.attempt),
            outcome,
            past_deadline=now >= saga.deadline,
            rng=self._rng,
        )
        unchanged = (
            decision.entry is None
            and decision.progress == Progress(saga.state, saga.step_index, saga.attempt)
            and all(saga.data.get(k) == v for k, v in decision.outputs.items())
            and decision.delay_s <= 2 * self._poll_s
        )
        if unchanged:  # a poll that learnt nothing new: nothing to commit
            return saga, decision.delay_s
        updated = await self._commit(definition, saga, step, compensating, decision, now)
        self._crash_point("committed", step, compensating)
        return updated, decision.delay_s

    async def _attempt(self, action: Action, ctx: StepContext, timeout_s: float) -> Outcome:
        try:
            return await asyncio.wait_for(action(ctx), timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return Retry(
                error_status(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "FUNDING_STEP_TIMEOUT",
                    f"step {ctx.step} took longer than {timeout_s}s",
                )
            )
        except grpc.aio.AioRpcError as error:
            return Retry(rpc_status(error, "funding"))
        except Exception as error:  # an unknown outcome is never a definite failure
            _log.exception(
                "step raised", extra={"fields": {"saga_id": ctx.saga_id, "step": ctx.step}}
            )
            return Retry(
                error_status(grpc.StatusCode.UNKNOWN, "FUNDING_STEP_ERROR", repr(error)[:500])
            )

    async def _commit(
        self,
        definition: SagaDefinition,
        saga: SagaRecord,
        step: Step,
        compensating: bool,
        decision: Decision,
        now: datetime,
    ) -> SagaRecord:
        p = decision.progress
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked(conn, saga)
            if decision.entry is not None:
                await self._append(conn, saga.saga_id, decision.entry, now)
            data = {**current.data, **decision.outputs}
            if decision.failure is not None:
                data["failed_step"] = step.name
            deadline = current.deadline
            if p.state == COMPENSATING and current.state == RUNNING:
                deadline = max(deadline, _shift(now, definition.compensation_window_s))
            failure = (
                decision.failure.SerializeToString()
                if decision.failure is not None
                else current.failure
            )
            current_step = (
                definition.steps[p.step].name if 0 <= p.step < len(definition.steps) else step.name
            )
            await conn.execute(
                """UPDATE sagas SET state = $2, step_index = $3, attempt = $4, data = $5,
                          deadline = $6, failure = $7, current_step = $8, next_run_at = $9,
                          lease_until = $10, update_time = $11
                   WHERE saga_id = $1""",
                saga.saga_id,
                p.state,
                p.step,
                p.attempt,
                json.dumps(data),
                deadline,
                failure,
                current_step,
                _shift(now, decision.delay_s),
                _shift(now, self._lease_s),
                now,
            )
            updated = replace(
                current,
                state=p.state,
                step_index=p.step,
                attempt=p.attempt,
                data=data,
                failure=failure,
                deadline=deadline,
            )
            if definition.on_change is not None:
                await definition.on_change(
                    conn,
                    Change(
                        updated,
                        step.name,
                        compensating,
                        decision.entry.state if decision.entry is not None else "",
                        p.state,
                        decision.outputs,
                        decision.entry.error if decision.entry is not None else None,
                        status_pb2.Status.FromString(failure) if failure else None,
                    ),
                )
        if p.state not in OPEN_STATES:
            self._metrics.finished.labels(saga.kind, p.state).inc()
            if p.state == STUCK:
                self._metrics.stuck.labels(saga.kind).inc()
                _log.error(
                    "saga stuck: needs an operator",
                    extra={"fields": {"saga_id": saga.saga_id, "step": step.name}},
                )
        return updated
