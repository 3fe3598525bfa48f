"""A market maker's session over OrderService.StreamOrders that survives disconnects.

The stream (see order.proto): the client subscribes first; the server answers
`subscribed`, then an `ack` or a `reject` per command (by request_id; a place's
is its client_order_id) and an `execution_report` for every change to the
account's orders, numbered 1, 2, ... per session; heartbeats both ways.
Sessions are not resumable on the server: after a disconnect a new session
starts at sequence 1, and what happened in between is only in the order
service's database.

`MarketMakerSession` therefore:

- reconnects with backoff (full jitter) whenever the stream breaks, the server
  ends it, or nothing (not even a heartbeat) is heard for three intervals;
- resubscribes with the same options and resends every command still
  awaiting its answer, with the same idempotency key, so a command in flight
  across a disconnect is done once (a repeated place returns the first order);
- detects gaps by sequence, and after a gap or a reconnect reconciles: it
  reads the working orders (ListOrders) and every order it believed working
  (GetOrder), and emits a `Reconciled` event for each order whose state
  differs from what it knew, so no fill or cancel is missed;
- renews the dead man's switch (CancelAllAfter) on a timer when asked;
- sends `cancel_on_disconnect` when asked: the exchange cancels the orders
  placed through a session when that session ends, for any reason.

`session.orders` is the session's view of the account's orders (by order_id),
updated from acks, execution reports and reconciliation; it never moves
backwards (a report older than what is known does not undo a fill).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2

from ._closing import ClosedOnExit
from ._service import R
from .errors import (
    CexError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
    from_status,
)
from .orders import (
    TERMINAL_STATES,
    WORKING_STATES,
    Amount,
    _Command,
    _OrderCommands,
    place_request,
)
from .ratelimit import RateLimit
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "Connected",
    "Disconnected",
    "GapDetected",
    "MarketMakerSession",
    "Reconciled",
    "SessionEvent",
]

_log = logging.getLogger("cex_sdk.session")
_STREAM = "/cex.order.v1.OrderService/StreamOrders"
Req = order_pb2.StreamOrdersRequest
Resp = order_pb2.StreamOrdersResponse
#: Errors that another attempt cannot fix: the first connect raises them.
_FATAL = (InvalidArgumentError, PermissionDeniedError, UnauthenticatedError)


@dataclass(frozen=True, slots=True)
class Connected:
    """A session is open (`reconnect`: not the first; reconciliation is done)."""

    session_id: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream broke; the session reconnects after a backoff."""

    error: CexError | None


@dataclass(frozen=True, slots=True)
class GapDetected:
    """An execution report's sequence skipped: reports were lost; reconciliation follows."""

    expected: int
    received: int


@dataclass(frozen=True, slots=True)
class Reconciled:
    """An order's state as the exchange has it, found by reconciliation.

    Stands for the execution reports that were missed (during a disconnect or
    a gap): compare with `previous` (None if the session did not know the
    order). A fill may also arrive as a live report after this event; its
    quantities are cumulative, so applying both is harmless.
    """

    order: order_pb2.Order
    previous: order_pb2.Order | None
    cause: str

    @property
    def filled_since(self) -> Decimal:
        """Base quantity filled since the session's previous view of the order."""
        before = Decimal(self.previous.filled_quantity or 0) if self.previous else Decimal(0)
        return Decimal(self.order.filled_quantity or 0) - before


SessionEvent = Connected | Disconnected | GapDetected | Reconciled | order_pb2.ExecutionReport


@dataclass(slots=True)
class _Pending:
    message: Req
    future: asyncio.Future[order_pb2.StreamAck]


class _StreamLost(Exception):
    def __init__(self, error: CexError) -> None:
        super().__init__(str(error))
        self.error = error


def _decimal(text: str) -> Decimal:
    return Decimal(text or 0)


