"""Fan-out of committed events to JetStream, one market at a time.

Subject ``match.events.<market>``, one message per round: an ``EventBatch`` of
every event committed since the last round (one journal commit when the
publisher keeps up, several when it is behind; at most a page),
``Nats-Msg-Id: <market>:<first seq>-<last seq>``, and the W3C trace context
(``traceparent``) of the first traced command in it. The publisher starts from
the last event the stream holds for the market and follows the market's
committed sequence, so events lost by a crash of this process, or by
JetStream itself, are published again with the same sequence numbers.

Every publish waits for JetStream's acknowledgement for at most
``ack_timeout_s``: an acknowledgement lost with a server that died never comes,
so a timeout (or any error) makes the publisher ask the stream for its tail
again once NATS answers, and go on from there. It never blocks the writer: the
journal is the source of truth and a consumer that sees a gap reads it through
ReplayEvents.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from cex.match.v1 import match_pb2
from services.chassis import FailedPrecondition, ensure_stream

from .writer import MarketLog

__all__ = ["STREAM", "Publisher", "subject"]

STREAM = "MATCH_EVENTS"
_log = logging.getLogger("cex.match.publisher")
_BACKOFF_MAX_S = 2.0
UNPUBLISHED = Gauge(
    "match_journal_unpublished_events",
    "Journaled events not yet published to JetStream (committed seq - published seq).",
    ("market",),
)
PUBLISHED = Counter(
    "match_published_batches_total", "EventBatch messages JetStream acknowledged.", ("market",)
)


def subject(market: str) -> str:
    return f"match.events.{market}"


class Publisher:
    def __init__(self, js: JetStreamContext, log: MarketLog, *, ack_timeout_s: float = 2.0) -> None:
        self._js = js
        self._log = log
        self._subject = subject(log.market.symbol)
        self._ack_timeout_s = ack_timeout_s
        self._published = PUBLISHED.labels(log.market.symbol)
        self.published_seq = 0
        UNPUBLISHED.labels(log.market.symbol).set_function(
            lambda: max(log.committed_seq - self.published_seq, 0)
        )

    @staticmethod
    async def ensure_stream(js: JetStreamContext, max_age_s: float | None) -> None:
        """The stream, keeping events `max_age_s` (None: forever). Older events are
        still in the journal: a consumer that was away longer reads them through
        ReplayEvents."""
        await ensure_stream(js, STREAM, ["match.events.>"], max_age_s=max_age_s)

    async def _stream_tail(self) -> int:
        """The last event seq the stream holds for this market (0: none)."""
        try:
            last = await self._js.get_last_msg(STREAM, self._subject)
        except NotFoundError:
            return 0
        events = match_pb2.EventBatch.FromString(last.data or b"").events
        return events[-1].seq if events else 0

    async def run(self) -> None:
        log = self._log
        market = log.market.symbol
        delay = 0.1
        tail_known = False
        while True:
            try:
                if not tail_known:
                    tail = await asyncio.wait_for(self._stream_tail(), self._ack_timeout_s)
                    self.published_seq = min(tail, log.committed_seq)
                    tail_known = True
                await log.wait_beyond(self.published_seq)
                events = await log.events(self.published_seq + 1, log.committed_seq)
                await self._publish(market, events)
                self.published_seq = events[-1].seq
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except FailedPrecondition as exc:
                if exc.reason != "MATCH_EVENTS_COMPACTED":
                    raise
                # The stream lost events that retention has deleted since (ADR 0013,
                # "Retention"): publish from the journal's first; readers hold
                # retention back, so none of them needs what is skipped.
                first = int(exc.metadata["first_seq"]) or log.committed_seq + 1
                _log.error("%s: events %s..%s are compacted; publishing from %s",
                           market, self.published_seq + 1, first - 1, first)  # fmt: skip
                self.published_seq = max(self.published_seq, first - 1)
            except Exception as exc:
                # The acknowledgement may be lost with the server: ask for the tail again.
                tail_known = False
                _log.warning(
                    "publishing %s failed at seq %s: %r", market, self.published_seq + 1, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _publish(self, market: str, events: list[match_pb2.MatchEvent]) -> None:
        traced = self._log.trace_of  # a traced command's context rides with its batch
        headers = {"Nats-Msg-Id": f"{market}:{events[0].seq}-{events[-1].seq}"}
        for event in events:
            if (carrier := traced.get(event.command_seq)) is not None:
                headers.update(carrier)
                break
        await self._js.publish(
            self._subject,
            match_pb2.EventBatch(events=events).SerializeToString(),
            headers=headers,
            timeout=self._ack_timeout_s,
        )
        self._published.inc()
        last_command = events[-1].command_seq
        while traced and (oldest := next(iter(traced))) <= last_command:
            del traced[oldest]
