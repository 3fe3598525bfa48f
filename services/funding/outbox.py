"""The outbox relay: events committed with the change they describe, published after.

Rows are published in id order to JetStream (stream FUNDING_EVENTS, subjects
funding.>) with Nats-Msg-Id `funding:<id>` and the writing step's `traceparent`,
then marked published. A crash
between the two publishes again (at least once; JetStream's duplicate window
drops most repeats, consumers dedupe by the id in the payload for the rest).
PostgreSQL stays the source of truth: the events are notifications.
"""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
from nats.js import JetStreamContext

from services.chassis import ensure_stream

from . import store

__all__ = ["STREAM", "OutboxRelay"]

STREAM = "FUNDING_EVENTS"
_log = logging.getLogger("cex.funding.outbox")


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, poll_s: float) -> None:
        self._pool = pool
        self._js = js
        self._poll_s = poll_s
        self._ready = False

    async def run(self) -> None:
        while True:
            try:
                if not self._ready:
                    await ensure_stream(self._js, STREAM, ["funding.>"])
                    self._ready = True
                if await self.relay_once():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.warning("outbox relay failed", exc_info=True)
            await asyncio.sleep(self._poll_s)

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
