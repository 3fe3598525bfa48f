"""The auditor's checkpoints against real PostgreSQL, behind a real balance owner:
an audit reads what is new since its checkpoint (its work does not grow with
history), every invariant is still checked, and what changes behind the
ledger's back, older than the checkpoint included, is found and halts
withdrawals (ADR 0005, "Audit")."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from cex.ledger.v1 import ledger_pb2 as K
from services.ledger import auditor as auditor_module
from services.ledger.auditor import Auditor, LedgerMetrics, run_audit
from tests.integration.ledger.support import (
    Ledger,
    deposit,
    hold,
    post,
    reason,
    transfer,
)

ACCOUNTS = [f"acct-{i}" for i in range(20)]


@pytest.fixture
async def pool(ledger: Ledger) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(
        ledger.database_url, min_size=1, max_size=4, server_settings={"search_path": "ledger"}
    )
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


async def _trade(ledger: Ledger, prefix: str, count: int) -> None:
    """`count` transfers between the funded accounts, in requests of up to 1,000."""
    items = [
        transfer(
            f"{prefix}-{i}",
            ACCOUNTS[i % len(ACCOUNTS)],
            ACCOUNTS[(i * 7 + 1) % len(ACCOUNTS)],
            f"0.0{1 + i % 9}",
        )
        for i in range(count)
    ]
    for start in range(0, count, 1000):
        await ledger.ok(*items[start : start + 1000])


async def test_an_audit_reads_what_is_new_not_the_history(
    ledger: Ledger, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small checkpoints and a small re-verification budget, so a few thousand
    # transfers are "a long history" for this test.
    monkeypatch.setattr(auditor_module, "SEGMENT_SPAN", 100)
    budget = 150
    registry = CollectorRegistry()
    auditor = Auditor(pool, LedgerMetrics(registry), reverify_budget=budget)
    await ledger.ok(*(deposit(f"d-{a}", a, "1000") for a in ACCOUNTS))
    await ledger.ok(hold("h-open", "acct-0", "5"), hold("h-post", "acct-1", "5"))
    await ledger.ok(post("p-1", "h-post", "2"))
    first = await auditor.audit()
    assert first.balanced and first.checkpoint_sequence == 0
    assert first.transfers_replayed == first.sequence == len(ACCOUNTS) + 3
    assert first.checkpoint_id == 1

    history = first.sequence
    reads = []
    for round_ in range(4):
        await _trade(ledger, f"bulk{round_}", 1000)  # history grows by 1,000...
        assert (await auditor.audit()).balanced
        await _trade(ledger, f"new{round_}", 7)  # ...then 7 more before the measured audit
        history += 1007
        report = await auditor.audit()
        assert report.balanced and report.sequence == history
        assert report.checkpoint_sequence == history - 7  # from the last checkpoint...
        assert report.transfers_replayed == 7  # ...it replays only what is new
        # ...and hashes again a bounded slice of the older transfers.
        assert 0 < report.transfers_reverified < budget + 100
        assert registry.get_sample_value("ledger_audit_transfers_read", {"part": "replayed"}) == 7
        assert (
            registry.get_sample_value("ledger_audit_checkpoint_sequence")
            == report.checkpoint_sequence
        )
        reads.append(report.transfers_read)
    assert history > 4000 and max(reads) < budget + 107
    # An audit with nothing new writes nothing and reads nothing new.
    idle = await auditor.audit()
    assert idle.balanced and idle.transfers_replayed == 0 and idle.checkpoint_id == 0
    # Every transfer has been covered by exactly one checkpoint, chained.
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM audit_checkpoints ORDER BY id")
    assert rows[-1]["sequence"] == history and sum(r["transfers"] for r in rows) == history
    assert max(r["sequence"] - p["sequence"] for p, r in itertools.pairwise(rows)) <= 100
    previous = bytes(32)
    for row in rows:
        previous = auditor_module.chain_hash(
            previous, row["id"], row["sequence"], row["transfers"], bytes(row["segment_hash"])
        )
        assert bytes(row["hash"]) == previous


async def test_the_checks_still_hold_from_a_checkpoint(ledger: Ledger, pool: asyncpg.Pool) -> None:
    """Columns == checkpoint + newer transfers, pending == open holds: each still
    found after a checkpoint, by an audit filtered by asset too, and no
    checkpoint is written over a violation."""
    await ledger.ok(deposit("d1", "alice", "10"), deposit("d2", "bob", "10"))
    await ledger.ok(hold("h1", "alice", "3"), deposit("d3", "carol", "1", asset="BTC"))
    assert (await run_audit(pool)).checkpoint_id == 1
    await ledger.ok(transfer("t1", "alice", "bob", "1"))
    cases = [  # (the change behind the ledger's back, what puts it back)
        # a transfer newer than the checkpoint: the replay after it differs
        (
            "UPDATE transfers SET amount = amount + 1 WHERE id = 't1'",
            "UPDATE transfers SET amount = amount - 1 WHERE id = 't1'",
        ),
        # a checkpoint's balance: the replay from it no longer adds up
        (
            "UPDATE audit_balances SET credits_posted = credits_posted + 1"
            " WHERE account_id = 'bob'",
            "UPDATE audit_balances SET credits_posted = credits_posted - 1"
            " WHERE account_id = 'bob'",
        ),
        # a hold's remaining: the pending columns no longer equal the open holds
        (
            "UPDATE transfers SET remaining = remaining - 1 WHERE id = 'h1'",
            "UPDATE transfers SET remaining = remaining + 1 WHERE id = 'h1'",
        ),
    ]
    for change, undo in cases:
        async with pool.acquire() as conn:
            await conn.execute(change)
        report = await run_audit(pool)
        assert not report.balanced and report.checkpoint_id == 0, change
        by_asset = {a.asset: a for a in report.assets}
        assert by_asset["USDT"].violations and by_asset["BTC"].balanced, change
        filtered = await run_audit(pool, ["USDT"])
        assert not filtered.balanced and filtered.checkpoint_id == 0, change
        async with pool.acquire() as conn:
            await conn.execute(undo)
        assert (await run_audit(pool)).balanced, change


async def test_a_changed_row_older_than_the_checkpoint_is_found_and_halts(
    ledger: Ledger, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay starts at the checkpoint, so an old transfer's row is never
    replayed again; the rolling re-verification hashes it again and finds it."""
    monkeypatch.setattr(auditor_module, "SEGMENT_SPAN", 50)
    auditor = Auditor(pool, LedgerMetrics(CollectorRegistry()), reverify_budget=60)
    await ledger.ok(*(deposit(f"d-{a}", a, "1000") for a in ACCOUNTS))
    await _trade(ledger, "old", 300)
    assert (await auditor.audit()).balanced  # checkpoints 1..7 cover all of it
    await _trade(ledger, "new", 5)
    assert (await auditor.audit()).balanced
    async with pool.acquire() as conn:
        checkpoints = await conn.fetchval("SELECT count(*) FROM audit_checkpoints")
        # Behind the ledger's back: an old transfer now says it moved more. The
        # balances do not say so, and the balance checks start after it.
        await conn.execute("UPDATE transfers SET amount = amount * 100 WHERE id = 'old-17'")
    found = None
    for _ in range(checkpoints):  # one cycle of the re-verification at most
        report = await auditor.audit()
        assert all(a.balanced for a in report.assets)  # the balance checks cannot see it
        if not report.balanced:
            found = report
            break
    assert found is not None, "a changed old transfer was not found within a cycle"
    assert any("changed since it was written" in p for p in found.problems)
    assert found.checkpoint_id == 0  # no checkpoint over a broken chain
    async with pool.acquire() as conn:
        halt = await conn.fetchrow("SELECT halted, reason FROM halt")
    assert halt["halted"] and "checkpoints" in halt["reason"]
    wd = hold("wd1", "acct-3", "1", credit="sys:custody", kind=K.TRANSFER_KIND_WITHDRAWAL)
    (refused,) = await ledger.create(wd)
    assert reason(refused) == "LEDGER_HALTED"
    audit = await ledger.audit()  # and the API says so
    assert not audit.balanced


