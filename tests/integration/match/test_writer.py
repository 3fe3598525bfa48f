"""The group's writer driven directly, on a real PostgreSQL: what its callers do to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import grpc
import pytest

from cex.ledger.v1 import ledger_pb2 as K
from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import ErrorDetails, Unavailable, postgres
from services.chassis.db import Statement, migrate
from services.chassis.markets import DEFAULT_CATALOG
from services.ledger.store import MIGRATIONS as LEDGER_MIGRATIONS
from services.ledger.store import Store as LedgerStore
from services.match.engine import decode
from services.match.funds import Funds
from services.match.server import MIGRATIONS
from services.match.store import FIND, Entry, Journal
from services.match.writer import JournalMismatch, Sequencer
from tests.integration.match.match_client import limit, place

MARKET = DEFAULT_CATALOG.markets["BTC-USDT"]
USDT = "USDT"


async def test_a_caller_that_went_away_does_not_fail_its_batch(fresh_database_url: str) -> None:
    """A command whose caller was cancelled is still committed with its batch, and the
    others in the batch are answered: the writer does not mistake the gone caller for a
    failed commit (which made it answer UNAVAILABLE and rebuild from the journal)."""
    await _ledger_migrated(fresh_database_url)
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


async def _ledger_migrated(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "ledger", LEDGER_MIGRATIONS)
    finally:
        await conn.close()


async def _submit(writer: Sequencer, command: match_pb2.Command) -> match_pb2.CommandResult:
    """A market command, or a funds command (no market), as the server queues them."""
    if not command.market:
        return await writer.submit_funds(command)
    return await writer.submit(decode(MARKET, command))


def _deposits() -> match_pb2.Command:
    """1,000 USDT to "buyer" and 2 BTC to "seller"."""
    single, deposit = match_pb2.FundsTransfer.OP_SINGLE, K.TRANSFER_KIND_DEPOSIT
    return _funds(
        "f1",
        _transfer("d1", single, "sys:custody", "buyer", "USDT", "1000", kind=deposit),
        _transfer("d2", single, "sys:custody", "seller", "BTC", "2", kind=deposit),
    )


def _funds(command_id: str, *transfers: match_pb2.FundsTransfer) -> match_pb2.Command:
    return match_pb2.Command(
        command_id=command_id, transfers=match_pb2.TransfersCommand(transfers=transfers)
    )


def _transfer(
    tid: str, op: int, debit: str = "", credit: str = "", asset: str = "USDT", amount: str = "0",
    *, pending_id: str = "", timeout_s: int = 0, kind: int = K.TRANSFER_KIND_WITHDRAWAL,
) -> match_pb2.FundsTransfer:  # fmt: skip
    return match_pb2.FundsTransfer(
        id=tid, op=op, debit_account_id=debit, credit_account_id=credit, asset=asset,  # type: ignore[arg-type]
        amount=DEFAULT_CATALOG.assets[asset].to_minor(amount), pending_id=pending_id,
        timeout_ns=timeout_s * 1_000_000_000, kind=kind, reference=tid,
    )  # fmt: skip


def _held(command: match_pb2.PlaceCommand, asset: str, amount: str) -> match_pb2.PlaceCommand:
    command.hold_asset, command.hold_amount = asset, amount
    return command


async def test_a_replay_from_a_snapshot_gives_the_same_books_and_balances(
    fresh_database_url: str,
) -> None:
    """From the latest snapshot (books and balances) and the journal after it, a
    replay that never reads the ledger's tables reaches the writer's state exactly:
    trades settled, deposits, a hold taken before the snapshot and posted after it,
    a void, and a hold that expired on the writer's clock. Losing one journaled
    funds entry makes it differ."""
    await _ledger_migrated(fresh_database_url)
    single, pending = match_pb2.FundsTransfer.OP_SINGLE, match_pb2.FundsTransfer.OP_PENDING
    post, void = match_pb2.FundsTransfer.OP_POST, match_pb2.FundsTransfer.OP_VOID
    offset = [0]
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        journal = Journal(pool, "main")
        funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
        writer = Sequencer(
            [MARKET], journal, funds, clock=lambda: time.time_ns() + offset[0], snapshot_every=5
        )
        await writer.start()
        try:

            async def ok(command: match_pb2.Command) -> None:
                result = await _submit(writer, command)
                assert result.status.code == 0, result.status
                assert all(s.code == 0 for s in result.transfer_statuses), result

            deposit = K.TRANSFER_KIND_DEPOSIT
            await ok(_deposits())
            await ok(place("p1", _held(limit("s1", "seller", t.SIDE_SELL, "1", "100"), "BTC", "1")))
            await ok(
                place("p2", _held(limit("b1", "buyer", t.SIDE_BUY, "0.5", "100"), "USDT", "60"))
            )
            await ok(
                _funds(
                    "f2",
                    _transfer("w1", pending, "buyer", "sys:withdrawals", amount="10", timeout_s=1),
                    _transfer("w2", pending, "buyer", "sys:withdrawals", amount="20"),
                    _transfer("w3", pending, "buyer", "sys:withdrawals", amount="5"),
                )
            )
            await ok(_funds("f3", _transfer("w3v", void, pending_id="w3")))
            for _ in range(100):  # the fifth entry made a snapshot due; a task writes it
                if (snapshot := await journal.latest_snapshot()) is not None:
                    break
                await asyncio.sleep(0.05)
            assert snapshot is not None and snapshot.group_seq == 5
            # After the snapshot: a trade, the post of a hold taken before it, a deposit,
            # and the expiry of w1 (its timeout passes on the writer's clock).
            await ok(
                place("p3", _held(limit("b2", "buyer", t.SIDE_BUY, "0.4", "100"), "USDT", "60"))
            )
            await ok(_funds("f4", _transfer("w2p", post, pending_id="w2")))
            await ok(
                _funds(
                    "f5", _transfer("d3", single, "sys:custody", "buyer", amount="7", kind=deposit)
                )
            )
            offset[0] = 2_000_000_000
            for _ in range(100):
                if "w1" not in writer.funds.book.transfers:  # expired, saved, forgotten
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("w1 did not expire")
            async with writer.view(MARKET.symbol):
                live = writer.document()
            assert live["group_seq"] == 9 and live["funds_seq"] == 6
            replayed = await writer.replayed()
            assert replayed == live
            accounts = {(a, asset): rest for a, asset, *rest in live["balances"]["accounts"]}
            assert ("seller", "USDT") in accounts  # settled
            assert [h[0] for h in live["balances"]["holds"]] == ["hold:s1"]  # 0.1 BTC rests
            # The journal is the whole story: without the deposit's effects it differs...
            await pool.execute("UPDATE journal SET command = '' WHERE group_seq = 8")
            assert await writer.replayed() != live
            # ...and a replay refuses a journal with an entry missing.
            await pool.execute("DELETE FROM journal WHERE group_seq = 8")
            with pytest.raises(JournalMismatch, match="skips from 7 to 9"):
                await writer.replayed()
        finally:
            await writer.stop()


async def test_a_standby_follows_and_takes_over_and_a_writer_without_its_lease_cannot_commit(
    fresh_database_url: str,
) -> None:
    """A second writer of the group stands by, following the journal. When the first
    one's lease session ends while its process lives (terminated by PostgreSQL), the
    standby takes over; the first one's next commit fails on the dead session and it
    becomes the standby (the lease is the fence); and the other way round again."""
    await _ledger_migrated(fresh_database_url)
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:

        def writer() -> Sequencer:
            funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
            return Sequencer([MARKET], Journal(pool, "main"), funds, clock=time.time_ns)

        first, second = writer(), writer()
        await first.start()
        await second.start()
        try:
            assert first.serving and not second.serving
            with pytest.raises(Unavailable, match="standby"):
                second.require_serving()
            assert (await _submit(first, _deposits())).status.code == 0
            for i, (account, side, price) in enumerate(
                [("seller", t.SIDE_SELL, "100"), ("buyer", t.SIDE_BUY, "101")]
            ):
                hold = ("BTC", "0.5") if side == t.SIDE_SELL else ("USDT", "60")
                order = _held(limit(f"o{i}", account, side, "0.5", price), *hold)
                assert (await _submit(first, place(f"p{i}", order))).status.code == 0
            await _until(lambda: second.following is not None
                         and second.following.group_seq == first.group_seq)  # fmt: skip

            # The first writer's session ends; its process (this object) lives on.
            pid = first._lease.conn.get_server_pid()
            await pool.execute("SELECT pg_terminate_backend($1)", pid)
            await _until(lambda: second.serving)
            assert second.group_seq == first.group_seq
            assert second.state_hash() == first.state_hash()
            late = _held(limit("o9", "buyer", t.SIDE_BUY, "0.1", "90"), "USDT", "9")
            refused = await _submit(first, place("p9", late))
            assert refused.status.code == grpc.StatusCode.UNAVAILABLE.value[0], refused
            await _until(lambda: not first.serving)
            assert await pool.fetchval("SELECT count(*) FROM journal WHERE command_id = 'p9'") == 0
            accepted = await _submit(second, place("p9", late))  # the retry, to the new writer
            assert accepted.status.code == 0, accepted.status
            await second.verify()

            # And back: the second one stops (its lease released), the first takes over.
            await second.stop()
            await _until(lambda: first.serving)
            assert first.state_hash() == second.state_hash()
            one = _transfer("d3", match_pb2.FundsTransfer.OP_SINGLE, "sys:custody", "buyer",
                            "USDT", "1", kind=K.TRANSFER_KIND_DEPOSIT)  # fmt: skip
            assert (await _submit(first, _funds("f2", one))).status.code == 0
        finally:
            await first.stop()
            await second.stop()


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


def _status(command_id: str, status: int, reason: str) -> match_pb2.Command:
    return match_pb2.Command(
        command_id=command_id,
        market=MARKET.symbol,
        set_status=match_pb2.SetMarketStatusCommand(
            status=status,  # type: ignore[arg-type]
            reason=reason,
            request_id=command_id,
            updated_by="admin",
        ),
    )


async def test_status_changes_are_journaled_refused_commands_are_not_and_replay_agrees(
    fresh_database_url: str,
) -> None:
    """A market's status is a journaled command ordered with the orders (ADR 0015):
    what a status refuses is answered FAILED_PRECONDITION and not journaled, a
    delisting cancels the open orders and releases their holds, and the replay from
    the snapshot and the journal (statuses changed on both sides of the snapshot)
    equals the writer's document, as does a restart's recovery."""
    await _ledger_migrated(fresh_database_url)
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        journal = Journal(pool, "main")
        funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
        writer = Sequencer([MARKET], journal, funds, clock=time.time_ns, snapshot_every=4)
        await writer.start()
        try:

            async def submit(command: match_pb2.Command) -> match_pb2.CommandResult:
                return await _submit(writer, command)

            async def ok(command: match_pb2.Command) -> match_pb2.CommandResult:
                result = await submit(command)
                assert result.status.code == 0, result.status
                return result

            def reason(result: match_pb2.CommandResult) -> str:
                return ErrorDetails.from_status(result.status).reason

            await ok(_deposits())
            await ok(place("p1", _held(limit("s1", "seller", t.SIDE_SELL, "1", "100"), "BTC", "1")))
            await ok(place("p2", _held(limit("b1", "buyer", t.SIDE_BUY, "1", "90"), "USDT", "90")))
            await ok(_status("halt", t.MARKET_STATUS_HALTED, "incident"))
            journaled = await pool.fetchval("SELECT count(*) FROM journal")
            refused = await submit(
                place("p3", _held(limit("b2", "buyer", t.SIDE_BUY, "1", "80"), "USDT", "80"))
            )
            assert reason(refused) == "MATCH_MARKET_HALTED"
            assert await pool.fetchval("SELECT count(*) FROM journal") == journaled
            for _ in range(100):
                if (snapshot := await journal.latest_snapshot()) is not None:
                    break
                await asyncio.sleep(0.05)
            assert snapshot is not None and b'"status"' in snapshot.state
            await ok(_status("co", t.MARKET_STATUS_CANCEL_ONLY, "winding down"))
            cancel = match_pb2.Command(
                command_id="x1",
                market=MARKET.symbol,
                cancel=match_pb2.CancelCommand(order_id="b1", account_id="buyer"),
            )
            cancelled = await ok(cancel)
            assert cancelled.events[0].WhichOneof("kind") == "cancelled"
            await ok(_status("open", t.MARKET_STATUS_TRADING, "resumed"))
            await ok(place("p4", _held(limit("b3", "buyer", t.SIDE_BUY, "1", "95"), "USDT", "95")))
            assert ("buyer", "USDT") in {
                (a, asset) for a, asset, *_ in writer.document()["balances"]["accounts"]
            }
            delisted = await ok(_status("gone", t.MARKET_STATUS_DELISTED, "delisted"))
            kinds = [e.WhichOneof("kind") for e in delisted.events]
            assert kinds[0] == "status_changed" and kinds.count("cancelled") == 2
            cancel.command_id = "x2"  # (x1 again is answered from the journal)
            assert reason(await submit(cancel)) == "MATCH_MARKET_DELISTED"
            assert reason(await submit(_status("back", t.MARKET_STATUS_TRADING, "no"))) == (
                "MATCH_MARKET_DELISTED"
            )
            again = await submit(_status("gone", t.MARKET_STATUS_DELISTED, "delisted"))
            assert again.duplicate and again.status.code == 0  # the retry: the first answer
            sweep = match_pb2.Command(
                command_id="m1",
                market=MARKET.symbol,
                mass_cancel=match_pb2.MassCancelCommand(account_id="buyer"),
            )
            assert not (await ok(sweep)).events  # passes, finds nothing; journaled last, so
            # the writer's clock (moved by the refusals too) is the journal's again
            async with writer.view(MARKET.symbol) as engine:
                assert engine.working_orders("buyer") == engine.working_orders("seller") == 0
                live = writer.document()
            assert live["balances"]["holds"] == []  # every order's hold released
            assert await writer.replayed() == live
            await writer.verify()
            assert writer.engines[MARKET.symbol].status == t.MARKET_STATUS_DELISTED
        finally:
            await writer.stop()
