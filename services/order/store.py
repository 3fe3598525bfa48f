"""The order service's tables (schema `order`), through asyncpg."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.chassis.where import Where

from .domain import WORKING, Execution, OrderRecord

__all__ = ["FillRow", "OrderQuery", "Store"]

_COLUMNS = [f.name for f in fields(OrderRecord)]
_TYPES = {
    "side": "smallint",
    "type": "smallint",
    "time_in_force": "smallint",
    "self_trade_prevention": "smallint",
    "state": "smallint",
    "cancel_reason": "smallint",
    "price": "numeric",
    "stop_price": "numeric",
    "quantity": "numeric",
    "quote_quantity": "numeric",
    "protection_price": "numeric",
    "filled_quantity": "numeric",
    "filled_quote_quantity": "numeric",
    "cumulative_fee": "numeric",
    "remaining_quantity": "numeric",
    "post_only": "boolean",
    "expire_time": "timestamptz",
    "create_time": "timestamptz",
    "update_time": "timestamptz",
    "trigger_time": "timestamptz",
    "hold_amount": "bigint",
    "version": "bigint",
    "last_seq": "bigint",
    "reject_code": "integer",
}
_INSERT_MANY = (
    f"INSERT INTO orders ({', '.join(_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i + 1}::{_TYPES.get(c, 'text')}[]" for i, c in enumerate(_COLUMNS))
    + ") ON CONFLICT (account_id, client_order_id) DO NOTHING"
)
# What the consumer changes when it applies events.
_EVENT_COLUMNS = [
    "price",
    "quantity",
    "state",
    "filled_quantity",
    "filled_quote_quantity",
    "cumulative_fee",
    "fee_asset",
    "remaining_quantity",
    "reject_reason",
    "reject_code",
    "reject_message",
    "reject_domain",
    "cancel_reason",
    "update_time",
    "trigger_time",
    "version",
    "last_seq",
]
_UPDATE = (
    "UPDATE orders SET "
    + ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(_EVENT_COLUMNS))
    + " WHERE order_id = $1"
)
_WORKING_SQL = "(" + ", ".join(str(int(s)) for s in sorted(WORKING)) + ")"
_FILL_COLUMNS = (
    "order_id, trade_id, market, account_id, client_order_id, side, price, quantity, "
    "quote_quantity, fee, fee_asset, liquidity, trade_time, seq"
)


def _record(row: asyncpg.Record) -> OrderRecord:
    return OrderRecord(**{name: row[name] for name in _COLUMNS})


@dataclass(frozen=True, slots=True)
class OrderQuery:
    account_id: str
    working: bool | None  # True: working only; False: closed only; None: all
    market: str = ""
    side: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    after: tuple[datetime, str] | None = None  # keyset: (create_time, order_id) of the last row
    limit: int = 100


@dataclass(frozen=True, slots=True)
class FillRow:
    order_id: str
    trade_id: str
    market: str
    account_id: str
    client_order_id: str
    side: int
    price: Decimal
    quantity: Decimal
    quote_quantity: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: int
    trade_time: datetime
    seq: int


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- orders ----------------------------------------------------------------

    async def get(self, order_id: str) -> OrderRecord | None:
        row = await self.pool.fetchrow("SELECT * FROM orders WHERE order_id = $1", order_id)
        return _record(row) if row else None

    async def get_many(self, order_ids: Sequence[str]) -> list[OrderRecord | None]:
        """`get` for many at once (one query), in order."""
        if len(order_ids) == 1:
            return [await self.get(order_ids[0])]
        rows = await self.pool.fetch(
            "SELECT * FROM orders WHERE order_id = ANY($1::text[])", list(set(order_ids))
        )
        found = {r["order_id"]: _record(r) for r in rows}
        return [found.get(order_id) for order_id in order_ids]

    async def by_client_id_many(self, keys: Sequence[tuple[str, str]]) -> list[OrderRecord | None]:
        """`by_client_id` for many (account_id, client_order_id) at once, in order."""
        if len(keys) == 1:
            return [await self.by_client_id(*keys[0])]
        rows = await self.pool.fetch(
            "SELECT o.* FROM unnest($1::text[], $2::text[]) AS q(account_id, client_order_id) "
            "JOIN orders o ON o.account_id = q.account_id "
            "AND o.client_order_id = q.client_order_id",
            [a for a, _ in keys],
            [c for _, c in keys],
        )
        found = {(r["account_id"], r["client_order_id"]): _record(r) for r in rows}
        return [found.get(key) for key in keys]

    async def by_client_id(self, account_id: str, client_order_id: str) -> OrderRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM orders WHERE account_id = $1 AND client_order_id = $2",
            account_id,
            client_order_id,
        )
        return _record(row) if row else None

    async def working(
        self, account_id: str, market: str = "", side: int = 0, session_id: str = ""
    ) -> list[OrderRecord]:
        where = Where(f"account_id = $1 AND state IN {_WORKING_SQL}", account_id)
        where.compare("market", "=", market or None)
        where.compare("side", "=", side or None)
        where.compare("session_id", "=", session_id or None)
        rows = await self.pool.fetch(f"SELECT * FROM orders{where.sql}", *where.args)
        return [_record(r) for r in rows]

    async def accounts_working(self, market: str = "") -> list[str]:
        """Accounts with working orders (in `market`, or anywhere)."""
        sql = f"SELECT DISTINCT account_id FROM orders WHERE state IN {_WORKING_SQL}"
        rows = await (
            self.pool.fetch(sql + " AND market = $1", market) if market else self.pool.fetch(sql)
        )
        return [r["account_id"] for r in rows]

    async def query(self, q: OrderQuery) -> list[OrderRecord]:
        where = Where("account_id = $1", q.account_id)
        if q.working is True:
            where.add(f"state IN {_WORKING_SQL}")
        elif q.working is False:
            where.add(f"state NOT IN {_WORKING_SQL}")
        where.compare("market", "=", q.market or None)
        where.compare("side", "=", q.side or None)
        where.compare("create_time", ">=", q.start_time)
        where.compare("create_time", "<", q.end_time)
        where.after("create_time, order_id", q.after)
        sql = (
            f"SELECT * FROM orders{where.sql}"
            f" ORDER BY create_time DESC, order_id DESC LIMIT {where.arg(q.limit)}"
        )
        return [_record(r) for r in await self.pool.fetch(sql, *where.args)]

    async def fills(
        self,
        account_id: str,
        *,
        market: str = "",
        order_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        after: tuple[datetime, int, str] | None = None,
        limit: int = 100,
    ) -> list[FillRow]:
        where = Where("account_id = $1", account_id)
        where.compare("market", "=", market or None)
        where.compare("order_id", "=", order_id or None)
        where.compare("trade_time", ">=", start_time)
        where.compare("trade_time", "<", end_time)
        where.after("trade_time, seq, order_id", after)
        sql = (
            f"SELECT {_FILL_COLUMNS} FROM fills{where.sql}"
            f" ORDER BY trade_time DESC, seq DESC, order_id DESC LIMIT {where.arg(limit)}"
        )
        return [FillRow(**dict(r)) for r in await self.pool.fetch(sql, *where.args)]

    async def traded_volumes(
        self, start_time: datetime, markets: list[str], *, after: str, limit: int
    ) -> list[tuple[str, Decimal]]:
        """Each account's sum of the quote amounts of its fills in `markets` since
        `start_time`, by account after `after` (auth's fee tiers by volume)."""
        rows = await self.pool.fetch(
            """SELECT account_id, sum(quote_quantity) AS volume FROM fills
               WHERE trade_time >= $1 AND market = ANY($2::text[]) AND account_id > $3
               GROUP BY account_id ORDER BY account_id LIMIT $4""",
            start_time,
            markets,
            after,
            limit,
        )
        return [(r["account_id"], r["volume"]) for r in rows]

    # -- the consumer ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def market_batch(self, market: str) -> AsyncIterator[MarketBatch]:
        """One transaction over one market's events: the cursor row is locked."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO market_cursors (market, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                market,
            )
            cursor = await conn.fetchval(
                "SELECT seq FROM market_cursors WHERE market = $1 FOR UPDATE", market
            )
            yield MarketBatch(conn, market, int(cursor))

    async def cursor(self, market: str) -> int:
        value = await self.pool.fetchval("SELECT seq FROM market_cursors WHERE market = $1", market)
        return int(value or 0)

    # -- idempotent requests ---------------------------------------------------

    async def request(self, account_id: str, request_id: str) -> tuple[str, str, bytes] | None:
        row = await self.pool.fetchrow(
            "SELECT kind, fingerprint, response FROM requests "
            "WHERE account_id = $1 AND request_id = $2",
            account_id,
            request_id,
        )
        return (row["kind"], row["fingerprint"], bytes(row["response"])) if row else None

    async def request_many(
        self, keys: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str, bytes] | None]:
        """`request` for many (account_id, request_id) at once, in order."""
        if len(keys) == 1:
            return [await self.request(*keys[0])]
        rows = await self.pool.fetch(
            "SELECT r.account_id, r.request_id, r.kind, r.fingerprint, r.response "
            "FROM unnest($1::text[], $2::text[]) AS q(account_id, request_id) "
            "JOIN requests r ON r.account_id = q.account_id AND r.request_id = q.request_id",
            [a for a, _ in keys],
            [r for _, r in keys],
        )
        found = {
            (r["account_id"], r["request_id"]): (r["kind"], r["fingerprint"], bytes(r["response"]))
            for r in rows
        }
        return [found.get(key) for key in keys]

    async def remember_many(self, rows: Sequence[tuple[str, str, str, str, bytes]]) -> list[None]:
        """`remember` for many (account_id, request_id, kind, fingerprint, response)."""
        if len(rows) == 1:
            await self.remember(*rows[0])
            return [None]
        await self.pool.execute(
            "INSERT INTO requests (account_id, request_id, kind, fingerprint, response) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[]) "
            "ON CONFLICT DO NOTHING",
            *(list(column) for column in zip(*rows, strict=True)),
        )
        return [None] * len(rows)

    async def remember(
        self, account_id: str, request_id: str, kind: str, fingerprint: str, response: bytes
    ) -> None:
        await self.pool.execute(
            "INSERT INTO requests (account_id, request_id, kind, fingerprint, response) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            account_id,
            request_id,
            kind,
            fingerprint,
            response,
        )

    # -- sessions and the dead man's switch -----------------------------------

    async def renew_lease(self, owner: str, lease_s: float) -> None:
        """This process's lease on the sessions it holds, until now + lease_s (the
        database's clock: one clock for every replica)."""
        await self.pool.execute(
            "INSERT INTO replicas (owner, lease_until) "
            "VALUES ($1, now() + make_interval(secs => $2)) "
            "ON CONFLICT (owner) DO UPDATE SET lease_until = EXCLUDED.lease_until",
            owner,
            lease_s,
        )

    async def open_session(
        self,
        session_id: str,
        account_id: str,
        cancel: bool,
        markets: Sequence[str] = (),
        owner: str | None = None,
    ) -> None:
        await self.pool.execute(
            "INSERT INTO sessions (session_id, account_id, cancel_on_disconnect, markets, owner) "
            "VALUES ($1, $2, $3, $4, $5)",
            session_id,
            account_id,
            cancel,
            list(markets),
            owner,
        )

    async def resume_session(
        self, session_id: str, account_id: str, owner: str, cancel: bool, after: int
    ) -> tuple[str, list[str]]:
        """Attach a detached session to `owner` if its reports after `after` are all
        kept. Returns (outcome, markets): "resumed", "unknown" (no such open session
        of the account, or reports gone), "ahead" (after > its last sequence),
        "attached" (a live process holds it) or "detaching" (its holder died and
        nobody has cancelled and detached it yet)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT s.owner, s.last_sequence, s.markets, "
                "  (SELECT r.lease_until > now() FROM replicas r WHERE r.owner = s.owner) AS live, "
                "  (SELECT min(sequence) FROM session_reports p WHERE p.session_id = s.session_id) "
                "    AS oldest "
                "FROM sessions s WHERE session_id = $1 AND account_id = $2 AND open FOR UPDATE",
                session_id,
                account_id,
            )
            if row is None:
                return "unknown", []
            if row["owner"] is not None:
                return ("attached" if row["live"] else "detaching"), []
            if after > row["last_sequence"]:
                return "ahead", []
            if after < row["last_sequence"] and (row["oldest"] or 0) > after + 1:
                return "unknown", []  # what it missed is no longer kept
            await conn.execute(
                "UPDATE sessions SET owner = $2, detach_time = NULL, cancel_on_disconnect = $3 "
                "WHERE session_id = $1",
                session_id,
                owner,
                cancel,
            )
            return "resumed", list(row["markets"])

    async def detach_session(self, session_id: str, owner: str) -> None:
        """The session's stream ended (and its cancel-on-disconnect ran): resumable
        for a while, held by nobody. Only by its owner."""
        await self.pool.execute(
            "UPDATE sessions SET owner = NULL, detach_time = now() "
            "WHERE session_id = $1 AND owner = $2",
            session_id,
            owner,
        )

    async def claim_lapsed(self, owner: str) -> list[tuple[str, str, bool]]:
        """Take the open sessions whose owner's lease lapsed: (session, account,
        cancel_on_disconnect). One statement: the rows are locked in session order
        (as the consumer locks them), skipping any another claimer holds right now,
        and re-checked once locked; so when several replicas claim at once each
        session goes to one of them, and a later round finds it held under a live
        lease."""
        rows = await self.pool.fetch(
            "WITH lapsed AS ("
            "  SELECT s.session_id FROM sessions s"
            "  WHERE s.open AND s.owner IS NOT NULL AND s.owner <> $1 AND NOT EXISTS ("
            "    SELECT 1 FROM replicas r WHERE r.owner = s.owner AND r.lease_until > now())"
            "  ORDER BY s.session_id FOR UPDATE SKIP LOCKED) "
            "UPDATE sessions s SET owner = $1 FROM lapsed WHERE s.session_id = lapsed.session_id "
            "RETURNING s.session_id, s.account_id, s.cancel_on_disconnect",
            owner,
        )
        return [(r["session_id"], r["account_id"], r["cancel_on_disconnect"]) for r in rows]

    async def not_owned(self, owner: str, session_ids: Sequence[str]) -> list[str]:
        """Of these sessions, those `owner` no longer holds (another replica claimed
        them while this one could not renew its lease)."""
        rows = await self.pool.fetch(
            "SELECT session_id FROM sessions WHERE session_id = ANY($1::text[]) "
            "AND owner IS DISTINCT FROM $2",
            list(session_ids),
            owner,
        )
        return [r["session_id"] for r in rows]

    async def expire_sessions(self, resume_s: float, keep_s: float) -> None:
        """Close the sessions detached longer than resume_s, drop their reports and
        every report older than keep_s; forget sessions closed a day ago and leases
        lapsed an hour ago."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE sessions SET open = false WHERE open AND owner IS NULL "
                "AND detach_time < now() - make_interval(secs => $1)",
                resume_s,
            )
            await conn.execute(
                "DELETE FROM session_reports p USING sessions s "
                "WHERE p.session_id = s.session_id AND NOT s.open"
            )
            await conn.execute(
                "DELETE FROM session_reports WHERE create_time < now() - make_interval(secs => $1)",
                keep_s,
            )
            await conn.execute("DELETE FROM replicas WHERE lease_until < now() - interval '1 hour'")

    async def reports_after(self, after: Sequence[tuple[str, int]]) -> list[tuple[str, int, bytes]]:
        """(session, sequence, ExecutionReport bytes) after each session's sequence."""
        rows = await self.pool.fetch(
            "SELECT p.session_id, p.sequence, p.report FROM session_reports p "
            "JOIN unnest($1::text[], $2::bigint[]) AS a(session_id, after) "
            "  ON p.session_id = a.session_id AND p.sequence > a.after "
            "ORDER BY p.session_id, p.sequence",
            [a[0] for a in after],
            [a[1] for a in after],
        )
        return [(r["session_id"], r["sequence"], r["report"]) for r in rows]

    async def arm(self, account_id: str, market: str, trigger: datetime) -> None:
        await self.pool.execute(
            "INSERT INTO deadman (account_id, market, trigger_time) VALUES ($1, $2, $3) "
            "ON CONFLICT (account_id, market) DO UPDATE SET trigger_time = EXCLUDED.trigger_time",
            account_id,
            market,
            trigger,
        )

    async def disarm(self, account_id: str, market: str) -> None:
        await self.pool.execute(
            "DELETE FROM deadman WHERE account_id = $1 AND market = $2", account_id, market
        )

    async def due_switches(self, now: datetime) -> list[tuple[str, str, datetime]]:
        rows = await self.pool.fetch(
            "SELECT account_id, market, trigger_time FROM deadman WHERE trigger_time <= $1", now
        )
        return [(r["account_id"], r["market"], r["trigger_time"]) for r in rows]

    async def fire(self, account_id: str, market: str, trigger: datetime) -> bool:
        """Take a due switch (only if nobody re-armed it meanwhile)."""
        status = await self.pool.execute(
            "DELETE FROM deadman WHERE account_id = $1 AND market = $2 AND trigger_time = $3",
            account_id,
            market,
            trigger,
        )
        return bool(status == "DELETE 1")


