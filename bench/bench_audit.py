"""make bench-audit: how long the ledger's audit takes as its history grows.

Starts PostgreSQL alone (the stack's embedded one, `services=False`), migrates
the ledger's schema into a fresh database and writes a synthetic history
straight into its tables with SQL (faster than through the writer, and the
same rows): `--accounts` user accounts funded from `sys:custody`, then
single-phase transfers between random accounts and a few open holds, with the
accounts' columns set to what those transfers sum to. For each history size
(`--sizes`, cumulative) it times:

- `first`: an audit of the whole ledger as it stands (before checkpoints:
  every audit; with them: the audit that writes the first checkpoint);
- `next`: after `--new` more transfers, the next audit (with checkpoints it
  replays only those; without, everything again).

Reported per row: the history, the seconds each audit took, and, where the
auditor says, how many transfers the `next` audit read (replayed after its
checkpoint + older ones hashed again). Every audit must be balanced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis.db import migrate
from services.ledger.auditor import run_audit
from services.ledger.store import MIGRATIONS

# Single-phase transfers (op 1, state 2 posted) between random user accounts,
# numbered after the current last sequence; amounts small enough that nobody
# goes negative from a balance of 10^12.
_HISTORY = """
INSERT INTO transfers (id, sequence, op, debit_account_id, credit_account_id, asset, amount,
                       linked, kind, reference, state, fingerprint, create_time)
SELECT 'h' || s, s, 1, 'u' || (s * 7919 % $3), 'u' || ((s * 7919 + 1 + s % 5) % $3), 'USDT',
       1 + s % 100, false, 6, '', 2, '', now()
FROM generate_series($1::bigint + 1, $1::bigint + $2) AS s"""

_HOLDS = """
INSERT INTO transfers (id, sequence, op, debit_account_id, credit_account_id, asset, amount,
                       linked, kind, reference, state, remaining, fingerprint, create_time)
SELECT 'hold' || s, s, 2, 'u' || (s % $3), 'sys:orders', 'USDT', 50, false, 4, '', 1, 50, '', now()
FROM generate_series($1::bigint + 1, $1::bigint + $2) AS s"""

# The accounts' columns as the transfers sum them (what the writer keeps).
_ACCOUNTS = """
WITH e AS (
    SELECT debit_account_id AS a, asset,
           CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END AS dp, 0::bigint AS cp,
           CASE WHEN op = 2 AND state = 1 THEN remaining ELSE 0 END AS dpe, 0::bigint AS cpe
    FROM transfers
    UNION ALL
    SELECT credit_account_id, asset, 0, CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END,
           0, CASE WHEN op = 2 AND state = 1 THEN remaining ELSE 0 END
    FROM transfers
)
INSERT INTO accounts (account_id, asset, is_system, debits_posted, credits_posted,
                      debits_pending, credits_pending)
SELECT a, asset, a LIKE 'sys:%', sum(dp), sum(cp), sum(dpe), sum(cpe) FROM e GROUP BY a, asset
ON CONFLICT (account_id, asset) DO UPDATE SET
    debits_posted = excluded.debits_posted, credits_posted = excluded.credits_posted,
    debits_pending = excluded.debits_pending, credits_pending = excluded.credits_pending"""

_DELTA = """
WITH e AS (
    SELECT debit_account_id AS a, asset, amount AS dp, 0::bigint AS cp FROM transfers
    WHERE sequence > $1
    UNION ALL
    SELECT credit_account_id, asset, 0, amount FROM transfers WHERE sequence > $1
), d AS (SELECT a, asset, sum(dp) AS dp, sum(cp) AS cp FROM e GROUP BY a, asset)
UPDATE accounts SET debits_posted = debits_posted + d.dp, credits_posted = credits_posted + d.cp
FROM d WHERE accounts.account_id = d.a AND accounts.asset = d.asset"""


async def _append(conn: asyncpg.Connection, count: int, accounts: int) -> None:
    """`count` more transfers, the accounts' columns moved by them, in one commit."""
    async with conn.transaction():
        last = await conn.fetchval("SELECT last_sequence FROM meta")
        await conn.execute(_HISTORY, last, count, accounts)
        await conn.execute(_DELTA, last)
        await conn.execute("UPDATE meta SET last_sequence = $1", last + count)


async def _audit(pool: asyncpg.Pool) -> tuple[float, str | None]:
    began = time.perf_counter()
    report = await run_audit(pool)
    elapsed = time.perf_counter() - began
    assert report.balanced, report
    replayed = getattr(report, "transfers_replayed", None)  # None: before checkpoints
    if replayed is None:
        return elapsed, None
    return elapsed, f"{replayed:,} + {report.transfers_reverified:,}"


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), free_ports(), env, services=False)
        await stack.start()
        try:
            name = f"bench_audit_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(stack.admin_database_url)
            await admin.execute(f"CREATE DATABASE {name}")
            await admin.close()
            url = stack.database_url.rsplit("/", 1)[0] + f"/{name}"
            conn = await asyncpg.connect(url)
            await migrate(conn, "ledger", MIGRATIONS)
            await conn.execute("SET search_path TO ledger")
            # Funding, a few open holds, the accounts' columns: the history's start.
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO transfers (id, sequence, op, debit_account_id,
                           credit_account_id, asset, amount, linked, kind, reference, state,
                           fingerprint, create_time)
                       SELECT 'f' || s, s, 1, 'sys:custody', 'u' || (s - 1), 'USDT',
                              1000000000000, false, 1, '', 2, '', now()
                       FROM generate_series(1, $1::bigint) AS s""",
                    args.accounts,
                )
                await conn.execute(_HOLDS, args.accounts, args.holds, args.accounts)
                await conn.execute(_ACCOUNTS)
                await conn.execute("UPDATE meta SET last_sequence = $1", args.accounts + args.holds)
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=2, server_settings={"search_path": "ledger"}
            )
            assert pool is not None
            print(
                f"{args.accounts} accounts, {args.holds} open holds, "
                f"{args.new} new transfers before each `next` audit"
            )
            print(
                "| transfers in history | first audit s | next audit s"
                " | read by next (replayed + reverified) |"
            )
            print("|---:|---:|---:|---:|")
            history = args.accounts + args.holds
            try:
                for size in args.sizes:
                    if size > history:
                        began = time.perf_counter()
                        for _ in range((size - history + 99_999) // 100_000):
                            step = min(100_000, size - history)
                            await _append(conn, step, args.accounts)
                            history += step
                        await conn.execute("VACUUM ANALYZE")
                        took = time.perf_counter() - began
                        print(f"  (wrote history up to {history} in {took:.1f} s)")
                    first, _ = await _audit(pool)
                    await _append(conn, args.new, args.accounts)
                    history += args.new
                    following, read = await _audit(pool)
                    print(
                        f"| {history:,} | {first:.3f} | {following:.3f} | "
                        f"{'-' if read is None else read} |"
                    )
            finally:
                await pool.close()
                await conn.close()
        finally:
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--holds", type=int, default=1_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    asyncio.run(main(parser.parse_args()))
