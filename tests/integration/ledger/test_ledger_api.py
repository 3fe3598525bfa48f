"""The ledger's API against real PostgreSQL (an in-process ledger on a fresh database)."""

from __future__ import annotations

import grpc

from cex.ledger.v1 import ledger_pb2 as K
from services.chassis import page_token
from tests.integration.ledger.support import (
    Ledger,
    deposit,
    hold,
    post,
    reason,
    reasons,
    rpc_error,
    transfer,
    void,
)


async def test_deposit_transfer_and_balances(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "alice", "100.5"))
    (t,) = await ledger.ok(transfer("t1", "alice", "bob", "0.25"))
    assert t.state == K.TRANSFER_STATE_POSTED and t.sequence == 2 and t.amount == "0.25"
    alice = await ledger.balance("alice", "USDT")
    assert (alice.available, alice.total, alice.held) == ("100.25", "100.25", "0")
    assert await ledger.available("bob", "USDT") == "0.25"
    audit = await ledger.audit()
    assert audit.balanced and audit.sequence == 2
    (usdt,) = audit.results
    assert usdt.debits_posted == usdt.credits_posted == "100.75"
    assert usdt.account_count == 3


async def test_errors_are_clear(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "alice", "10"))
    results = await ledger.create(
        transfer("a", "alice", "bob", "10.5"),
        transfer("b", "nobody", "bob", "1"),
        transfer("c", "alice", "bob", "0.000000001"),
        transfer("d", "alice", "bob", "-1"),
        transfer("e", "alice", "bob", "1", asset="DOGE"),
        transfer("f", "alice", "alice", "1"),
        transfer("g", "alice", "bob", "1e3"),
    )
    assert reasons(results) == [
        "LEDGER_INSUFFICIENT_FUNDS",
        "LEDGER_INSUFFICIENT_FUNDS",  # never held: zero is a balance (issue 18)
        "LEDGER_AMOUNT_INVALID",
        "LEDGER_AMOUNT_INVALID",
        "LEDGER_ASSET_NOT_FOUND",
        "LEDGER_ACCOUNTS_MUST_DIFFER",
        "LEDGER_AMOUNT_INVALID",
    ]
    codes = [r.status.code for r in results]
    assert codes[0] == codes[1] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert codes[2] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert await ledger.available("alice", "USDT") == "10"
    empty = await rpc_error(ledger.stub.CreateTransfers(K.CreateTransfersRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.reason == "LEDGER_BATCH_SIZE_INVALID"
    assert [v.field for v in empty.violations] == ["transfers"]


async def test_linked_chain_is_all_or_nothing(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "alice", "10"))
    results = await ledger.create(
        transfer("l1", "alice", "bob", "4", linked=True),
        transfer("l2", "alice", "carol", "7", linked=True),
        transfer("l3", "alice", "dave", "1"),
        transfer("solo", "alice", "bob", "1"),
        transfer("open", "alice", "bob", "1", linked=True),
    )
    assert reasons(results) == [
        "LEDGER_LINKED_EVENT_FAILED",
        "LEDGER_INSUFFICIENT_FUNDS",
        "LEDGER_LINKED_EVENT_FAILED",
        "",
        "LEDGER_LINKED_EVENT_CHAIN_OPEN",
    ]
    assert await ledger.available("alice", "USDT") == "9"
    assert (await ledger.audit()).balanced


async def test_idempotency(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "alice", "10"))
    (first,) = await ledger.ok(transfer("t", "alice", "bob", "3"))
    (again,) = await ledger.ok(transfer("t", "alice", "bob", "3"))
    assert again == first
    (different,) = await ledger.create(transfer("t", "alice", "bob", "4"))
    assert reason(different) == "LEDGER_TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS"
    assert different.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    # A failure is remembered: it stays failed even once funds arrive.
    (failed,) = await ledger.create(transfer("big", "alice", "bob", "100"))
    assert reason(failed) == "LEDGER_INSUFFICIENT_FUNDS"
    await ledger.ok(deposit("d2", "alice", "1000"))
    (still,) = await ledger.create(transfer("big", "alice", "bob", "100"))
    assert reason(still) == "LEDGER_INSUFFICIENT_FUNDS"
    (other,) = await ledger.create(transfer("big", "alice", "bob", "1"))
    assert reason(other) == "LEDGER_TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS"
    assert await ledger.available("alice", "USDT") == "1007"