class MarketMakerSession(ClosedOnExit, _OrderCommands):
    """One market maker's order stream, kept open across disconnects.

        async with MarketMakerSession(client, markets=["BTC-USDT"],
                                      cancel_on_disconnect=True, dead_man_switch_s=30) as mm:
            bid = await mm.place("BTC-USDT", SIDE_BUY, "0.1", price="99")
            async for event in mm.events():
                if isinstance(event, ExecutionReport): ...   # live, in sequence
                elif isinstance(event, Reconciled): ...      # missed while away

    Commands (`place`, `amend`, `cancel`, `cancel_all`, `cancel_all_after`)
    go over the stream and return the server's answer (raising the typed
    `CexError` of a reject). A command whose answer is lost with the
    connection is sent again on the next connection with the same key, so it
    takes effect once. `timeout_s` bounds the wait (DeadlineExceededError:
    the command may still have happened; look it up by its key).
    """

    def __init__(
        self,
        client: Client,
        *,
        markets: Sequence[str] = (),
        cancel_on_disconnect: bool = False,
        heartbeat_interval_s: float = 5.0,
        dead_man_switch_s: int = 0,
        dead_man_switch_market: str = "",
        command_timeout_s: float = 30.0,
        reconnect: RetryPolicy | None = None,
        before_reconnect: Callable[[], Awaitable[None]] | None = None,
        random: Callable[[], float] = random.random,
    ) -> None:
        """
        Args:
            markets: only report these markets' orders (and reconcile those); all if empty.
            cancel_on_disconnect: the exchange cancels the orders placed through a
                session when it ends (also on a crash of either side).
            heartbeat_interval_s: 1 to 60; the client beats this often, and a
                connection silent for three intervals is dropped and reopened.
            dead_man_switch_s: 1 to 600 arms CancelAllAfter and renews it every
                third of that while connected (0: off). Disarmed by `close()`.
            dead_man_switch_market: the switch's market ("" = the whole account).
            command_timeout_s: default wait for a command's answer.
            reconnect: backoff between reconnect attempts (0.1 s doubling to 2 s).
            before_reconnect: awaited before each reconnect attempt (to log, or to
                hold the session back while something is being repaired).
        """
        if not 1.0 <= heartbeat_interval_s <= 60.0:
            raise ValueError("heartbeat_interval_s must be 1 to 60")
        if not 0 <= dead_man_switch_s <= 600:
            raise ValueError("dead_man_switch_s must be 0 (off) to 600")
        self._client = client
        self.markets = tuple(markets)
        self.cancel_on_disconnect = cancel_on_disconnect
        self._beat_s = heartbeat_interval_s
        self._dead_man_s = dead_man_switch_s
        self._dead_man_market = dead_man_switch_market
        self._command_timeout_s = command_timeout_s
        self._reconnect = reconnect or RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0)
        self._before_reconnect = before_reconnect
        self._random = random
        #: The account's orders as the session knows them, by order_id.
        self.orders: dict[str, order_pb2.Order] = {}
        #: The current (or last) server session id.
        self.session_id = ""
        #: How many times the session reconnected.
        self.reconnects = 0
        #: The order budget the latest ack carried (place and amend acks carry it).
        self.last_rate_limit: RateLimit | None = None
        #: Sequence gaps seen, and reconciliations done.
        self.gaps = 0
        self.reconciliations = 0
        self._connected = asyncio.Event()
        self._pending: dict[str, _Pending] = {}
        self._events: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
        self._outbox: asyncio.Queue[Req | None] | None = None
        self._expected = 1
        self._executions: set[str] = set()
        self._execution_order: deque[str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._closing = False
        self._beats = itertools.count(1)
        self._token = ""
        self._opened = 0

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> MarketMakerSession:
        await self.start()
        return self

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Open the first session; raises if it cannot (bad options, no permission,
        or nothing reachable within `timeout_s`)."""
        if self._task is not None:
            return
        self._started = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="cex-mm-session")
        try:
            await asyncio.wait_for(asyncio.shield(self._started), timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Disarm the dead man's switch, end the stream (cancel-on-disconnect
        then applies) and stop. Commands still waiting raise UnavailableError."""
        if self._closing:
            return
        if self._dead_man_s and self._connected.is_set():
            with contextlib.suppress(CexError):
                await self.cancel_all_after(0, market=self._dead_man_market, timeout_s=timeout_s)
        self._closing = True
        if self._outbox is not None:
            self._outbox.put_nowait(None)  # half-close: the server ends the session
        elif self._task is not None:
            self._task.cancel()  # between connections: nothing to end
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    UnavailableError(grpc.StatusCode.UNAVAILABLE, "the session was closed")
                )
        self._pending.clear()
        self._events.put_nowait(None)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float = 30.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def events(self) -> AsyncIterator[SessionEvent]:
        """Every event in order: reports, reconciliations, gaps, (dis)connections.

        Ends when the session is closed. Events are queued without bound, so
        read them as they come (one reader).
        """
        while (event := await self._events.get()) is not None:
            yield event

    # -- commands -----------------------------------------------------------

    async def place(
        self,
        market: str,
        side: types_pb2.Side.ValueType,
        quantity: Amount | None = None,
        *,
        price: Amount | None = None,
        type: types_pb2.OrderType.ValueType = types_pb2.ORDER_TYPE_LIMIT,
        time_in_force: types_pb2.TimeInForce.ValueType = types_pb2.TIME_IN_FORCE_UNSPECIFIED,
        post_only: bool = False,
        client_order_id: str | None = None,
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        """Place an order through the session (see `OrdersApi.place`)."""
        request = place_request(
            market,
            side,
            quantity,
            price=price,
            type=type,
            time_in_force=time_in_force,
            post_only=post_only,
            client_order_id=client_order_id,
        )
        return await self.place_request(request, timeout_s=timeout_s)

    async def place_request(
        self, request: order_pb2.PlaceOrderRequest, *, timeout_s: float | None = None
    ) -> order_pb2.Order:
        """Place a prepared request (its client_order_id is generated if empty)."""
        return await self._place(request, timeout_s)

    async def amend(
        self,
        order_id: str = "",
        *,
        client_order_id: str = "",
        price: Amount | None = None,
        quantity: Amount | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        return await self._amend(
            order_id, client_order_id, price, quantity, request_id, "", timeout_s
        )

    async def cancel(
        self,
        order_id: str = "",
        *,
        client_order_id: str = "",
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        return await self._cancel(order_id, client_order_id, request_id, "", timeout_s)

    async def cancel_all(
        self,
        market: str = "",
        *,
        side: types_pb2.Side.ValueType = types_pb2.SIDE_UNSPECIFIED,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> list[order_pb2.Order]:
        return await self._cancel_all(market, side, request_id, "", timeout_s)

    async def cancel_all_after(
        self, timeout_seconds: int, *, market: str = "", timeout_s: float | None = None
    ) -> datetime | None:
        """Arm (or with 0 disarm) the dead man's switch once; returns when it fires."""
        return await self._cancel_all_after(timeout_seconds, market, None, "", timeout_s)

    async def _send(
        self, command: _Command[R], request: Message, key: str, timeout_s: float | None
    ) -> R:
        """A command over the stream, answered by its ack: sent now if connected, else
        when the next connection opens, and sent again after a reconnect (with the
        same key) until it is answered or given up on."""
        if self._closing or self._task is None:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the session is not running")
        message = Req()
        getattr(message, command.field).CopyFrom(request)
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending(message, asyncio.get_running_loop().create_future())
            self._pending[key] = pending
            if self._outbox is not None:
                self._outbox.put_nowait(message)
            # else: sent when the next connection opens
        wait = self._command_timeout_s if timeout_s is None else timeout_s
        try:
            ack = await asyncio.wait_for(asyncio.shield(pending.future), wait)
        except TimeoutError:
            if self._pending.get(key) is pending:
                del self._pending[key]  # given up on: not resent on reconnect
            raise DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer to {key} within {wait} s (it may still take effect)",
            ) from None
        reply: R = getattr(ack, command.field)
        return reply

    # -- the connection loop --------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            if self._started is not None and self._started.done() and self._before_reconnect:
                await self._before_reconnect()
            error: CexError | None = None
            opened = self._opened
            try:
                await self._serve()
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            except _StreamLost as lost:
                error = lost.error
            except CexError as cex_error:  # reconciliation failed: the service is not back yet
                error = cex_error
            except Exception as bug:
                _log.exception("order session failed; reconnecting")
                error = InternalError(grpc.StatusCode.UNKNOWN, f"session failed: {bug!r}")
            if self._opened > opened:
                failures = 0  # it was open: start the backoff over
            if self._closing:
                return
            if isinstance(error, UnauthenticatedError):
                self._client.tokens.invalidate(self._token)
            assert self._started is not None
            if not self._started.done() and isinstance(error, _FATAL):
                self._started.set_exception(error)
                return
            _log.info("order stream lost (%s); reconnecting", error)
            self._events.put_nowait(Disconnected(error))
            failures += 1
            delay = self._reconnect.delay_s(min(failures, 20), None, self._random)
            await asyncio.sleep(delay)

    async def _serve(self) -> None:
        """One connection: subscribe, resend, reconcile, read until it ends (or raise)."""
        outbox: asyncio.Queue[Req | None] = asyncio.Queue()
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self._beat_s * 1e9))
        outbox.put_nowait(
            Req(
                subscribe=order_pb2.StreamSubscribe(
                    markets=list(self.markets),
                    cancel_on_disconnect=self.cancel_on_disconnect,
                    heartbeat_interval=interval,
                )
            )
        )

        self._token = await self._client.tokens.token()
        call = self._client.stream_stream(_STREAM, Resp)(
            metadata=(("authorization", f"Bearer {self._token}"),)
        )

        async def write() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while (message := await outbox.get()) is not None:
                    await call.write(message)
                await call.done_writing()

        tasks: list[asyncio.Task[None]] = [asyncio.create_task(write())]
        try:
            first = await self._read(call)
            if first is None:
                return
            if first.WhichOneof("payload") == "error":
                raise _StreamLost(from_status(first.error))
            if first.WhichOneof("payload") != "subscribed":
                raise _StreamLost(
                    UnavailableError(grpc.StatusCode.UNAVAILABLE, "no subscribed answer")
                )
            reconnect = bool(self.session_id)
            self._opened += 1
            self.session_id = first.subscribed.session_id
            self._expected = first.subscribed.last_sequence + 1
            self._outbox = outbox
            for pending in list(self._pending.values()):
                outbox.put_nowait(pending.message)
            tasks.append(asyncio.create_task(self._heartbeats(outbox)))
            if reconnect:
                self.reconnects += 1
                # Reads go on meanwhile (acks of resent commands, new reports).
                reader = asyncio.create_task(self._read_all(call))
                try:
                    await self._reconcile("reconnect")
                except BaseException:
                    reader.cancel()
                    raise
                self._connected.set()
                self._events.put_nowait(Connected(self.session_id, True))
                if self._dead_man_s:
                    tasks.append(asyncio.create_task(self._dead_man()))
                await reader
            else:
                self._connected.set()
                self._events.put_nowait(Connected(self.session_id, False))
                assert self._started is not None
                if not self._started.done():
                    self._started.set_result(None)
                if self._dead_man_s:
                    tasks.append(asyncio.create_task(self._dead_man()))
                await self._read_all(call)
        finally:
            self._connected.clear()
            self._outbox = None
            for task in tasks:
                task.cancel()
            call.cancel()

    async def _read(self, call: grpc.aio.StreamStreamCall[Message, Resp]) -> Resp | None:
        """The next message; None at a clean end; raises on silence or failure."""
        try:
            message = await asyncio.wait_for(call.read(), 3 * self._beat_s)
        except TimeoutError:
            raise _StreamLost(
                UnavailableError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"nothing heard for {3 * self._beat_s:.0f} s",
                )
            ) from None
        if message is grpc.aio.EOF:
            code = await call.code()
            if code != grpc.StatusCode.OK and not self._closing:
                raise _StreamLost(
                    UnavailableError(grpc.StatusCode.UNAVAILABLE, f"stream ended: {code.name}")
                )
            return None
        assert isinstance(message, Resp)
        return message

    async def _read_all(self, call: grpc.aio.StreamStreamCall[Message, Resp]) -> None:
        while (message := await self._read(call)) is not None:
            await self._dispatch(message)
        if not self._closing:
            raise _StreamLost(UnavailableError(grpc.StatusCode.UNAVAILABLE, "the server ended"))

    async def _heartbeats(self, outbox: asyncio.Queue[Req | None]) -> None:
        while True:
            await asyncio.sleep(self._beat_s)
            beat = order_pb2.Heartbeat(id=f"hb-{next(self._beats)}")
            beat.send_time.GetCurrentTime()
            outbox.put_nowait(Req(heartbeat=beat))

    async def _dead_man(self) -> None:
        while True:
            try:
                await self.cancel_all_after(
                    self._dead_man_s, market=self._dead_man_market, timeout_s=self._beat_s
                )
            except CexError as error:
                _log.warning("dead man's switch renewal failed: %s", error)
            await asyncio.sleep(max(1.0, self._dead_man_s / 3))

    # -- what the server sends --------------------------------------------------

    async def _dispatch(self, message: Resp) -> None:
        kind = message.WhichOneof("payload")
        if kind == "ack":
            self._ack(message.ack)
        elif kind == "reject":
            pending = self._pending.pop(message.reject.request_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(from_status(message.reject.status))
        elif kind == "execution_report":
            await self._report(message.execution_report)
        elif kind == "error":
            raise _StreamLost(from_status(message.error))

    def _ack(self, ack: order_pb2.StreamAck) -> None:
        result = ack.WhichOneof("result")
        if ack.order_limit_1s:
            self.last_rate_limit = RateLimit(
                "/cex.order.v1.OrderService/StreamOrders", ack.order_limit_1s, ack.order_count_1s
            )
        if result in ("place", "amend", "cancel"):
            self._merge(getattr(ack, result).order)
        elif result == "cancel_all":
            for order in ack.cancel_all.orders:
                self._merge(order)
        pending = self._pending.pop(ack.request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(ack)

    async def _report(self, report: order_pb2.ExecutionReport) -> None:
        if report.sequence < self._expected:
            return  # already seen in this session
        gap = report.sequence > self._expected
        if gap:
            self.gaps += 1
            self._events.put_nowait(GapDetected(self._expected, report.sequence))
        self._expected = report.sequence + 1
        if report.execution_id in self._executions:
            return
        self._remember(report.execution_id)
        self._apply(report)
        self._events.put_nowait(report)
        if gap:
            await self._reconcile("gap")

    def _remember(self, execution_id: str) -> None:
        self._executions.add(execution_id)
        self._execution_order.append(execution_id)
        if len(self._execution_order) > 100_000:
            self._executions.discard(self._execution_order.popleft())

    def _apply(self, report: order_pb2.ExecutionReport) -> None:
        known = self.orders.get(report.order_id)
        if known is not None and (
            known.state in TERMINAL_STATES
            or _decimal(report.cumulative_quantity) < _decimal(known.filled_quantity)
        ):
            return  # older than what is known
        order = order_pb2.Order()
        if known is not None:
            order.CopyFrom(known)
        order.order_id = report.order_id
        order.client_order_id = report.client_order_id
        order.account_id = report.account_id
        order.market = report.market
        order.side = report.side
        order.type = report.order_type
        order.state = report.order_state
        order.price = report.price
        order.quantity = report.quantity
        order.filled_quantity = report.cumulative_quantity
        order.remaining_quantity = report.remaining_quantity
        order.average_price = report.average_price
        order.filled_quote_quantity = report.cumulative_quote_quantity
        if report.cancel_reason:
            order.cancel_reason = report.cancel_reason
        if report.reject_reason:
            order.reject_reason = report.reject_reason
        if report.HasField("event_time"):
            order.update_time.CopyFrom(report.event_time)
        self.orders[report.order_id] = order

    def _merge(self, order: order_pb2.Order) -> bool:
        """Take the exchange's view of an order unless it is older than the known one."""
        known = self.orders.get(order.order_id)
        if known is not None:
            if known.state in TERMINAL_STATES and order.state not in TERMINAL_STATES:
                return False
            if known.version and order.version and order.version < known.version:
                return False
            if _decimal(order.filled_quantity) < _decimal(known.filled_quantity):
                return False
            if _view(known) == _view(order):
                if order.version > known.version:
                    self.orders[order.order_id] = order
                return False
        self.orders[order.order_id] = order
        return True

    async def _reconcile(self, cause: str) -> None:
        """Fetch the orders that may have changed unseen; emit what differs."""
        self.reconciliations += 1
        fetched: dict[str, order_pb2.Order] = {}
        for market in self.markets or ("",):
            async for order in self._client.orders.iter_orders(
                status=order_pb2.ORDER_STATUS_FILTER_OPEN, market=market
            ):
                fetched[order.order_id] = order
        for order_id, known in list(self.orders.items()):
            if known.state in WORKING_STATES and order_id not in fetched:
                with contextlib.suppress(NotFoundError):
                    fetched[order_id] = await self._client.orders.get(order_id)
        for order in fetched.values():
            previous = self.orders.get(order.order_id)
            snapshot = order_pb2.Order()
            if previous is not None:
                snapshot.CopyFrom(previous)
            if self._merge(order):
                self._events.put_nowait(
                    Reconciled(order, snapshot if previous is not None else None, cause)
                )


def _view(order: order_pb2.Order) -> tuple[object, ...]:
    return (
        order.state,
        _decimal(order.filled_quantity),
        _decimal(order.remaining_quantity),
        order.price,
        _decimal(order.quantity),
    )
