"""Races against real PostgreSQL: double spend, post/void/expiry of many holds,
and randomly retried requests (idempotency)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import asyncpg

from cex.ledger.v1 import ledger_pb2 as K
from services.chassis import ErrorDetails
from tests.integration.ledger.support import (
    Ledger,
    deposit,
    hold,
    post,
    reason,
    transfer,
    void,
)


async def test_double_spend_exactly_one_of_1000_withdrawal_holds(ledger: Ledger) -> None:
    await ledger.ok(deposit("d", "alice", "12.34567891"))

    async def withdraw(i: int) -> str:
        (result,) = await ledger.create(
            hold(
                f"wd:{i}",
                "alice",
                "12.34567891",
                credit="sys:custody",
                kind=K.TRANSFER_KIND_WITHDRAWAL,
            )
        )
        return reason(result)

    outcomes = Counter(await asyncio.gather(*(withdraw(i) for i in range(1000))))
    assert outcomes == {"": 1, "LEDGER_INSUFFICIENT_FUNDS": 999}
    alice = await ledger.balance("alice", "USDT")
    assert (alice.available, alice.held) == ("0", "12.34567891")
    assert (await ledger.audit()).balanced


async def test_post_void_and_expiry_race_on_5000_holds(ledger: Ledger) -> None:
    n = 5000
    await ledger.ok(deposit("d", "alice", "100000"))
    for start in range(0, n, 1000):
        await ledger.ok(
            *[
                hold(f"h{i}", "alice", "1", timeout_s=(0.5 if i % 2 else None))
                for i in range(start, start + 1000)
            ]
        )
    rng = random.Random(7)
    order = list(range(n))
    rng.shuffle(order)
    posts = [post(f"p{i}", f"h{i}", rng.choice(["", "0.5", "1"])) for i in order]
    rng.shuffle(order)
    voids = [void(f"v{i}", f"h{i}") for i in order]

    async def send(items: list[K.Transfer]) -> list[K.CreateTransferResult]:
        return await ledger.create(*items)

    await asyncio.sleep(0.3)  # some holds expire while the race is on
    chunks = [posts[i : i + 50] for i in range(0, n, 50)] + [
        voids[i : i + 50] for i in range(0, n, 50)
    ]
    rng.shuffle(chunks)
    results = [r for batch in await asyncio.gather(*(send(c) for c in chunks)) for r in batch]
    won: Counter[str] = Counter()
    for r in results:
        if not r.status.code:
            won[r.transfer.pending_id] += 1
        else:
            assert reason(r) in (
                "LEDGER_PENDING_TRANSFER_ALREADY_POSTED",
                "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED",
                "LEDGER_PENDING_TRANSFER_EXPIRED",
            ), r
    assert max(won.values()) == 1  # each hold resolves at most once
    await asyncio.sleep(0.6)
    for _ in range(50):  # the sweeper expires what nobody resolved
        audit = await ledger.audit()
        if audit.results[0].pending_transfer_count == 0:
            break
        await asyncio.sleep(0.1)
    (usdt,) = audit.results
    assert audit.balanced and usdt.pending_transfer_count == 0 and usdt.debits_pending == "0"
    conn = await asyncpg.connect(ledger.database_url)
    try:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM ledger.transfers WHERE op = 2 GROUP BY state"
        )
        states = {r["state"]: r["n"] for r in rows}
        resolved_by_call = await conn.fetchval(
            "SELECT count(*) FROM ledger.transfers WHERE op IN (3, 4)"
        )
    finally:
        await conn.close()
    assert sum(states.values()) == n and 1 not in states
    assert resolved_by_call == len(won) == states.get(2, 0) + states.get(3, 0)
    assert (await ledger.balance("alice", "USDT")).held == "0"


async def test_random_retries_are_idempotent(ledger: Ledger) -> None:
    """Requests replayed at random, with the same or changed fields, as specified."""
    rng = random.Random(11)
    await ledger.ok(*[deposit(f"d{i}", f"u{i}", "10") for i in range(5)])
    sent: dict[str, K.Transfer] = {}
    first: dict[str, K.CreateTransferResult] = {}
    for step in range(300):
        if sent and rng.random() < 0.5:
            tid = rng.choice(list(sent))
            original = sent[tid]
            if rng.random() < 0.5:
                (again,) = await ledger.create(original)
                assert ErrorDetails.from_status(again.status) == ErrorDetails.from_status(
                    first[tid].status
                )
                if not again.status.code:
                    assert again.transfer == first[tid].transfer
            else:
                changed = K.Transfer()
                changed.CopyFrom(original)
                changed.amount = "0.0" + str(rng.randint(1, 9))
                if changed.amount == original.amount:
                    continue
                (again,) = await ledger.create(changed)
                assert reason(again) == "LEDGER_TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS"
            continue
        tid = f"t{step}"
        a, b = rng.sample(range(6), 2)  # u5 never had money
        t = transfer(tid, f"u{a}", f"u{b}", str(rng.choice([1, 3, 7, 11])))
        (result,) = await ledger.create(t)
        sent[tid], first[tid] = t, result
    audit = await ledger.audit()
    assert audit.balanced
