"""NATS / JetStream connections.

JetStream carries events for fan-out; it is never the only copy of anything
that moves money (see ARCHITECTURE.md), so streams here are conveniences that
consumers may lose and rebuild from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from cex.match.v1 import match_pb2

from .telemetry import JETSTREAM_PENDING, JETSTREAM_REDELIVERED, JETSTREAM_UNDECODABLE
from .tracing import SpanKind, batch_span, message_context

__all__ = [
    "Outbox",
    "PullConsumer",
    "ensure_stream",
    "match_event_consumer",
    "match_events",
    "nats_connection",
    "observe_fetch",
]

_log = logging.getLogger("cex.bus")

T = TypeVar("T")


@contextlib.asynccontextmanager
async def nats_connection(
    url: str, *, name: str, on_reconnect: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[Client]:
    """A client that reconnects forever; `on_reconnect` runs after each reconnect
    (core subscriptions miss what was published meanwhile: catch up there)."""

    async def on_error(error: Exception) -> None:
        _log.warning("nats error: %s", error)

    options: dict[str, Any] = {"reconnected_cb": on_reconnect} if on_reconnect else {}
    client = await nats.connect(
        url,
        name=f"cex-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        **options,
    )
    try:
        yield client
    finally:
        await client.drain()


def match_events(data: bytes) -> Sequence[match_pb2.MatchEvent]:
    """The events of one message on `match.events.<market>` (an EventBatch: one
    journal commit of one market); for PullConsumer(decode=..., unbatch=True)."""
    return match_pb2.EventBatch.FromString(data).events


def observe_fetch(stream: str, consumer: str, messages: Sequence[Msg]) -> None:
    """Consumer lag and redeliveries from a fetched batch's own metadata (no extra
    round trip): jetstream_consumer_pending, jetstream_consumer_redelivered_total."""
    if not messages:
        return
    redelivered = sum(1 for m in messages if _num_delivered(m) > 1)
    if redelivered:
        JETSTREAM_REDELIVERED.labels(stream, consumer).inc(redelivered)
    JETSTREAM_PENDING.labels(stream, consumer).set(messages[-1].metadata.num_pending or 0)


_V1_ACK_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>


def _num_delivered(message: Msg) -> int:
    """How many times JetStream delivered the message, read from its reply subject as
    nats-py's `Msg.metadata` does, without building that (a datetime and two
    dataclasses per message: 6 % of risk's CPU under load, py-spy, for one number)."""
    tokens = (message.reply or "").split(".")
    if len(tokens) == _V1_ACK_TOKENS:
        return int(tokens[4])
    if len(tokens) > Msg.Ack.NumDelivered:
        return int(tokens[Msg.Ack.NumDelivered])
    return message.metadata.num_delivered  # not a JetStream reply: nats-py says why