class MarketBatch:
    """The consumer's view inside one transaction."""

    def __init__(self, conn: Any, market: str, cursor: int) -> None:
        self.conn = conn
        self.market = market
        self.cursor = cursor

    async def orders(self, order_ids: Sequence[str]) -> dict[str, OrderRecord]:
        rows = await self.conn.fetch(
            "SELECT * FROM orders WHERE order_id = ANY($1::text[]) ORDER BY order_id FOR UPDATE",
            list(order_ids),
        )
        return {r["order_id"]: _record(r) for r in rows}

    async def save(
        self,
        orders: Sequence[OrderRecord],
        executions: Sequence[Execution],
        cursor: int,
        new: Collection[str] = (),
    ) -> None:
        """Store the orders the batch changed (`new`: built from their journaled place,
        inserted whole), their executions, and the market's cursor, in one commit."""
        if inserted := [o for o in orders if o.order_id in new]:
            await self.conn.execute(
                _INSERT_MANY, *([getattr(o, c) for o in inserted] for c in _COLUMNS)
            )
        if updated := [o for o in orders if o.order_id not in new]:
            await self.conn.executemany(
                _UPDATE,
                [(o.order_id, *(getattr(o, c) for c in _EVENT_COLUMNS)) for o in updated],
            )
        fills = [
            (
                e.order.order_id,
                e.trade_id,
                e.order.market,
                e.order.account_id,
                e.order.client_order_id,
                e.order.side,
                e.fill["price"],
                e.fill["quantity"],
                e.fill["quote_quantity"],
                e.fill["fee"],
                e.fill["fee_asset"],
                e.fill["liquidity"],
                e.event_time,
                e.match_seq,
            )
            for e in executions
            if e.fill is not None
        ]
        if fills:
            await self.conn.executemany(
                f"INSERT INTO fills ({_FILL_COLUMNS}) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
                "ON CONFLICT DO NOTHING",
                fills,
            )
        await self.conn.execute(
            "UPDATE market_cursors SET seq = $2 WHERE market = $1", self.market, cursor
        )

    async def number_reports(
        self, executions: Sequence[Execution], render: Callable[[Execution, int], bytes]
    ) -> int:
        """Give each execution the next sequence of every open session of its account
        (whose markets include it) and keep the report: a session's reports are
        numbered once, here, whichever replica stores the events and whichever holds
        the session, so any replica can send them and a session resumes anywhere.
        Returns how many reports were kept."""
        accounts = sorted({e.order.account_id for e in executions})
        sessions = await self.conn.fetch(
            "SELECT session_id, account_id, markets, last_sequence FROM sessions "
            "WHERE open AND account_id = ANY($1::text[]) ORDER BY session_id FOR UPDATE",
            accounts,
        )
        if not sessions:
            return 0
        ids: list[str] = []
        sequences: list[int] = []
        reports: list[bytes] = []
        last: dict[str, int] = {}
        for session in sessions:
            markets = set(session["markets"])
            sequence = session["last_sequence"]
            for execution in executions:
                order = execution.order
                if order.account_id != session["account_id"]:
                    continue
                if markets and order.market not in markets:
                    continue
                sequence += 1
                ids.append(session["session_id"])
                sequences.append(sequence)
                reports.append(render(execution, sequence))
            if sequence != session["last_sequence"]:
                last[session["session_id"]] = sequence
        if not last:
            return 0
        await self.conn.execute(
            "INSERT INTO session_reports (session_id, sequence, report) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])",
            ids,
            sequences,
            reports,
        )
        await self.conn.execute(
            "UPDATE sessions s SET last_sequence = u.sequence "
            "FROM unnest($1::text[], $2::bigint[]) AS u(session_id, sequence) "
            "WHERE s.session_id = u.session_id",
            list(last),
            list(last.values()),
        )
        return len(reports)