async def test_holds_post_void_expire(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "alice", "100"))
    await ledger.ok(hold("h1", "alice", "30"), hold("h2", "alice", "20"))
    alice = await ledger.balance("alice", "USDT")
    assert (alice.available, alice.held, alice.total) == ("50", "50", "100")
    (too_much,) = await ledger.create(hold("h3", "alice", "50.01"))
    assert reason(too_much) == "LEDGER_INSUFFICIENT_FUNDS"
    (posted,) = await ledger.ok(post("p1", "h1", "12"))
    assert posted.amount == "12" and posted.pending_id == "h1"
    assert reasons(await ledger.create(post("p1b", "h1"))) == [
        "LEDGER_PENDING_TRANSFER_ALREADY_POSTED"
    ]
    response = await ledger.stub.VoidPendingTransfer(
        K.VoidPendingTransferRequest(id="v2", pending_id="h2")
    )
    assert response.transfer.state == K.TRANSFER_STATE_VOIDED
    error = await rpc_error(
        ledger.stub.PostPendingTransfer(K.PostPendingTransferRequest(id="p2", pending_id="h2"))
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED",
    )
    error = await rpc_error(
        ledger.stub.PostPendingTransfer(K.PostPendingTransferRequest(id="p9", pending_id="nope"))
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "LEDGER_PENDING_TRANSFER_NOT_FOUND",
    )
    alice = await ledger.balance("alice", "USDT")
    assert (alice.available, alice.held, alice.total) == ("88", "0", "88")
    await ledger.ok(hold("h4", "alice", "8", timeout_s=0.3))
    assert (await ledger.balance("alice", "USDT")).held == "8"
    import asyncio

    for _ in range(50):
        await asyncio.sleep(0.1)
        if (await ledger.balance("alice", "USDT")).held == "0":
            break
    got = await ledger.stub.GetTransfer(K.GetTransferRequest(id="h4"))
    assert got.transfer.state == K.TRANSFER_STATE_EXPIRED
    assert reasons(await ledger.create(void("v4", "h4"))) == ["LEDGER_PENDING_TRANSFER_EXPIRED"]
    audit = await ledger.audit()
    assert audit.balanced and audit.results[0].pending_transfer_count == 0


async def test_list_transfers_pages_and_filters(ledger: Ledger) -> None:
    await ledger.ok(*[deposit(f"d{i}", f"u{i % 3}", "1") for i in range(25)])
    seen: list[str] = []
    token = ""
    while True:
        page = await ledger.stub.ListTransfers(
            K.ListTransfersRequest(account_id="u1", page_size=3, page_token=token)
        )
        seen += [t.id for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"d{i}" for i in range(25) if i % 3 == 1]
    by_ref = await ledger.stub.ListTransfers(K.ListTransfersRequest(reference="d7"))
    assert [t.id for t in by_ref.transfers] == ["d7"]
    # Every transfer once, across pages of any size (the last page full or not).
    for size in (1, 4, 9):
        walked: list[str] = []
        token = ""
        while True:
            page = await ledger.stub.ListTransfers(
                K.ListTransfersRequest(page_size=size, page_token=token)
            )
            assert len(page.transfers) <= size
            walked += [t.id for t in page.transfers]
            if not (token := page.next_page_token):
                break
        assert walked == [f"d{i}" for i in range(25)]
    # Garbage, a bare sequence (what tokens were before issue 19), another list's token.
    for token in ("!!", "MTA=", page_token("volumes", "1")):
        bad = await rpc_error(ledger.stub.ListTransfers(K.ListTransfersRequest(page_token=token)))
        assert (bad.code, bad.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "LEDGER_PAGE_TOKEN_INVALID",
        )
        assert [v.field for v in bad.violations] == ["page_token"]
    negative = await rpc_error(ledger.stub.ListTransfers(K.ListTransfersRequest(page_size=-1)))
    assert (negative.code, negative.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "LEDGER_PAGE_SIZE_INVALID",
    )
    assert [v.field for v in negative.violations] == ["page_size"]


async def test_a_violation_halts_withdrawals(ledger: Ledger) -> None:
    import asyncpg

    await ledger.ok(deposit("d1", "alice", "10"), deposit("d2", "bob", "10"))
    assert (await ledger.audit()).balanced
    conn = await asyncpg.connect(ledger.database_url)
    try:  # corrupt a balance behind the ledger's back
        await conn.execute(
            "UPDATE ledger.accounts SET credits_posted = credits_posted + 1"
            " WHERE account_id = 'bob'"
        )
        audit = await ledger.audit()
        assert not audit.balanced and not audit.results[0].balanced
        halt = await conn.fetchrow("SELECT halted, reason FROM ledger.halt")
        assert halt["halted"] and "USDT" in halt["reason"]
    finally:
        await conn.close()
    wd = hold("wd1", "alice", "1", credit="sys:custody", kind=K.TRANSFER_KIND_WITHDRAWAL)
    (refused,) = await ledger.create(wd)
    assert reason(refused) == "LEDGER_HALTED"
    await ledger.ok(transfer("t1", "alice", "carol", "1"))  # trading still works
