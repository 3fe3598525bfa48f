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
            # One relay at a time across replicas keeps the order.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('funding.outbox'))"
            ):
                return 0
            rows = await conn.fetch(
                """SELECT id, subject, payload, trace_context FROM outbox WHERE publish_time IS NULL
                   ORDER BY id LIMIT $1""",
                limit,
            )
            for row in rows:
                payload = json.loads(row["payload"])
                payload["event_id"] = row["id"]
                await self._js.publish(
                    row["subject"],
                    json.dumps(payload).encode(),
                    headers={
                        "Nats-Msg-Id": f"funding:{row['id']}",
                        **json.loads(row["trace_context"] or "{}"),  # W3C trace context
                    },
                )
            if rows:
                await conn.execute(
                    "UPDATE outbox SET publish_time = now() WHERE id = ANY($1::bigint[])",
                    [r["id"] for r in rows],
                )
        return len(rows)
