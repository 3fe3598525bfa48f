"""The saga orchestrator: runs funding's saga state machine against PostgreSQL.

A saga is a named sequence of `Step`s (domain.py: the steps, their outcomes and
`decide`, the state machine, pure and unit-tested on its own). Each step has an
action, an optional compensation, a retry policy and a timeout. This module
commits the saga's state and every step's outcome (store.py) before the next
step starts:

    STARTED (own transaction, before the side effect)
      -> the action (idempotency key saga_id:step; timeout)
      -> SUCCEEDED / RETRYING / FAILED (own transaction, with the domain's rows
         and outbox events through `SagaDefinition.on_change`)

`Orchestrator` claims due sagas with a row lease (FOR UPDATE SKIP LOCKED, lease
owner and epoch), so several replicas never run one saga at the same time, and
every write is fenced by the epoch it claimed with. After a crash, another
replica takes the saga when the lease expires; the same instance (same
FUNDING_INSTANCE) takes its own sagas back at once.

An action that raises, or outlives its timeout, has an unknown outcome: a
`Retry`. A compensation that fails for good, or a saga past its deadline,
becomes STUCK (metric `funding_sagas_stuck_total`), visible with its step log in
ListSagas/GetSaga.

`crash_at` is called with the name of every step boundary it crosses
(`domain.boundary`: after STARTED commits, after the action, after the outcome
commits); a no-op unless the crash tests wire one that kills the process there
(main.py, FUNDING_CRASH_POINTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.rpc import status_pb2

from services.chassis.tracing import Context, carrier, context_of, tracer

from . import store
from .domain import (
    COMPENSATING,
    OPEN_STATES,
    STARTED,
    STUCK,
    Action,
    Change,
    Decision,
    Fail,
    LogEntry,
    Outcome,
    Retry,
    SagaRecord,
    Step,
    StepContext,
    Vetoed,
    advance,
    boundary,
    decide,
    error_status,
    learnt_nothing,
    shift,
    step_name,
)

__all__ = [
    "Connection",
    "CrashAt",
    "Orchestrator",
    "SagaDefinition",
    "SagaMetrics",
    "no_crash",
    "rpc_status",
]

_log = logging.getLogger("cex.funding.saga")
_CLAIM_BACKOFF_MAX_S = 5.0  # the longest wait between claims while PostgreSQL fails
_tracer = tracer("cex.funding.saga")
_OBSERVE_EVERY_S = 5.0  # funding_saga_oldest_age_seconds refresh

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
CrashAt = Callable[[str], None]


def no_crash(boundary: str) -> None:
    """Production's `crash_at`: crossing a step boundary does nothing."""