async def test_a_deleted_old_transfer_is_found(
    ledger: Ledger, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditor_module, "SEGMENT_SPAN", 50)
    await ledger.ok(*(deposit(f"d-{a}", a, "1000") for a in ACCOUNTS))
    await _trade(ledger, "old", 100)
    assert (await run_audit(pool)).balanced
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM transfers WHERE id = 'old-3'")
    reports = [await run_audit(pool, reverify_budget=1) for _ in range(4)]
    assert any("changed since it was written" in p for report in reports for p in report.problems)


async def test_concurrent_audits_write_one_checkpoint(ledger: Ledger, pool: asyncpg.Pool) -> None:
    await ledger.ok(*(deposit(f"d-{a}", a, "1000") for a in ACCOUNTS))
    await _trade(ledger, "t", 50)
    reports = await asyncio.gather(*(run_audit(pool) for _ in range(3)))
    assert all(r.balanced for r in reports)
    written = [r.checkpoint_id for r in reports if r.checkpoint_id]
    assert written == [1]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_checkpoints") == 1
        balances = await conn.fetch(
            "SELECT b.* FROM audit_balances b JOIN accounts a USING (account_id, asset)"
            " WHERE (a.debits_posted, a.credits_posted) <> (b.debits_posted, b.credits_posted)"
        )
    assert not balances
