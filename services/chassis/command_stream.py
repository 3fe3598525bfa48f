"""Commands to match's group writer over one long-lived SubmitCommands stream.

Every service that asks the writer to decide something (order's places and
cancels, the ledger's transfers) sends `match.v1.Command`s. Opening a stream
per call costs a stream set-up, its headers and its own small batch at the
writer; instead one stream stays open and the commands that wait while a
message is being written go together in the next message. The writer answers
each message with one response, its results in command order, so callers are
answered in order by a queue of what is in flight.

Failure is fast and says UNAVAILABLE with the caller's reason: a stream that
breaks fails what was sent on it and what was waiting for it (the writer may
or may not have applied what was sent: every command is idempotent by its
ids, so the caller retries), and while the writer is away each new command
tries a new stream rather than waiting for one. A command not answered
within its time (the smaller of `timeout_s` and the inbound call's deadline)
fails the same way; one that timed out before it was sent is not sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import Histogram

from cex.match.v1 import match_pb2, match_pb2_grpc

from .errors import Unavailable
from .interceptors import deadline_var
from .tracing import carrier

__all__ = ["CommandStream"]

_log = logging.getLogger("cex.chassis.command_stream")

BATCH_SIZE = Histogram(
    "command_stream_batch_size",
    "Commands per SubmitCommands message on a long-lived stream to match's writer",
    ["stream"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)

_Future = asyncio.Future[match_pb2.CommandResult]


class CommandStream:
    """Commands over one long-lived SubmitCommands stream, batched, answered in order.

    `reason`: the UNAVAILABLE reason of the caller's component (e.g.
    LEDGER_UNAVAILABLE). `token`: the service token the stream opens with
    (interceptors do not reach a stream opened without a request iterator).
    `weight`: how much of a message a command takes (default 1), at most
    `max_weight` per message (a heavier command goes alone), and at most
    `max_batch` commands. Run `run()` as a background task."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        reason: str,
        name: str,
        token: Callable[[], Awaitable[str]] | None = None,
        timeout_s: float = 10.0,
        max_batch: int = 500,
        max_weight: int | None = None,
        weight: Callable[[match_pb2.Command], int] | None = None,
        reconnect_s: float = 0.2,
    ) -> None:
        self._stub = match_pb2_grpc.MatchServiceStub(channel)
        self._reason = reason
        self._token = token
        self._timeout_s = timeout_s
        self._max = max_batch
        self._max_weight = max_weight
        self._weight = weight
        self._reconnect_s = reconnect_s
        self._waiting: deque[tuple[match_pb2.Command, _Future]] = deque()
        self._wake = asyncio.Event()
        self._sizes = BATCH_SIZE.labels(name)

    async def submit(self, command: match_pb2.Command) -> match_pb2.CommandResult:
        """The command's result; Unavailable if the writer did not answer it."""
        loop = asyncio.get_running_loop()
        future: _Future = loop.create_future()
        carrier(command.trace_context)  # per command: the stream's metadata is not per call
        self._waiting.append((command, future))
        self._wake.set()
        within = self._timeout_s
        deadline = deadline_var.get()
        if deadline is not None:
            within = max(min(within, deadline - time.monotonic()), 0.001)
        # A timer rather than wait_for(shield(...)): no extra task per command.
        # A late answer finds the future done and is dropped.
        timer = loop.call_later(within, self._fail, future, "the writer did not answer in time")
        try:
            return await future
        finally:
            timer.cancel()

    def _fail(self, future: _Future, why: str) -> None:
        if not future.done():
            future.set_exception(Unavailable(self._reason, why))

    async def run(self) -> None:
        try:
            while True:
                while not self._waiting:  # a stream is opened for the next command
                    self._wake.clear()
                    await self._wake.wait()
                try:
                    await self._session()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    _log.warning("the command stream to the writer ended: %r", error)
                await asyncio.sleep(self._reconnect_s)
        finally:  # stopping: nobody waits for a stream that will not come back
            self._fail_waiting("the service is stopping")

    def _fail_waiting(self, why: str) -> None:
        while self._waiting:
            self._fail(self._waiting.popleft()[1], why)

    def _batch(self) -> list[tuple[match_pb2.Command, _Future]]:
        batch: list[tuple[match_pb2.Command, _Future]] = []
        total = 0
        while self._waiting and len(batch) < self._max:
            command, future = self._waiting[0]
            if future.done():  # timed out before it was sent: not sent
                self._waiting.popleft()
                continue
            weight = self._weight(command) if self._weight else 1
            if batch and self._max_weight is not None and total + weight > self._max_weight:
                break
            total += weight
            batch.append(self._waiting.popleft())
        return batch

    async def _session(self) -> None:
        in_flight: deque[list[_Future]] = deque()
        broken = "the command stream to the writer broke"
        call: (
            grpc.aio.StreamStreamCall[
                match_pb2.SubmitCommandsRequest, match_pb2.SubmitCommandsResponse
            ]
            | None
        ) = None
        reader: asyncio.Task[None] | None = None

        async def read() -> None:
            assert call is not None
            async for response in call:
                futures = in_flight.popleft()
                for future, result in zip(futures, response.results, strict=True):
                    if not future.done():
                        future.set_result(result)

        try:
            token = await self._token() if self._token else None
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            call = self._stub.SubmitCommands(metadata=metadata)
            reader = asyncio.create_task(read())
            while not reader.done():
                batch = self._batch()
                if not batch:
                    self._wake.clear()
                    waiter = asyncio.create_task(self._wake.wait())
                    await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                in_flight.append([f for _, f in batch])
                self._sizes.observe(len(batch))
                await call.write(match_pb2.SubmitCommandsRequest(commands=[c for c, _ in batch]))
            await reader  # raises what ended the stream
            broken = "the writer ended the command stream"
        except grpc.aio.AioRpcError as error:
            broken = f"the writer is unavailable: {error.code().name} {error.details()}"
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()
            for futures in in_flight:
                for future in futures:
                    self._fail(future, broken)
            # What waits for this stream fails now rather than at its timeout:
            # while the writer is away, callers hear so at once and retry.
            self._fail_waiting(broken)