def rpc_status(error: grpc.aio.AioRpcError, component: str) -> status_pb2.Status:
    """The rich status a failed call carried, or one built from its code."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    code = error.code()
    return error_status(
        code, f"{component.upper()}_{code.name}", error.details() or code.name, component
    )


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
        crash_at: CrashAt = no_crash,
    ) -> None:
        self._pool = pool
        self._crash_at = crash_at
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
        extra_s: float = 0.0,
    ) -> str:
        """Starts a saga, due now; `extra_s` lengthens its deadline (e.g. the time a
        withdrawal may wait for an operator's approval)."""
        definition = self._definitions[kind]
        saga_id = saga_id or f"saga_{uuid.uuid4().hex}"
        now = _now(self._clock)
        # A span for the saga's start (the request's child, or a trace's root for a
        # deposit the chain reported); its context is stored for the steps.
        with _tracer.start_as_current_span(
            f"saga {kind} start", attributes={"cex.saga_id": saga_id}
        ):
            trace_context = carrier()
        await store.insert_saga(
            conn,
            saga_id=saga_id,
            kind=kind,
            reference_id=reference_id,
            account_id=account_id,
            first_step=definition.steps[0].name,
            data=dict(data),
            deadline=shift(now, definition.deadline_s + extra_s),
            now=now,
            trace_context=trace_context or None,
        )
        return saga_id

    def wake(self) -> None:
        self._wake.set()

    async def nudge(self, conn: Connection, saga_id: str) -> None:
        """Run the saga now (e.g. after a cancel), instead of at its next retry."""
        await store.nudge_saga(conn, saga_id, _now(self._clock))

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
        oldest = await store.oldest_open_sagas(self._pool)
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
        return await store.claim_sagas(
            self._pool,
            owner=self._owner,
            lease_until=shift(now, self._lease_s),
            now=now,
            skip=list(self._active),
            limit=free,
        )

    async def _locked(self, conn: Connection, saga: SagaRecord) -> SagaRecord:
        current = await store.lock_saga(conn, saga.saga_id, epoch=saga.epoch, owner=self._owner)
        if current is None:
            raise LeaseLost(saga.saga_id)
        return current

    async def _drive(self, saga: SagaRecord) -> None:
        definition = self._definitions[saga.kind]
        try:
            while saga.state in OPEN_STATES:
                saga, delay = await self._step(definition, saga)
                if saga.state not in OPEN_STATES:
                    break
                if delay > 2 * self._poll_s:
                    await store.release_saga(self._pool, saga, self._owner)
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
        compensating = saga.state == COMPENSATING
        step = definition.steps[saga.step_index]
        vetoed = await self._start(definition, saga, step, compensating)
        outcome: Outcome
        if vetoed is not None:
            outcome = Fail(vetoed.error)
        else:
            self._crash_at(boundary("started", step, compensating))
            outcome = await self._act(saga, step, compensating)
            self._crash_at(boundary("acted", step, compensating))
        now = _now(self._clock)
        decision = decide(
            definition.steps,
            saga.progress,
            outcome,
            past_deadline=now >= saga.deadline,
            rng=self._rng,
        )
        if learnt_nothing(saga, decision, 2 * self._poll_s):
            return saga, decision.delay_s  # a poll that learnt nothing new: nothing to commit
        updated = await self._commit(definition, saga, step, compensating, decision, now)
        self._crash_at(boundary("committed", step, compensating))
        return updated, decision.delay_s

    async def _start(
        self, definition: SagaDefinition, saga: SagaRecord, step: Step, compensating: bool
    ) -> Vetoed | None:
        """Commits that the step starts (STARTED, unless it is a poll), after the
        definition's guard of a forward step; its veto instead, if it vetoed."""
        now = _now(self._clock)
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked(conn, saga)
            if not compensating and definition.guard is not None:
                try:
                    await definition.guard(conn, current, step)
                except Vetoed as veto:
                    return veto
            if step.poll:
                return None
            entry = LogEntry(step.name, compensating, STARTED, saga.attempt + 1)
            await store.append_step(conn, saga.saga_id, entry, now)
            await store.step_started(
                conn, saga.saga_id, step.name, lease_until=shift(now, self._lease_s), now=now
            )
            if definition.on_change is not None:
                await definition.on_change(
                    conn,
                    Change(
                        current, step.name, compensating, STARTED, current.state, {}, None, None
                    ),
                )
        return None

    async def _act(self, saga: SagaRecord, step: Step, compensating: bool) -> Outcome:
        ctx = StepContext(
            saga.saga_id, saga.reference_id, saga.account_id, step.name, saga.attempt + 1, saga.data
        )
        action = step.compensation if compensating else step.action
        assert action is not None
        began = time.perf_counter()
        outcome = await self._attempt(action, ctx, step.timeout_s)
        self._metrics.step_seconds.labels(saga.kind, step.name).observe(time.perf_counter() - began)
        return outcome

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
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked(conn, saga)
            if decision.entry is not None:
                await store.append_step(conn, saga.saga_id, decision.entry, now)
            updated = advance(
                current,
                step,
                decision,
                now=now,
                compensation_window_s=definition.compensation_window_s,
            )
            await store.save_saga(
                conn,
                updated,
                current_step=step_name(definition.steps, updated.step_index, step.name),
                next_run_at=shift(now, decision.delay_s),
                lease_until=shift(now, self._lease_s),
                now=now,
            )
            if definition.on_change is not None:
                entry = decision.entry
                await definition.on_change(
                    conn,
                    Change(
                        updated,
                        step.name,
                        compensating,
                        entry.state if entry is not None else "",
                        updated.state,
                        decision.outputs,
                        entry.error if entry is not None else None,
                        status_pb2.Status.FromString(updated.failure) if updated.failure else None,
                    ),
                )
        self._finished(updated, step)
        return updated

    def _finished(self, saga: SagaRecord, step: Step) -> None:
        if saga.state in OPEN_STATES:
            return
        self._metrics.finished.labels(saga.kind, saga.state).inc()
        if saga.state == STUCK:
            self._metrics.stuck.labels(saga.kind).inc()
            _log.error(
                "saga stuck: needs an operator",
                extra={"fields": {"saga_id": saga.saga_id, "step": step.name}},
            )
