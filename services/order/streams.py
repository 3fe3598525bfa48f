"""StreamOrders: one long-lived session per market maker.

- The first message is `subscribe`; the server answers `subscribed`.
- Commands (place, amend, cancel, cancel-all, cancel-all-after) run
  concurrently, at most `_IN_FLIGHT` per session (then the server stops
  reading, and HTTP/2 flow control pushes back on the client); each is
  answered with an `ack` or a `reject` carrying its request_id.
- Execution reports for the account's orders are numbered per session
  (1, 2, ...), so a client sees a gap if one is lost. They are numbered and kept
  in PostgreSQL by whichever replica stores the events (consumer.py), and each
  replica sends those of the sessions it holds: so a session resumes, on any
  replica, from the last sequence its client processed (`resume_session_id`,
  `resume_after_sequence`) for `session_resume_s` after its stream ended.
- Everything the server sends goes through one bounded queue per session. A
  reader so slow that the queue fills is sent RESOURCE_EXHAUSTED
  ORDER_STREAM_SLOW_CONSUMER and disconnected: never dropped silently, never
  unbounded memory.
- Heartbeats: the server beats when idle for the interval; a client silent
  for three intervals is disconnected (ORDER_STREAM_CLIENT_SILENT).
- With cancel_on_disconnect, the working orders placed through the session
  are cancelled (reason CANCEL_ON_DISCONNECT) when the stream ends for any
  reason.
- Ownership: a session is held by one process (`owner`: replica name and a
  random incarnation) under a lease in PostgreSQL that the process renews
  while it lives. A process cleans up only the sessions it holds. When a
  process dies (kill -9), its lease lapses and whichever replica notices first
  claims its sessions with one conditional UPDATE (one claimer per session),
  cancels their cancel-on-disconnect orders (one `cancel:<order_id>` each, which
  the writer runs at most once) and detaches them, resumable. A process that
  could not renew its lease in time and finds its sessions claimed ends their
  streams (UNAVAILABLE ORDER_SESSION_LOST) without touching them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import (
    Catalog,
    ExchangeError,
    FailedPrecondition,
    FieldViolation,
    batch_size,
)
from services.chassis.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.chassis.interceptors import lost_dependency

from .domain import Execution
from .downstream import rate_usage_var

if TYPE_CHECKING:
    from .flow import Flow
    from .server import OrderService
    from .store import Store

__all__ = ["Session", "Sessions"]

_log = logging.getLogger("cex.order.streams")
_IN_FLIGHT = 256
_DEFAULT_BEAT_S = 10.0

R = order_pb2.StreamOrdersResponse


@dataclass(eq=False)
class Session:
    session_id: str
    account_id: str
    markets: frozenset[str]
    cancel_on_disconnect: bool
    queue: asyncio.Queue[R]
    sequence: int = 0  # the last report sent (queued)
    overflow: bool = False
    lost: bool = False  # another replica claimed it (this process's lease lapsed)
    # Set by whatever the sending side must look at: a message queued, overflow,
    # the reading side ended.
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: R) -> None:
        if self.overflow:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflow = True
        self.wake.set()

    def deliver(self, sequence: int, report: bytes) -> None:
        """A kept report, sent if it is the next one."""
        if self.overflow or sequence != self.sequence + 1:
            return
        self.sequence = sequence
        self.offer(R(execution_report=order_pb2.ExecutionReport.FromString(report)))


class Sessions:
    """The sessions this process holds, their lease, and the delivery of their reports."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        queue_size: int = 10_000,
        replica: str = "order",
        lease_s: float = 10.0,
        resume_s: float = 60.0,
        reports_keep_s: float = 600.0,
    ) -> None:
        self.catalog = catalog
        self.queue_size = queue_size
        self.flow: Flow | None = None
        self.owner = f"{replica}/{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self.resume_s = resume_s
        self.reports_keep_s = reports_keep_s
        self._live: dict[str, Session] = {}
        self._new_reports = asyncio.Event()
        self._leased = asyncio.Event()
        self.disconnected_slow = 0
        self.claimed = 0  # sessions of dead processes this one cancelled and detached

    @property
    def count(self) -> int:
        return len(self._live)

    def publish(self, executions: Sequence[Execution]) -> None:
        """The consumer passed a batch: reports may be waiting for sessions held here."""
        self._new_reports.set()

    async def run(self, store: Store) -> None:
        """The lease, the delivery of reports and the claiming of dead processes'
        sessions, until cancelled."""
        await asyncio.gather(self._keep_lease(store), self._deliver(store), self._claim(store))

    async def _keep_lease(self, store: Store) -> None:
        while True:
            try:
                await store.renew_lease(self.owner, self.lease_s)
                self._leased.set()
                if self._live:
                    for session_id in await store.not_owned(self.owner, list(self._live)):
                        if (session := self._live.get(session_id)) is not None:
                            session.lost = True
                            session.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("renewing the sessions' lease failed")
            await asyncio.sleep(self.lease_s / 3)

    async def _deliver(self, store: Store) -> None:
        """Send each held session the reports kept for it after its last one: woken
        by the consumer after every batch, and every second in case a wake-up was
        missed (reports numbered by another replica's consumer, a resume)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._new_reports.wait()
            self._new_reports.clear()
            if not self._live:
                continue
            try:
                after = [(s.session_id, s.sequence) for s in self._live.values()]
                for session_id, sequence, report in await store.reports_after(after):
                    if (session := self._live.get(session_id)) is not None:
                        session.deliver(sequence, report)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("delivering execution reports failed")
                await asyncio.sleep(0.5)

    async def _claim(self, store: Store) -> None:
        """Cancel and detach the sessions of processes whose lease lapsed (their
        crash, or a start after one), and close what was detached too long."""
        await self._leased.wait()
        await asyncio.sleep(2.0)  # let the downstream channels come up
        while True:
            try:
                await self.claim_lapsed(store)
                await store.expire_sessions(self.resume_s, self.reports_keep_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("claiming lapsed sessions failed")
            await asyncio.sleep(min(self.lease_s / 3, 2.0))

    async def claim_lapsed(self, store: Store) -> int:
        """One round: returns how many sessions this process claimed."""
        claimed = await store.claim_lapsed(self.owner)
        for session_id, account_id, cancel in claimed:
            if cancel:
                await self._cancel_session(account_id, session_id)
            await store.detach_session(session_id, self.owner)
            _log.info("session %s of a lapsed replica: cancelled and detached", session_id)
        self.claimed += len(claimed)
        return len(claimed)

    async def _cancel_session(self, account_id: str, session_id: str) -> None:
        assert self.flow is not None
        try:
            await self.flow.cancel_all(
                account_id, reason=t.CANCEL_REASON_CANCEL_ON_DISCONNECT, session_id=session_id
            )
        except Exception:
            _log.exception("cancel-on-disconnect of session %s failed", session_id)

    async def _attach(
        self, service: OrderService, account: str, sub: order_pb2.StreamSubscribe
    ) -> Session:
        """A new session, or the one `sub` resumes, held by this process."""
        await self._leased.wait()
        if not sub.resume_session_id:
            session = Session(
                session_id=f"s{secrets.token_hex(8)}",
                account_id=account,
                markets=frozenset(sub.markets),
                cancel_on_disconnect=sub.cancel_on_disconnect,
                queue=asyncio.Queue(self.queue_size),
            )
            await service.store.open_session(
                session.session_id, account, session.cancel_on_disconnect,
                sorted(session.markets), self.owner,
            )  # fmt: skip
            return session
        after = sub.resume_after_sequence
        outcome, markets = await service.store.resume_session(
            sub.resume_session_id, account, self.owner, sub.cancel_on_disconnect, after
        )
        if outcome == "attached":
            raise Unavailable(
                "ORDER_SESSION_ATTACHED",
                "the session's stream is still open elsewhere; retry once it ends",
                retry_after_s=1.0,
            )
        if outcome == "detaching":
            raise Unavailable(
                "ORDER_SESSION_DETACHING",
                "the replica that held the session is gone; its session is being "
                "cancelled and detached: retry",
                retry_after_s=1.0,
            )
        if outcome == "ahead":
            raise InvalidArgument(
                "ORDER_RESUME_SEQUENCE_AHEAD",
                "resume_after_sequence is beyond the session's last report",
                violations=[FieldViolation("subscribe.resume_after_sequence", "too high")],
            )
        if outcome != "resumed":
            raise FailedPrecondition(
                "ORDER_SESSION_NOT_RESUMABLE",
                "no such session to resume (ended too long ago, or its reports are no "
                "longer kept): start a new one and reconcile with ListOrders",
            )
        session = Session(
            session_id=sub.resume_session_id,
            account_id=account,
            markets=frozenset(markets),
            cancel_on_disconnect=sub.cancel_on_disconnect,
            queue=asyncio.Queue(self.queue_size),
            sequence=after,
        )
        self._new_reports.set()  # what it missed
        return session

    # Over ruff's complexity limit on purpose: a session's whole life in one place (subscribe,
    # read, write, heartbeats, slow reader, cancel-on-disconnect); its steps are helpers.
    async def serve(  # noqa: C901
        self,
        service: OrderService,
        requests: AsyncIterator[order_pb2.StreamOrdersRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[R]:
        from .server import caller_account

        assert self.flow is not None
        try:
            first = await asyncio.wait_for(anext(requests), 30.0)
        except (StopAsyncIteration, TimeoutError):
            return
        if first.WhichOneof("payload") != "subscribe":
            raise FailedPrecondition(
                "ORDER_STREAM_NOT_SUBSCRIBED", "the first message must be subscribe"
            )
        sub = first.subscribe
        account = caller_account(sub.account_id, "subscribe.account_id")
        beat_s = _DEFAULT_BEAT_S
        if sub.HasField("heartbeat_interval"):
            beat_s = sub.heartbeat_interval.ToNanoseconds() / 1e9
            if not 1.0 <= beat_s <= 60.0:
                raise InvalidArgument(
                    "ORDER_INVALID_HEARTBEAT_INTERVAL",
                    "heartbeat_interval must be 1 to 60 seconds",
                    violations=[FieldViolation("subscribe.heartbeat_interval", "1 to 60 s")],
                )
        unknown = [m for m in sub.markets if self.catalog.market(m) is None]
        if unknown:
            raise InvalidArgument(
                "ORDER_UNKNOWN_MARKET",
                f"no market {unknown[0]!r}",
                violations=[FieldViolation("subscribe.markets", f"{unknown[0]!r} is not a market")],
            )
        session = await self._attach(service, account, sub)
        self._live[session.session_id] = session
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(beat_s * 1e9))
        last_heard = time.monotonic()
        ended: list[ExchangeError] = []

        async def handle(message: order_pb2.StreamOrdersRequest, slots: asyncio.Semaphore) -> None:
            try:
                session.offer(await self._command(service, session, message))
            finally:
                slots.release()

        async def read() -> None:
            nonlocal last_heard
            slots = asyncio.Semaphore(_IN_FLIGHT)
            tasks: set[asyncio.Task[None]] = set()
            async for message in requests:
                last_heard = time.monotonic()
                kind = message.WhichOneof("payload")
                if kind == "heartbeat":
                    session.offer(R(heartbeat=message.heartbeat))
                    continue
                batch = message.commands.commands if kind == "commands" else (message,)
                refused = _refusal(kind, batch)
                if refused is not None:
                    ended.append(refused)
                    session.wake.set()
                    return
                for command in batch:
                    await slots.acquire()
                    task = asyncio.create_task(handle(command, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: session.wake.set())
        try:
            yield R(
                subscribed=order_pb2.StreamSubscribed(
                    session_id=session.session_id,
                    heartbeat_interval=interval,
                    last_sequence=session.sequence,
                )
            )
            while True:
                if session.lost:
                    raise Unavailable(
                        "ORDER_SESSION_LOST",
                        "this replica lost its lease on the session, which another one "
                        "has taken over: resume it",
                        retry_after_s=1.0,
                    )
                if session.overflow:
                    self.disconnected_slow += 1
                    raise ResourceExhausted(
                        "ORDER_STREAM_SLOW_CONSUMER",
                        f"more than {self.queue_size} messages waiting: the client reads too "
                        "slowly; reconnect and reconcile with ListOrders",
                    )
                if ended:
                    raise ended[0]
                message: R | None
                try:
                    message = session.queue.get_nowait()
                except asyncio.QueueEmpty:
                    message = await self._next(session, reader, beat_s)
                    if message is None:
                        if reader.done() and not ended:
                            reader.result()  # raises what broke the reading side
                            return  # the client finished writing: end of session
                        if time.monotonic() - last_heard > 3 * beat_s:
                            raise FailedPrecondition(
                                "ORDER_STREAM_CLIENT_SILENT",
                                f"nothing heard for {3 * beat_s:.0f} s",
                            ) from None
                        continue
                yield message
        finally:
            reader.cancel()
            self._live.pop(session.session_id, None)
            if not session.lost:
                # Shielded: the stream's own task may be cancelled right now.
                await asyncio.shield(self._end(service, session))

    async def _end(self, service: OrderService, session: Session) -> None:
        if session.cancel_on_disconnect:
            await self._cancel_session(session.account_id, session.session_id)
        try:
            await service.store.detach_session(session.session_id, self.owner)
        except Exception:  # its lease lapses and another replica detaches it
            _log.exception("detaching session %s failed", session.session_id)

    async def _next(self, session: Session, reader: asyncio.Task[None], beat_s: float) -> R | None:
        """The next message, a server heartbeat after beat_s of quiet, or None to re-check.
        One wait on the session's event, no task per message: the stream sends one
        of these for every ack and execution report."""
        if reader.done() or session.overflow:
            return None
        session.wake.clear()
        if not session.queue.empty():
            return session.queue.get_nowait()
        try:
            async with asyncio.timeout(beat_s):
                await session.wake.wait()
        except TimeoutError:
            beat = order_pb2.Heartbeat()
            beat.send_time.CopyFrom(_now())
            return R(heartbeat=beat)
        return None if session.queue.empty() else session.queue.get_nowait()

    async def _command(
        self, service: OrderService, session: Session, message: order_pb2.StreamOrdersRequest
    ) -> R:
        from .server import caller_account

        kind = message.WhichOneof("payload")
        command: Any = getattr(message, kind or "place")
        request_id = (
            command.client_order_id if kind == "place" else getattr(command, "request_id", "")
        )
        try:
            # Empty means the session's account (also for a service acting for one).
            account = caller_account(command.account_id or session.account_id)
            if account != session.account_id:
                raise FailedPrecondition(
                    "ORDER_ACCOUNT_MISMATCH", "commands act on the session's account"
                )
            ack = order_pb2.StreamAck(request_id=request_id)
            if kind == "place":
                ack.place.CopyFrom(await service.place(account, command, session.session_id))
            elif kind == "amend":
                ack.amend.CopyFrom(await service.amend(account, command))
            elif kind == "cancel":
                ack.cancel.CopyFrom(await service.cancel(account, command))
            elif kind == "cancel_all":
                ack.cancel_all.CopyFrom(await service.cancel_all(account, command))
            elif kind == "cancel_all_after":
                ack.cancel_all_after.CopyFrom(await service.cancel_all_after(account, command))
            usage = rate_usage_var.get()
            if usage is not None:
                ack.order_limit_1s, ack.order_count_1s = usage
            return R(ack=ack)
        except ExchangeError as error:
            status = error.to_status("order")
            return R(reject=order_pb2.StreamReject(request_id=request_id, status=status))
        except Exception as error:  # as the chassis answers a unary call
            failure = lost_dependency(error, "ORDER")
            if failure is None:
                _log.exception("stream command failed")
                failure = ExchangeError(
                    "ORDER_INTERNAL", "internal error", code=grpc.StatusCode.INTERNAL
                )
            status = failure.to_status("order")
            return R(reject=order_pb2.StreamReject(request_id=request_id, status=status))


_COMMANDS = frozenset({"place", "amend", "cancel", "cancel_all", "cancel_all_after"})
_MAX_BATCH = 100  # commands in one StreamCommands message


def _refusal(
    kind: str | None, batch: Sequence[order_pb2.StreamOrdersRequest]
) -> ExchangeError | None:
    """Why a client message that is not commands ends the stream (None: it is)."""
    if kind == "subscribe" or kind is None:
        return FailedPrecondition(
            "ORDER_STREAM_ALREADY_SUBSCRIBED", "subscribe is allowed only once"
        )
    try:
        batch_size(
            len(batch),
            minimum=0,
            maximum=_MAX_BATCH,
            field="commands.commands",
            reason="ORDER_STREAM_BATCH_TOO_LARGE",
        )
    except InvalidArgument as too_large:
        return too_large
    if all(c.WhichOneof("payload") in _COMMANDS for c in batch):
        return None
    return InvalidArgument(
        "ORDER_STREAM_NOT_A_COMMAND",
        "each of commands.commands is a place, amend, cancel, cancel_all or cancel_all_after",
        violations=[FieldViolation("commands.commands", "only commands")],
    )


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
