"""PostgreSQL access for risk (schema `risk`): the source of truth for limits,
kill switches, withdrawal checks and reference prices."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc

from services.chassis import (
    AlreadyExists,
    ExchangeError,
    from_row,
    ns_from_utc,
    relay_outbox_rows,
    utc_from_ns,
)

from .domain import KillSwitch, Limits, Scope

__all__ = ["Snapshot", "Store", "StoredLimits", "body_hash"]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

DAY = timedelta(days=1)
CHANGED_CHANNEL = "risk_changed"  # NOTIFY'd in each transaction that moves change_seq


def body_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class StoredLimits:
    limits: Limits
    version: int
    update_time_ns: int
    updated_by: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the hot path reads, as of change_seq."""

    change_seq: int
    limits: dict[str, StoredLimits]  # "" = defaults
    switches: list[KillSwitch]
    prices: dict[str, tuple[int, int]]  # market -> (price_ticks, seq)


def _switch(row: asyncpg.Record) -> KillSwitch:
    return from_row(
        KillSwitch, row, scope=Scope(row["scope"]), update_time_ns=ns_from_utc(row["update_time"])
    )


async def _answered(
    conn: Connection, lock: str, digest: bytes, reused: tuple[str, str], query: str, *args: object
) -> bytes | None:
    """Under the transaction's advisory lock `lock`: the recorded answer of a request
    seen before (`query` finds its body_hash and response), None for a new one; one
    seen before with another body is ALREADY_EXISTS (`reused`: reason, message)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock)
    row = await conn.fetchrow(query, *args)
    if row is None:
        return None
    if bytes(row["body_hash"]) != digest:
        raise AlreadyExists(*reused)
    return bytes(row["response"])


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # -- reads --------------------------------------------------------------

    async def listen(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` at each change another process commits (PostgreSQL
        LISTEN on one of the pool's connections), until that connection ends."""
        ended = asyncio.Event()

        def notified(*_: object) -> None:
            on_change()

        async with self._pool.acquire() as conn:
            conn.add_termination_listener(lambda _conn: ended.set())
            await conn.add_listener(CHANGED_CHANNEL, notified)
            try:
                await ended.wait()
            finally:
                if not conn.is_closed():
                    await conn.remove_listener(CHANGED_CHANNEL, notified)

    async def change_seq(self) -> int:
        value = await self._pool.fetchval("SELECT change_seq FROM meta")
        return int(value)

    async def snapshot(self) -> Snapshot:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            seq = int(await conn.fetchval("SELECT change_seq FROM meta"))
            rows = await conn.fetch(
                "SELECT account_id, doc::text AS doc, version, updated_by, update_time FROM limits"
            )
            switches = await conn.fetch("SELECT * FROM kill_switches")
            prices = await conn.fetch("SELECT market, price_ticks, seq FROM reference_prices")
        return Snapshot(
            change_seq=seq,
            limits={
                r["account_id"]: StoredLimits(
                    Limits.from_json(r["account_id"], r["doc"]),
                    r["version"],
                    ns_from_utc(r["update_time"]),
                    r["updated_by"],
                )
                for r in rows
            },
            switches=[_switch(r) for r in switches],
            prices={r["market"]: (r["price_ticks"], r["seq"]) for r in prices},
        )

    async def prices(self) -> dict[str, tuple[int, int]]:
        rows = await self._pool.fetch("SELECT market, price_ticks, seq FROM reference_prices")
        return {r["market"]: (r["price_ticks"], r["seq"]) for r in rows}

    async def kill_switches(self) -> list[KillSwitch]:
        rows = await self._pool.fetch(
            "SELECT * FROM kill_switches ORDER BY scope, market, account_id"
        )
        return [_switch(r) for r in rows]

    # -- idempotent admin writes ----------------------------------------------

    async def idempotent(
        self,
        method: str,
        request_id: str,
        body: bytes,
        write: Callable[[Connection], Awaitable[bytes]],
    ) -> bytes:
        """Run `write` once per (method, request_id); a retry with the same body gets
        the first response, with another body ALREADY_EXISTS."""
        digest = body_hash(body)
        async with self._pool.acquire() as conn, conn.transaction():
            seen = await _answered(
                conn,
                f"risk.req.{method}.{request_id}",
                digest,
                (
                    "RISK_REQUEST_ID_REUSED",
                    f"request_id {request_id!r} was used with a different request",
                ),
                "SELECT body_hash, response FROM requests WHERE method = $1 AND request_id = $2",
                method,
                request_id,
            )
            if seen is not None:
                return seen
            response = await write(conn)
            await conn.execute(
                "INSERT INTO requests (method, request_id, body_hash, response) "
                "VALUES ($1, $2, $3, $4)",
                method,
                request_id,
                digest,
                response,
            )
            await conn.execute("UPDATE meta SET change_seq = change_seq + 1")
            # Delivered at the commit: every other process reloads now (state.py).
            await conn.execute("SELECT pg_notify($1, '')", CHANGED_CHANNEL)
            return response

    @staticmethod
    async def put_limits(
        conn: Connection, limits: Limits, expected_version: int, updated_by: str, now_ns: int
    ) -> StoredLimits:
        account = limits.account_id
        current = await conn.fetchval(
            "SELECT version FROM limits WHERE account_id = $1 FOR UPDATE", account
        )
        if expected_version and expected_version != (current or 0):
            raise ExchangeError(
                "RISK_VERSION_MISMATCH",
                f"limits are at version {current or 0}, not {expected_version}",
                code=grpc.StatusCode.ABORTED,
                metadata={"version": str(current or 0)},
            )
        version = (current or 0) + 1
        await conn.execute(
            """INSERT INTO limits (account_id, doc, version, updated_by, update_time)
               VALUES ($1, $2::jsonb, $3, $4, $5)
               ON CONFLICT (account_id) DO UPDATE SET doc = excluded.doc,
                   version = excluded.version, updated_by = excluded.updated_by,
                   update_time = excluded.update_time""",
            account,
            limits.to_json(),
            version,
            updated_by,
            utc_from_ns(now_ns),
        )
        return StoredLimits(limits, version, now_ns - now_ns % 1000, updated_by)

    @staticmethod
    async def put_kill_switch(
        conn: Connection, switch: KillSwitch, *, request_id: str, cancel_open_orders: bool
    ) -> None:
        when = utc_from_ns(switch.update_time_ns)
        await conn.execute(
            """INSERT INTO kill_switches (scope, market, account_id, engaged, block_withdrawals,
                   reason, updated_by, update_time)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (scope, market, account_id) DO UPDATE SET
                   engaged = excluded.engaged, block_withdrawals = excluded.block_withdrawals,
                   reason = excluded.reason, updated_by = excluded.updated_by,
                   update_time = excluded.update_time""",
            int(switch.scope),
            switch.market,
            switch.account_id,
            switch.engaged,
            switch.block_withdrawals,
            switch.reason,
            switch.updated_by,
            when,
        )
        await conn.execute(
            """INSERT INTO kill_switch_log (request_id, scope, market, account_id, engaged,
                   block_withdrawals, cancel_open_orders, reason, updated_by, update_time)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            request_id,
            int(switch.scope),
            switch.market,
            switch.account_id,
            switch.engaged,
            switch.block_withdrawals,
            cancel_open_orders,
            switch.reason,
            switch.updated_by,
            when,
        )

    async def publish_kill_switch_log(
        self,
        publish: Callable[[list[tuple[int, KillSwitch, bool, str]]], Awaitable[None]],
        limit: int = 100,
    ) -> int:
        """Hand the oldest unpublished log rows, (id, switch, cancel_open_orders,
        request_id), to `publish`, then mark them; one publisher at a time, in id order.
        A crash after publishing and before the mark publishes them again (same ids)."""

        async def log(rows: list[asyncpg.Record]) -> None:
            await publish(
                [(r["id"], _switch(r), r["cancel_open_orders"], r["request_id"]) for r in rows]
            )

        return await relay_outbox_rows(
            self._pool,
            turn="risk.outbox",
            table="kill_switch_log",
            key="id",
            publish=log,
            limit=limit,
        )

    # -- withdrawals ------------------------------------------------------------

    async def check_withdrawal(
        self,
        *,
        withdrawal_id: str,
        account_id: str,
        asset: str,
        amount: int,
        body: bytes,
        now_ns: int,
        decide: Callable[[int, int], tuple[bool, bytes]],
    ) -> bytes:
        """Under a lock per (account, asset): a known id returns its first answer; else
        `decide(day_amount, day_count)` gives (allowed, response), which is recorded."""
        digest = body_hash(body)
        async with self._pool.acquire() as conn, conn.transaction():
            seen = await _answered(
                conn,
                f"risk.wd.{account_id}.{asset}",
                digest,
                (
                    "RISK_WITHDRAWAL_ID_REUSED",
                    f"withdrawal {withdrawal_id!r} was checked with different fields",
                ),
                "SELECT body_hash, response FROM withdrawal_checks WHERE withdrawal_id = $1",
                withdrawal_id,
            )
            if seen is not None:
                return seen
            now = utc_from_ns(now_ns)
            window = await conn.fetchrow(
                """SELECT coalesce(sum(amount), 0) AS total, count(*) AS n
                   FROM withdrawal_checks
                   WHERE allowed AND account_id = $1 AND asset = $2 AND check_time > $3""",
                account_id,
                asset,
                now - DAY,
            )
            assert window is not None
            allowed, response = decide(int(window["total"]), int(window["n"]))
            await conn.execute(
                """INSERT INTO withdrawal_checks (withdrawal_id, account_id, asset, amount,
                       allowed, body_hash, response, check_time)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                withdrawal_id,
                account_id,
                asset,
                amount,
                allowed,
                digest,
                response,
                now,
            )
            return response

    # -- reference prices -------------------------------------------------------

    async def save_prices(self, prices: Sequence[tuple[str, int, int, int]]) -> None:
        """(market, price_ticks, seq, time_ns): kept only if newer than what is stored."""
        if not prices:
            return
        await self._pool.executemany(
            """INSERT INTO reference_prices (market, price_ticks, seq, trade_time)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (market) DO UPDATE SET price_ticks = excluded.price_ticks,
                   seq = excluded.seq, trade_time = excluded.trade_time
               WHERE reference_prices.seq < excluded.seq""",
            [(m, p, s, utc_from_ns(t)) for m, p, s, t in prices],
        )
