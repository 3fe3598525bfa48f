"""The group's writer driven directly, on a real PostgreSQL: what its callers do to it."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from cex.type.v1 import types_pb2 as t
from services.chassis import postgres
from services.chassis.db import Statement, migrate
from services.chassis.markets import DEFAULT_CATALOG
from services.ledger.store import MIGRATIONS as LEDGER_MIGRATIONS
from services.ledger.store import Store as LedgerStore
from services.match.engine import decode
from services.match.funds import Funds
from services.match.server import MIGRATIONS
from services.match.store import FIND, Entry, Journal
from services.match.writer import Sequencer
from tests.integration.match.match_client import limit, place

MARKET = DEFAULT_CATALOG.markets["BTC-USDT"]


async def test_a_caller_that_went_away_does_not_fail_its_batch(fresh_database_url: str) -> None:
    """A command whose caller was cancelled is still committed with its batch, and the
    others in the batch are answered: the writer does not mistake the gone caller for a
    failed commit (which made it answer UNAVAILABLE and rebuild from the journal)."""
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await migrate(conn, "ledger", LEDGER_MIGRATIONS)
    finally:
        await conn.close()
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        journal = Journal(pool, "main")
        funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
        writer = Sequencer([MARKET], journal, funds, clock=time.time_ns)
        await writer.start()
        try:
            engines = writer.engines
            commands = [
                place(f"c{i}", limit(f"o{i}", "acct", t.SIDE_BUY, "0.1", str(90 + i)))
                for i in range(3)
            ]
            futures = [writer.submit(decode(MARKET, c)) for c in commands]
            futures[1].cancel()  # its caller went away before the batch was committed
            answered = await asyncio.gather(futures[0], futures[2])
            assert [r.status.code for r in answered] == [0, 0]
            assert writer.engines is engines, "the writer rebuilt itself from the journal"
            async with writer.view(MARKET.symbol) as engine:
                assert engine.working_orders("acct") == 3  # the cancelled caller's order too
            assert await pool.fetchval("SELECT count(*) FROM journal") == 3
            later = place("c9", limit("o9", "acct", t.SIDE_BUY, "0.1", "80"))
            after = await writer.submit(decode(MARKET, later))
            assert after.status.code == 0 and after.command_seq == 4
        finally:
            await writer.stop()


async def test_the_idempotency_read_does_not_scan_the_journal(fresh_database_url: str) -> None:
    """Each batch looks its command ids and client keys up in the journal: two index
    lookups, so a batch costs the same on a long journal as on a new one."""
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        journal = Journal(pool, "main")
        statement = Statement()
        journal.append(
            statement,
            [
                Entry(i, MARKET.symbol, i, f"cmd{i}", i, b"", i, i, b"", f"acct:c{i}")
                for i in range(1, 5_001)
            ],
        )
        async with pool.acquire() as conn:
            await statement.execute(conn)
            await conn.execute("ANALYZE journal")
            plan = "\n".join(
                row[0]
                for row in await conn.fetch(
                    "EXPLAIN " + FIND, [MARKET.symbol], ["cmd7"], "main", ["acct:c9"]
                )
            )
        assert "Seq Scan" not in plan, plan
        known, by_client = await journal.find([(MARKET.symbol, "cmd7")], ["acct:c9"])
        assert known[(MARKET.symbol, "cmd7")].group_seq == 7
        assert by_client["acct:c9"].group_seq == 9
