"""The match schema in PostgreSQL: the command journal and the snapshots.

Rows belong to a writer group (``writer_group``) and are numbered by the
group's ``group_seq`` in the order its writer decided them; each row also keeps
its market's own ``command_seq`` and event range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.chassis.db import Statement

__all__ = ["FIND", "Connection", "Entry", "Journal", "Lease", "Listing", "Listings", "Snapshot"]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_ENTRY_COLUMNS = (
    "group_seq", "market", "command_seq", "command_id", "ts", "command", "first_seq", "last_seq",
    "events", "client_key",
)  # fmt: skip
_SELECT = f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM journal"
_ENTRY_TYPES = dict(
    zip(
        ("writer_group", *_ENTRY_COLUMNS),
        ("text", "int8", "text", "int8", "text", "int8", "bytea", "int8", "int8", "bytea",
         "text"),
        strict=True,
    )
)  # fmt: skip
_SNAPSHOTS_KEPT = 3
# The writer's idempotency read, once per batch: two index lookups, whatever the
# journal's length (an OR of the two scanned the whole journal: 1.1 ms at 2,000
# entries, growing with history).
FIND = (
    f"{_SELECT} JOIN unnest($1::text[], $2::text[]) AS k(market, command_id)"
    " USING (market, command_id)"
    f" UNION ALL {_SELECT} WHERE writer_group = $3"
    " AND client_key IS NOT NULL AND client_key = ANY($4::text[])"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One journaled command and the events it produced (first_seq..last_seq)."""

    group_seq: int
    market: str
    command_seq: int
    command_id: str
    ts: int
    command: bytes
    first_seq: int
    last_seq: int
    events: bytes
    client_key: str | None = None  # a place's (account, client_order_id)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole group's state after ``group_seq``."""

    group_seq: int
    state: bytes
    state_hash: str


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(*(row[c] for c in _ENTRY_COLUMNS))


class Journal:
    """One writer group's rows of the journal and its snapshots."""

    def __init__(self, pool: asyncpg.Pool, group: str) -> None:
        self._pool = pool
        self.group = group

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    def append(self, statement: Statement, entries: Sequence[Entry]) -> None:
        """A batch of entries, as writes of the writer's one-statement commit."""
        statement.insert(
            "match.journal",
            _ENTRY_TYPES,
            [(self.group, *(getattr(e, c) for c in _ENTRY_COLUMNS)) for e in entries],
        )

    async def find(
        self, keys: Sequence[tuple[str, str]], client_keys: Sequence[str] = ()
    ) -> tuple[dict[tuple[str, str], Entry], dict[str, Entry]]:
        """Entries already journaled under any of these (market, command id)s, and
        under any of these client keys (the group's places)."""
        rows = await self._pool.fetch(
            FIND,
            [market for market, _ in keys],
            [command_id for _, command_id in keys],
            self.group,
            list(client_keys),
        )
        entries = [_entry(row) for row in rows]
        return (
            {(e.market, e.command_id): e for e in entries},
            {e.client_key: e for e in entries if e.client_key},
        )

    async def after(self, group_seq: int, limit: int) -> list[Entry]:
        """Up to `limit` of the group's entries after `group_seq`, in order."""
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE writer_group = $1 AND group_seq > $2 ORDER BY group_seq LIMIT $3",
            self.group,
            group_seq,
            limit,
        )
        return [_entry(row) for row in rows]

    async def covering(self, market: str, from_seq: int, to_seq: int, limit: int) -> list[Entry]:
        """A market's entries whose events reach into from_seq..to_seq, in order."""
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE market = $1 AND last_seq >= $2 AND first_seq <= $3"
            " ORDER BY last_seq LIMIT $4",
            market,
            from_seq,
            to_seq,
            limit,
        )
        return [_entry(row) for row in rows]

    async def latest_snapshot(self) -> Snapshot | None:
        row = await self._pool.fetchrow(
            "SELECT group_seq, state, state_hash FROM snapshots"
            " WHERE writer_group = $1 ORDER BY group_seq DESC LIMIT 1",
            self.group,
        )
        return None if row is None else Snapshot(*row)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO snapshots (writer_group, group_seq, state, state_hash)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                self.group,
                snapshot.group_seq,
                snapshot.state,
                snapshot.state_hash,
            )
            await conn.execute(
                "DELETE FROM snapshots WHERE writer_group = $1 AND group_seq < ALL ("
                " SELECT group_seq FROM snapshots WHERE writer_group = $1"
                " ORDER BY group_seq DESC LIMIT $2)",
                self.group,
                _SNAPSHOTS_KEPT,
            )

    # ----------------------------------------------------------------- retention

    async def compacted_through(self) -> int:
        """The group_seq at or below which the group's rows are gone (0: none)."""
        through = await self._pool.fetchval(
            "SELECT compacted_through FROM journal_retention WHERE writer_group = $1", self.group
        )
        return int(through or 0)

    async def retention_bounds(self) -> tuple[int, int]:
        """(the oldest kept snapshot's group_seq, the last group_seq journaled); 0
        for none. Rows may only go at or below the first: any restart or standby
        replays from a snapshot at or after it."""
        row = await self._pool.fetchrow(
            "SELECT (SELECT min(group_seq) FROM snapshots WHERE writer_group = $1),"
            " (SELECT max(group_seq) FROM journal WHERE writer_group = $1)",
            self.group,
        )
        assert row is not None  # one row, always
        return int(row[0] or 0), int(row[1] or 0)

    async def reader_cursors(self, table: str, markets: Sequence[str]) -> dict[str, int] | None:
        """A projection's cursors (`table`: schema.table with (market, seq): the last
        event seq it applied per market), or None if there is no such table."""
        quoted = ".".join(f'"{part}"' for part in table.split("."))  # `order` is reserved
        if await self._pool.fetchval("SELECT to_regclass($1)", quoted) is None:
            return None
        rows = await self._pool.fetch(
            f"SELECT market, seq FROM {quoted} WHERE market = ANY($1::text[])", list(markets)
        )
        return {row["market"]: int(row["seq"]) for row in rows}

    async def first_needed(self, market: str, after_seq: int) -> int | None:
        """The group_seq of the market's first row with events after `after_seq`
        (None: no such row)."""
        found = await self._pool.fetchval(
            "SELECT group_seq FROM journal WHERE writer_group = $1 AND market = $2"
            " AND last_seq > $3 ORDER BY last_seq, group_seq LIMIT 1",
            self.group,
            market,
            after_seq,
        )
        return None if found is None else int(found)

    async def compactable(self, after: int, through: int, before_ts: int) -> list[Entry]:
        """The group's rows after `after` up to `through` journaled before `before_ts`
        (ns), in order: what a compaction of that range would delete (its archive)."""
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE writer_group = $1 AND group_seq > $2 AND group_seq <= $3"
            " AND ts < $4 ORDER BY group_seq",
            self.group,
            after,
            through,
            before_ts,
        )
        return [_entry(row) for row in rows]

    async def compact(self, after: int, through: int) -> int:
        """Delete the group's rows after `after` up to `through` and record
        `through` as compacted, in one transaction (refused, 0 deleted, unless the
        record still says `after`: a concurrent compaction went first)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO journal_retention (writer_group, compacted_through) VALUES ($1, 0)"
                " ON CONFLICT DO NOTHING",
                self.group,
            )
            moved = await conn.fetchval(
                "UPDATE journal_retention SET compacted_through = $3, update_time = now()"
                " WHERE writer_group = $1 AND compacted_through = $2 RETURNING 1",
                self.group,
                after,
                through,
            )
            if moved is None:
                return 0
            status = await conn.execute(
                "DELETE FROM journal WHERE writer_group = $1 AND group_seq > $2"
                " AND group_seq <= $3",
                self.group,
                after,
                through,
            )
        return int(status.split()[-1])

    async def first_event_seq(self, market: str) -> int:
        """The market's lowest event seq the journal still holds (0: none)."""
        found = await self._pool.fetchval(
            "SELECT first_seq FROM journal WHERE market = $1 AND last_seq >= first_seq"
            " ORDER BY last_seq LIMIT 1",
            market,
        )
        return int(found or 0)