async def ensure_stream(
    js: JetStreamContext,
    name: str,
    subjects: list[str],
    *,
    max_age_s: float | None = None,
    update: bool = True,
) -> None:
    """Create the stream, or update it to this configuration (idempotent). The
    stream's owner (its publisher) updates; a consumer passes `update=False` and
    only creates it when missing, leaving the owner's settings (retention) alone."""
    config = StreamConfig(
        name=name,
        subjects=subjects,
        storage=StorageType.FILE,
        max_age=max_age_s,
        duplicate_window=120.0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        if update:
            await js.update_stream(config)


@dataclass(frozen=True)
class PullConsumer(Generic[T]):
    """A durable JetStream pull consumer: fetch a batch, decode it, hand it over, ack.

    The one loop of ledger's settlement, order's execution and kill-switch
    consumers and risk's price follower:

    - `run()` consumes until cancelled. A failure to subscribe, fetch or ack
      (NATS away) is logged once and the loop starts again after 1 s.
    - A message that `decode` refuses is a poison message: it would fail on
      every delivery and hold the consumer forever. It is logged (subject and
      stream sequence), counted in `jetstream_consumer_undecodable_total`,
      acked and skipped. That is safe for match events: ledger and order apply
      each market's events by sequence, so the next event of that market shows
      the gap and they fill it from match's ReplayEvents (the journal, not
      JetStream, is the copy that counts); risk only keeps the latest trade.
    - The decoded messages of a batch go to `handle` in stream order (inside
      the span `span`, if named) and are acked once it returned. With `unbatch`,
      `decode` gives each message's items (a list) and `handle` gets the items
      of the whole fetch, in order (match's EventBatch messages). If it raises,
      the batch is logged and not acked, so JetStream delivers it again after
      `ack_wait_s`; the loop goes on after `retry_after_s`. Handlers must
      therefore take a message twice (all of today's do: by sequence or by
      command id).
    """

    js: JetStreamContext
    stream: str
    subjects: Sequence[str]
    filter_subject: str
    durable: str
    decode: Callable[[bytes], T]
    handle: Callable[[list[Any]], Awaitable[None]]  # list[T], or T's items with `unbatch`
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    ack_wait_s: float = 30.0
    max_ack_pending: int = 20_000
    batch: int = 500
    fetch_timeout_s: float = 1.0
    span: str | None = None
    retry_after_s: float = 1.0
    log: logging.Logger = _log
    unbatch: bool = False
    # JetStream deletes the durable consumer after this long without a fetch (None:
    # never); for a consumer named per replica, which may never come back.
    inactive_threshold_s: float | None = None

    async def run(self) -> None:
        while True:
            try:
                await self._consume()
            except Exception:
                self.log.exception(
                    "consumer %s on %s stopped; restarting in 1 s", self.durable, self.stream
                )
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        await ensure_stream(self.js, self.stream, list(self.subjects), update=False)
        sub = await self.js.pull_subscribe(
            self.filter_subject,
            durable=self.durable,
            stream=self.stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=self.deliver_policy,
                ack_wait=self.ack_wait_s,
                max_ack_pending=self.max_ack_pending,
                inactive_threshold=self.inactive_threshold_s,
            ),
        )
        try:
            while True:
                try:
                    messages = await sub.fetch(self.batch, timeout=self.fetch_timeout_s)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                observe_fetch(self.stream, self.durable, messages)
                readable = await self._decode(messages)
                if readable and not await self._handled(readable):
                    await asyncio.sleep(self.retry_after_s)
                    continue
                for message, _ in readable:
                    await message.ack()
        finally:
            # An interrupted fetch leaves the subscription busy; without this the
            # connection's drain waits for it at shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 1.0)

    async def _decode(self, messages: Sequence[Msg]) -> list[tuple[Msg, T]]:
        """The messages that decode, with their values; the others are acked away."""
        readable: list[tuple[Msg, T]] = []
        for message in messages:
            try:
                readable.append((message, self.decode(message.data)))
            except Exception as error:
                self.log.error(
                    "UNDECODABLE message on %s (stream %s seq %s), skipped: %r",
                    message.subject,
                    self.stream,
                    message.metadata.sequence.stream,
                    error,
                )
                JETSTREAM_UNDECODABLE.labels(self.stream, self.durable).inc()
                await message.ack()
        return readable

    async def _handled(self, readable: list[tuple[Msg, T]]) -> bool:
        """Whether `handle` took the batch (a failure is logged; the batch comes again)."""
        span = (
            batch_span(self.span, (message_context(m) for m, _ in readable), kind=SpanKind.CONSUMER)
            if self.span
            else contextlib.nullcontext()
        )
        try:
            with span:
                values: list[Any] = [value for _, value in readable]
                if self.unbatch:
                    values = [item for items in values for item in items]
                await self.handle(values)
        except Exception:
            self.log.exception(
                "consumer %s: a batch of %d failed; it will be redelivered",
                self.durable,
                len(readable),
            )
            return False
        return True


def match_event_consumer(
    js: JetStreamContext,
    durable: str,
    handle: Callable[[list[Any]], Awaitable[None]],
    **options: Any,
) -> PullConsumer[Sequence[match_pb2.MatchEvent]]:
    """A durable consumer of every market's match events (stream MATCH_EVENTS,
    `match.events.<market>`): `handle` gets the events of each fetch in stream
    order; `options` are PullConsumer's (batch, span, ack_wait_s, log, ...)."""
    return PullConsumer(
        js=js,
        stream="MATCH_EVENTS",
        subjects=["match.events.>"],
        filter_subject="match.events.*",
        durable=durable,
        decode=match_events,
        unbatch=True,
        handle=handle,
        **options,
    )


class Outbox:
    """The loop of a transactional outbox: rows committed with the change they
    describe are published to JetStream after the commit, then marked.

    `relay()` publishes the oldest unpublished rows, marks them and returns how
    many (0: none left, or another replica holds the turn); it runs until it
    returns 0, then again after `notify()` (a change committed here) or every
    `every_s` (changes committed by other replicas, failed attempts). A crash
    between a publish and its mark publishes the rows again: consumers take a
    message twice (Nats-Msg-Id, or the row's id in the payload). Used by risk's
    kill switches and auth's account states.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subjects: list[str],
        relay: Callable[[], Awaitable[int]],
        *,
        every_s: float = 1.0,
        log: logging.Logger = _log,
    ) -> None:
        self._js = js
        self._stream = stream
        self._subjects = subjects
        self._relay = relay
        self._every = every_s
        self._log = log
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """A change was committed here: publish now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        ready = False
        while True:
            self._wake.clear()  # before publishing: a notify during it is not lost
            try:
                if not ready:
                    await ensure_stream(self._js, self._stream, self._subjects)
                    ready = True
                while await self._relay():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("outbox of %s: publish failed; retrying", self._stream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
