"""What the order path calls: match, whose writer reserves, matches and settles,
and the batching of order's own reads.

Match commands go over chassis' CommandStream: callers await one command
each, whatever waits while a message is written goes in the next one on a
long-lived stream. Every command carries its own idempotency id, so a
command that fails in transit is simply tried again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Generic, TypeVar

import grpc
from google.rpc import status_pb2
from prometheus_client import Histogram

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t
from services.chassis import ErrorDetails, ExchangeError, Unavailable
from services.chassis.command_stream import CommandStream
from services.chassis.money import parse_decimal
from services.chassis.tracing import Context, batch_span, current_context

__all__ = [
    "TRANSIENT",
    "Batcher",
    "MatchClient",
    "StatusError",
    "hold_id",
    "rate_usage_var",
]

_log = logging.getLogger("cex.order.downstream")
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.ABORTED.value[0],
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.CANCELLED.value[0],
        grpc.StatusCode.UNKNOWN.value[0],
        grpc.StatusCode.INTERNAL.value[0],
    }
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The caller's order rate-limit budget from the last risk check of this request,
# copied onto the response as x-cex-order-limit-1s / x-cex-order-count-1s.
rate_usage_var: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "rate_usage", default=None
)

BATCH_SIZE = Histogram(
    "order_batch_size",
    "Items per batched call (risk checks, holds, match commands, store reads and writes)",
    ["call"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)

Req = TypeVar("Req")
Res = TypeVar("Res")


def hold_id(order_id: str) -> str:
    return f"hold:{order_id}"


class StatusError(ExchangeError):
    """A downstream google.rpc.Status passed on to the client as it came."""

    def __init__(self, status: status_pb2.Status, fallback_reason: str) -> None:
        details = ErrorDetails.from_status(status)
        reason = details.reason or fallback_reason
        try:
            super().__init__(
                reason,
                details.message or reason,
                code=_CODES.get(status.code, grpc.StatusCode.FAILED_PRECONDITION),
                metadata=details.metadata,
                violations=details.violations,
                retry_after_s=details.retry_after_s,
            )
        except ValueError:  # a reason outside the model: keep ours
            super().__init__(fallback_reason, details.message, code=_CODES.get(status.code))
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status.code in TRANSIENT


def _status_of(error: grpc.RpcError, reason: str) -> status_pb2.Status:
    details = ErrorDetails.from_rpc_error(error)
    return (
        Unavailable(details.reason or reason, details.message or str(error)[:200]).to_status(
            "order"
        )
        if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        else (
            ExchangeError(
                details.reason or reason, details.message or "downstream failure", code=details.code
            ).to_status("order")
        )
    )


class Batcher(Generic[Req, Res]):
    """Coalesces concurrent single calls into batched calls, one call in flight.

    While a call is out, the items that arrive wait for it and go together in
    the next one: a lone item waits for no timer and, under load, batches grow
    rather than calls. (Up to four calls in flight for risk and the holds cost
    15-25 % more CPU per order at the knee and lowered it: the calls share the
    same cores and the same downstream; docs/benchmarks.md.)"""

    def __init__(
        self,
        call: Callable[[list[Req]], Awaitable[Sequence[Res]]],
        *,
        name: str,
        max_batch: int = 500,
    ) -> None:
        self._call = call
        self._sizes = BATCH_SIZE.labels(name)
        self._max = max_batch
        self._waiting: list[tuple[Req, asyncio.Future[Res], Context]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Semaphore(1)  # no call in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._span = f"order.batch {getattr(call, '__name__', 'call').lstrip('_')}"

    async def submit(self, item: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, current_context()))
        self._wake.set()
        return await future

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    await self._idle.acquire()
                    batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
                    task = asyncio.create_task(self._send(batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:  # stopping: nobody waits forever for a batch that will not be sent
            waiting, self._waiting = self._waiting, []
            for _, future, _ in waiting:
                if not future.done():
                    future.set_exception(
                        Unavailable("ORDER_SHUTTING_DOWN", "the order service is stopping")
                    )

    async def _send(self, batch: list[tuple[Req, asyncio.Future[Res], Context]]) -> None:
        self._sizes.observe(len(batch))
        try:
            with batch_span(self._span, (ctx for _, _, ctx in batch)):
                results = await self._call([item for item, _, _ in batch])
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except Exception as error:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._idle.release()


class MatchClient:
    """Match as order sees it: commands over the shared long-lived command stream
    (chassis' CommandStream: batched, answered in order, failing fast with
    ORDER_MATCH_UNAVAILABLE when the stream breaks), and the writer's reads."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: Callable[[], Awaitable[str]] | None = None,
        max_batch: int = 500,
    ) -> None:
        self._stub = match_pb2_grpc.MatchServiceStub(channel)
        self.commands = CommandStream(
            channel,
            reason="ORDER_MATCH_UNAVAILABLE",
            name="order",
            token=token,
            timeout_s=5.0,
            max_batch=max_batch,
        )
        self.submit = self.commands.submit
        self.run = self.commands.run

    async def best_price(self, market: str, side: int) -> Decimal | None:
        """The best price on the side a `side` order would trade against."""
        try:
            reply = await self._stub.GetOrderBook(
                match_pb2.GetOrderBookRequest(market=market, depth=1), timeout=3.0
            )
        except grpc.aio.AioRpcError:
            return None
        levels = reply.book.asks if side == t.SIDE_BUY else reply.book.bids
        return parse_decimal(levels[0].price) if levels else None

    async def replay(self, market: str, from_seq: int, to_seq: int) -> list[match_pb2.MatchEvent]:
        events: list[match_pb2.MatchEvent] = []
        call = self._stub.ReplayEvents(
            match_pb2.ReplayEventsRequest(market=market, from_seq=from_seq, to_seq=to_seq),
            timeout=30.0,
        )
        async for response in call:
            events.extend(response.events)
        return events
