"""One relay step of an outbox table: the rows a service committed with its change,
handed to a publisher and then marked, one way for every service.

A table qualifies by a `published` boolean and a bigint sequence column (`key`),
the publishing order. One relay at a time takes a turn (a transaction-scoped
advisory lock named `turn`, so replicas do not publish the same rows side by
side); a crash after publishing and before the mark publishes the rows again
under the same sequence numbers, which is what consumers dedupe by.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

__all__ = ["relay_outbox_rows"]


async def relay_outbox_rows(
    pool: asyncpg.Pool,
    *,
    turn: str,
    table: str,
    key: str,
    publish: Callable[[list[asyncpg.Record]], Awaitable[None]],
    limit: int,
    columns: str = "*",
) -> int:
    """Hand the oldest unpublished rows of `table` (at most `limit`, in `key` order) to
    `publish`, then mark them; how many (0 when another relay has the turn)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", turn):
            return 0
        rows = await conn.fetch(
            f"SELECT {columns} FROM {table} WHERE NOT published ORDER BY {key} LIMIT $1", limit
        )
        if not rows:
            return 0
        await publish(rows)
        await conn.execute(
            f"UPDATE {table} SET published = true WHERE {key} = ANY($1::bigint[])",
            [r[key] for r in rows],
        )
        return len(rows)
