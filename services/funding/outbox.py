"""The outbox relay: events committed with the change they describe, published after.

Rows are published in id order to JetStream (stream FUNDING_EVENTS, subjects
funding.>) with Nats-Msg-Id `funding:<id>` and the writing step's `traceparent`,
then marked published, by the chassis' outbox loop. A crash
between the two publishes again (at least once; JetStream's duplicate window
drops most repeats, consumers dedupe by the id in the payload for the rest).
PostgreSQL stays the source of truth: the events are notifications.
"""

from __future__ import annotations

import json
import logging

import asyncpg
from nats.js import JetStreamContext

from services.chassis.bus import Outbox

from . import store

__all__ = ["STREAM", "OutboxRelay"]

STREAM = "FUNDING_EVENTS"
_log = logging.getLogger("cex.funding.outbox")


class OutboxRelay(Outbox):
    """Funding's events, published by the chassis' outbox loop every `poll_s`."""

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, poll_s: float) -> None:
        super().__init__(js, STREAM, ["funding.>"], self.relay_once, every_s=poll_s, log=_log)
        self._pool = pool
        self._js = js

    async def relay_once(self, limit: int = 200) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            if not await store.take_outbox_turn(conn):
                return 0
            rows = await store.unpublished(conn, limit)
            for row in rows:
                await self._js.publish(
                    row.subject,
                    json.dumps({**row.payload, "event_id": row.id}).encode(),
                    headers={
                        "Nats-Msg-Id": f"funding:{row.id}",
                        **row.trace_context,  # W3C trace context
                    },
                )
            if rows:
                await store.published(conn, [r.id for r in rows])
        return len(rows)
