"""StreamOrders: one long-lived session per market maker.

- The first message is `subscribe`; the server answers `subscribed`.
- Commands (place, amend, cancel, cancel-all, cancel-all-after) run
  concurrently, at most `_IN_FLIGHT` per session (then the server stops
  reading, and HTTP/2 flow control pushes back on the client); each is
  answered with an `ack` or a `reject` carrying its request_id.
- Execution reports for the account's orders are numbered per session
  (1, 2, ...), so a client sees a gap if one is lost.
- Everything the server sends goes through one bounded queue per session. A
  reader so slow that the queue fills is sent RESOURCE_EXHAUSTED
  ORDER_STREAM_SLOW_CONSUMER and disconnected: never dropped silently, never
  unbounded memory.
- Heartbeats: the server beats when idle for the interval; a client silent
  for three intervals is disconnected (ORDER_STREAM_CLIENT_SILENT).
- With cancel_on_disconnect, the working orders placed through the session
  are cancelled (reason CANCEL_ON_DISCONNECT) when the stream ends for any
  reason; the session is recorded in PostgreSQL so that a crash of this
  process still cancels them on its next start.
"""

from __future__ import annotations

import asyncio
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
from services.chassis import Catalog, ExchangeError, FailedPrecondition, FieldViolation
from services.chassis.errors import InvalidArgument, ResourceExhausted
from services.chassis.interceptors import lost_dependency

from .domain import Execution
from .downstream import rate_usage_var
from .views import execution_report

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
    sequence: int = 0
    overflow: bool = False
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

    def report(self, execution: Execution, catalog: Catalog) -> None:
        if self.markets and execution.order.market not in self.markets:
            return
        if self.overflow:
            return
        self.sequence += 1
        self.offer(R(execution_report=execution_report(execution, catalog, self.sequence)))


class Sessions:
    """The live sessions of this process, by account."""

    def __init__(self, catalog: Catalog, *, queue_size: int = 10_000) -> None:
        self.catalog = catalog
        self.queue_size = queue_size
        self.flow: Flow | None = None
        self._by_account: dict[str, set[Session]] = {}
        self.disconnected_slow = 0

    @property
    def count(self) -> int:
        return sum(len(s) for s in self._by_account.values())

    def publish(self, executions: Sequence[Execution]) -> None:
        for execution in executions:
            for session in self._by_account.get(execution.order.account_id, ()):
                session.report(execution, self.catalog)

    async def cancel_orphans(self, store: Store) -> None:
        """At start: cancel the orders of cancel-on-disconnect sessions a crash left open."""
        await asyncio.sleep(2.0)  # let the downstream channels come up
        for session_id, account_id in await store.orphan_sessions():
            if self._live(session_id):
                continue
            await self._cancel_session(account_id, session_id)
            await store.close_session(session_id)

    def _live(self, session_id: str) -> bool:
        return any(s.session_id == session_id for ss in self._by_account.values() for s in ss)

    async def _cancel_session(self, account_id: str, session_id: str) -> None:
        assert self.flow is not None
        try:
            await self.flow.cancel_all(
                account_id, reason=t.CANCEL_REASON_CANCEL_ON_DISCONNECT, session_id=session_id
            )
        except Exception:
            _log.exception("cancel-on-disconnect of session %s failed", session_id)

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
        if sub.resume_session_id:
            raise FailedPrecondition(
                "ORDER_SESSION_NOT_RESUMABLE",
                "sessions are not resumable: start a new one and reconcile with ListOrders",
            )
        session = Session(
            session_id=f"s{secrets.token_hex(8)}",
            account_id=account,
            markets=frozenset(sub.markets),
            cancel_on_disconnect=sub.cancel_on_disconnect,
            queue=asyncio.Queue(self.queue_size),
        )
        if session.cancel_on_disconnect:
            await service.store.open_session(session.session_id, account, True)
        self._by_account.setdefault(account, set()).add(session)
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
                if len(batch) > _MAX_BATCH or not all(
                    c.WhichOneof("payload") in _COMMANDS for c in batch
                ):
                    ended.append(_not_a_command(kind, len(batch)))
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
                    session_id=session.session_id, heartbeat_interval=interval, last_sequence=0
                )
            )
            while True:
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
            self._by_account.get(account, set()).discard(session)
            if session.cancel_on_disconnect:
                # Shielded: the stream's own task may be cancelled right now.
                await asyncio.shield(self._end(service, session))

    async def _end(self, service: OrderService, session: Session) -> None:
        await self._cancel_session(session.account_id, session.session_id)
        await service.store.close_session(session.session_id)

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


def _not_a_command(kind: str | None, size: int) -> ExchangeError:
    if kind == "subscribe" or kind is None:
        return FailedPrecondition(
            "ORDER_STREAM_ALREADY_SUBSCRIBED", "subscribe is allowed only once"
        )
    if size > _MAX_BATCH:
        return InvalidArgument(
            "ORDER_STREAM_BATCH_TOO_LARGE",
            f"at most {_MAX_BATCH} commands in one message",
            violations=[FieldViolation("commands.commands", f"at most {_MAX_BATCH}")],
        )
    return InvalidArgument(
        "ORDER_STREAM_NOT_A_COMMAND",
        "each of commands.commands is a place, amend, cancel, cancel_all or cancel_all_after",
        violations=[FieldViolation("commands.commands", "only commands")],
    )


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
