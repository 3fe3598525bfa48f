"""The match schema in PostgreSQL: the command journal and the snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

__all__ = ["Entry", "Journal", "Snapshot"]

_ENTRY_COLUMNS = ("command_seq", "command_id", "ts", "command", "first_seq", "last_seq", "events")
_SNAPSHOTS_KEPT = 3


@dataclass(frozen=True, slots=True)
class Entry:
    """One journaled command and the events it produced (first_seq..last_seq)."""

    command_seq: int
    command_id: str
    ts: int
    command: bytes
    first_seq: int
    last_seq: int
    events: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    command_seq: int
    seq: int
    state: bytes
    state_hash: str


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(*(row[c] for c in _ENTRY_COLUMNS))


class Journal:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def append(self, market: str, entries: Sequence[Entry]) -> None:
        """Write a batch of entries in one transaction (the group commit)."""
        records = [(market, *(getattr(e, c) for c in _ENTRY_COLUMNS)) for e in entries]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table(
                "journal", schema_name="match", columns=("market", *_ENTRY_COLUMNS), records=records
            )

    async def find(self, market: str, command_ids: Sequence[str]) -> dict[str, Entry]:
        """Entries already journaled under any of these command ids."""
        rows = await self._pool.fetch(
            f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM journal"
            " WHERE market = $1 AND command_id = ANY($2::text[])",
            market,
            list(command_ids),
        )
        return {row["command_id"]: _entry(row) for row in rows}

    async def after(self, market: str, command_seq: int, limit: int) -> list[Entry]:
        """Up to `limit` entries after `command_seq`, in order."""
        rows = await self._pool.fetch(
            f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM journal"
            " WHERE market = $1 AND command_seq > $2 ORDER BY command_seq LIMIT $3",
            market,
            command_seq,
            limit,
        )
        return [_entry(row) for row in rows]

    async def covering(self, market: str, from_seq: int, to_seq: int, limit: int) -> list[Entry]:
        """Entries whose events reach into from_seq..to_seq, in order."""
        rows = await self._pool.fetch(
            f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM journal"
            " WHERE market = $1 AND last_seq >= $2 AND first_seq <= $3"
            " ORDER BY last_seq LIMIT $4",
            market,
            from_seq,
            to_seq,
            limit,
        )
        return [_entry(row) for row in rows]

    async def latest_snapshot(self, market: str) -> Snapshot | None:
        row = await self._pool.fetchrow(
            "SELECT command_seq, seq, state, state_hash FROM snapshots"
            " WHERE market = $1 ORDER BY command_seq DESC LIMIT 1",
            market,
        )
        return None if row is None else Snapshot(*row)

    async def save_snapshot(self, market: str, snapshot: Snapshot) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO snapshots (market, command_seq, seq, state, state_hash)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                market,
                snapshot.command_seq,
                snapshot.seq,
                snapshot.state,
                snapshot.state_hash,
            )
            await conn.execute(
                "DELETE FROM snapshots WHERE market = $1 AND command_seq < ALL ("
                " SELECT command_seq FROM snapshots WHERE market = $1"
                " ORDER BY command_seq DESC LIMIT $2)",
                market,
                _SNAPSHOTS_KEPT,
            )

    @contextlib.asynccontextmanager
    async def ownership(self, market: str, *, wait_s: float) -> AsyncIterator[bool]:
        """Hold the market's writer lock for the block, if it can be had within `wait_s`.

        A session-level advisory lock on a connection kept for the purpose: it
        is released when this process stops or dies (PostgreSQL ends the
        session), so a restarted or standby replica can take the market over.
        """
        key = ("SELECT {}(hashtext('cex.match.writer'), hashtext($1))").format
        async with self._pool.acquire() as conn:
            deadline = time.monotonic() + wait_s
            while not (owned := await conn.fetchval(key("pg_try_advisory_lock"), market)):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
            try:
                yield bool(owned)
            finally:
                if owned:
                    await conn.execute(key("pg_advisory_unlock"), market)
