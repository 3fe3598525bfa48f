"""Fan-out of committed events to JetStream, one market at a time.

Subject ``match.events.<market>``, one message per event (a serialized
``MatchEvent``), ``Nats-Msg-Id: <market>:<seq>``, and the W3C trace context (``traceparent``) of
the command's span when the command was traced. The publisher starts from
the last event the stream holds for the market and follows the writer's
committed sequence, so events lost by a crash of this process, or by
JetStream itself, are published again with the same sequence numbers. It
never blocks the writer: the journal is the source of truth and a consumer
that sees a gap reads it through ReplayEvents.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from cex.match.v1 import match_pb2
from services.chassis import ensure_stream

from .writer import MarketWriter

__all__ = ["STREAM", "Publisher", "subject"]

STREAM = "MATCH_EVENTS"
_log = logging.getLogger("cex.match.publisher")
_BACKOFF_MAX_S = 2.0
UNPUBLISHED = Gauge(
    "match_journal_unpublished_events",
    "Journaled events not yet published to JetStream (committed seq - published seq).",
    ("market",),
)


def subject(market: str) -> str:
    return f"match.events.{market}"


class Publisher:
    def __init__(self, js: JetStreamContext, writer: MarketWriter) -> None:
        self._js = js
        self._writer = writer
        self._subject = subject(writer.market.symbol)
        self.published_seq = 0
        UNPUBLISHED.labels(writer.market.symbol).set_function(
            lambda: max(writer.committed_seq - self.published_seq, 0)
        )

    @staticmethod
    async def ensure_stream(js: JetStreamContext) -> None:
        await ensure_stream(js, STREAM, ["match.events.>"])

    async def _stream_tail(self) -> int:
        try:
            last = await self._js.get_last_msg(STREAM, self._subject)
        except NotFoundError:
            return 0
        return match_pb2.MatchEvent.FromString(last.data or b"").seq

    async def run(self) -> None:
        writer = self._writer
        market = writer.market.symbol
        delay = 0.1
        tail_known = False
        while True:
            try:
                if not tail_known:
                    self.published_seq = min(await self._stream_tail(), writer.committed_seq)
                    tail_known = True
                await writer.wait_beyond(self.published_seq)
                events = await writer.events(self.published_seq + 1, writer.committed_seq)
                traced = writer.trace_of  # the command's trace context rides with its events
                acks = [
                    await self._js.publish_async(
                        self._subject,
                        event.SerializeToString(),
                        headers={
                            "Nats-Msg-Id": f"{market}:{event.seq}",
                            **traced.get(event.command_seq, {}),
                        },
                    )
                    for event in events
                ]
                for event, ack in zip(events, acks, strict=True):
                    await ack
                    self.published_seq = event.seq
                while traced and (oldest := next(iter(traced))) <= events[-1].command_seq:
                    del traced[oldest]
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning(
                    "publishing %s failed at seq %s: %s", market, self.published_seq + 1, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