class Lease:
    """The right to write a group, and the one connection its writer commits on.

    Session-level advisory locks (the group's, and the balance owner's: the writer
    owns every balance, so one group at a time may write until balances are split
    per group, ADR 0013) held by a connection kept for the purpose. PostgreSQL
    releases them when the session ends, the writer's process dying included, so
    a standby can take over. Because the writer commits on that same connection,
    a writer whose session has ended cannot commit: the lease is also its fence.
    """

    GROUP_HELD = "group"  # another writer of this group holds it: we are its standby
    BALANCES_HELD = "balances"  # another group owns the balances: a misconfiguration

    def __init__(self, pool: asyncpg.Pool, group: str) -> None:
        self._pool = pool
        self._keys = ((self.GROUP_HELD, "cex.match.writer", group),
                      (self.BALANCES_HELD, "cex.match.balances", ""))  # fmt: skip
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the writer's lease is not held")
        return self._conn

    @property
    def held(self) -> bool:
        if self._conn is None:
            return False
        try:
            return not self._conn.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back when its session ended
            return False

    async def take(self) -> str | None:
        """Try once: None once held, else who holds it (GROUP_HELD or BALANCES_HELD)."""
        if self.held:
            return None
        await self.release()
        conn = await self._pool.acquire()
        try:
            for holder, *key in self._keys:
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))", *key
                ):
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                    await self._pool.release(conn)
                    return holder
        except BaseException:
            await self._pool.release(conn)
            raise
        self._conn = conn
        return None

    async def release(self) -> None:
        """Give the lease up (or forget a session that has ended)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock_all()")
        with contextlib.suppress(Exception):
            await self._pool.release(conn)


# ----------------------------------------------------------------- listed markets

_LISTING_TYPES = {
    "symbol": "text", "writer_group": "text", "group_seq": "int8", "listing": "bytea",
    "ts": "int8",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Listing:
    """A market listed at runtime: the MarketListed event that announced it."""

    symbol: str
    writer_group: str
    group_seq: int
    listing: bytes  # cex.match.v1.MarketListed
    ts: int


class Listings:
    """The markets table (ADR 0018): written with the journal, read at start."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @staticmethod
    def append(statement: Statement, listings: Sequence[Listing]) -> None:
        """Listings, as writes of the writer's one-statement commit."""
        statement.insert(
            "match.markets",
            _LISTING_TYPES,
            [(x.symbol, x.writer_group, x.group_seq, x.listing, x.ts) for x in listings],
        )

    async def all(self, group: str | None = None) -> list[Listing]:
        """Every listed market (of one writer group), in the order listed."""
        rows = await self._pool.fetch(
            "SELECT symbol, writer_group, group_seq, listing, ts FROM match.markets"
            " WHERE $1::text IS NULL OR writer_group = $1 ORDER BY ts, symbol",
            group,
        )
        return [Listing(*row) for row in rows]
