"""kill -9 of the funding process at every step boundary and during compensation,
restarting it each time, while withdrawals run against a real ledger, the stack's risk
through Envoy and the chain simulator (lost answers, rejections, drops, reorgs).

Afterwards: every request answered is recorded, every withdrawal finished (none STUCK
or open), every hold is posted or voided (none pending), a withdrawal is broadcast at
most once and only completed ones went out, each compensation succeeded exactly once,
money is conserved and the ledger audit passes.

The process kills itself with SIGKILL at an exact boundary (FUNDING_CRASH_POINTS):
after a step's STARTED row commits (`started:`), after its side effect but before its
outcome commits (`acted:`), and after the outcome commits (`committed:`); `~` marks a
compensation. The chaos run adds kills from outside at random moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails
from tests.conftest import Trust
from tests.integration.funding.support import (
    ETH_ADDRESS,
    Chain,
    chainsim,
    fresh_database,
    fund,
    funding_process,
    new_account,
)
from tests.integration.ledger.support import Ledger, running_ledger

FORWARD = ["ledger_hold", "risk_check", "custody_broadcast", "ledger_post"]
SHORT_POINTS = [  # the side effect done, its outcome not yet recorded
    "acted:ledger_hold",
    "acted:custody_broadcast",
    "acted:ledger_post",
    "acted:~ledger_hold",
]
ALL_POINTS = [
    f"{moment}:{step}"
    for step in [*FORWARD, "~ledger_hold"]
    for moment in ("started", "acted", "committed")
] + ["acted:await_confirmations", "committed:await_confirmations"]
FAULTS = {"broadcast_timeout": 0.3, "broadcast_error": 0.3, "broadcast_reject": 0.15,
          "drop": 0.15, "reorg": 0.3}  # fmt: skip
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}  # fmt: skip


@contextlib.asynccontextmanager
async def world(
    stack: Stack, trust: Trust, nats_url: str
) -> AsyncIterator[tuple[str, Ledger, Chain]]:
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, nats_url) as ledger,
        chainsim(seed=11, faults=FAULTS, block_s=0.05) as chain,
    ):
        yield database_url, ledger, chain


def _env(ledger: Ledger, chain: Chain, crash: str) -> dict[str, str]:
    return {
        "FUNDING_INSTANCE": "crash-test",
        "FUNDING_LEDGER_TARGET": f"127.0.0.1:{ledger.server.port}",
        "FUNDING_CHAIN_TARGET": chain.target,
        "FUNDING_POLL_S": "0.05",
        "FUNDING_CONFIRMATION_POLL_S": "0.05",
        "FUNDING_STEP_TIMEOUT_S": "1.5",
        "FUNDING_WITHDRAWAL_DEADLINE_S": "120",
        "FUNDING_WATCH_CHAIN": "off",
        "FUNDING_CRASH_POINTS": crash,
    }


# Over ruff's complexity limit on purpose: the crash driver walks every saga boundary in one loop,
# as the test's docstring lists them.
async def crash_run(  # noqa: C901
    stack: Stack,
    trust: Trust,
    nats_url: str,
    *,
    points: list[str],
    per_point: int,
    random_kills: int,
) -> None:
    rng = random.Random(2026)
    async with world(stack, trust, nats_url) as (database_url, ledger, chain):
        accounts = [new_account() for _ in range(6)]
        for acct in accounts:
            await fund(ledger, acct, "80")
        proc = funding_process(stack, database_url, _env(ledger, chain, ""))
        asked: dict[str, tuple[str, str]] = {}  # request_id -> (account, amount)
        acked: set[str] = set()  # the request_ids answered OK

        async def request(stub: funding_pb2_grpc.FundingServiceAsyncStub, n: int) -> None:
            """n concurrent withdrawal requests, each retried until answered or the process
            dies (a request may or may not be recorded then: the check reads the database)."""
            batch = []
            for _ in range(n):
                rid = f"r{len(asked)}"
                asked[rid] = (rng.choice(accounts), str(rng.choice([3, 7, 20, 45])))
                batch.append(one(stub, rid, *asked[rid]))
            await asyncio.gather(*batch)

        async def one(
            stub: funding_pb2_grpc.FundingServiceAsyncStub, rid: str, acct: str, amount: str
        ) -> None:
            while True:
                assert proc.process is not None
                if proc.process.returncode is not None:
                    return
                try:
                    await stub.RequestWithdrawal(
                        F.RequestWithdrawalRequest(
                            request_id=rid, account_id=acct, asset="USDT", amount=amount,
                            address=ETH_ADDRESS,
                        ),
                        timeout=5,
                    )  # fmt: skip
                    acked.add(rid)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    await asyncio.sleep(0.1)

        async def died(within_s: float) -> bool:
            assert proc.process is not None
            try:
                await asyncio.wait_for(proc.process.wait(), within_s)
            except TimeoutError:
                return False
            return proc.process.returncode == -9

        crashes = 0
        for point in points:
            proc.env["FUNDING_CRASH_POINTS"] = point
            await proc.start()
            if await died(0.01):
                crashes += 1
                continue
            async with trust.channel(f"127.0.0.1:{proc.port}") as channel:
                stub = funding_pb2_grpc.FundingServiceStub(channel)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await request(stub, per_point)
            if await died(20):
                crashes += 1
            else:  # nothing reached this point (e.g. no compensation yet): go on
                await proc.stop()
        assert crashes >= len(points) * 2 // 3, crashes
        print(f"funding crash run: {crashes} kill -9 at boundaries of {len(points)} tried")
        proc.env["FUNDING_CRASH_POINTS"] = ""
        await proc.start()
        for _ in range(random_kills):  # kills from outside, at random moments
            async with trust.channel(f"127.0.0.1:{proc.port}") as channel:
                await request(funding_pb2_grpc.FundingServiceStub(channel), per_point)
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            await proc.kill()
            await proc.start()
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(600):
                open_ = await conn.fetchval(
                    "SELECT count(*) FROM funding.sagas WHERE state IN ('RUNNING','COMPENSATING')"
                )
                if open_ == 0:
                    break
                await asyncio.sleep(0.1)
            await proc.stop()
            await check(conn, chain, ledger, asked, acked, accounts)
            print(
                f"funding crash run: {proc.kills} outside kills, {len(asked)} requests, "
                f"{len(acked)} answered"
            )
        finally:
            await conn.close()


async def check(
    conn: asyncpg.Connection,
    chain: Chain,
    ledger: Ledger,
    asked: dict[str, tuple[str, str]],
    acked: set[str],
    accounts: list[str],
) -> None:
    sagas = {
        r["reference_id"]: r["state"]
        for r in await conn.fetch("SELECT reference_id, state FROM funding.sagas")
    }
    assert set(sagas.values()) <= {"COMPLETED", "COMPENSATED"}, Counter(sagas.values())
    rows = {r["withdrawal_id"]: r for r in await conn.fetch("SELECT * FROM funding.withdrawals")}
    # Every request answered is recorded; one the kill cut off may or may not be (about
    # half are: each boundary kill cuts off the rest of its batch), but a third at least.
    assert set(sagas) == set(rows) and len(rows) >= len(asked) // 3
    assert acked <= {row["request_id"] for row in rows.values()}
    requested = {}
    for wid, row in rows.items():  # one withdrawal per request_id, as asked
        acct, amount = asked[row["request_id"]]
        assert (row["account_id"], row["amount"]) == (acct, int(amount) * 10**8)
        requested[wid] = (acct, amount)
    holds = {
        r["reference"]: r["state"]
        for r in await conn.fetch(
            "SELECT reference, state FROM ledger.transfers WHERE op = 2 AND kind = 2"
        )
    }
    assert 1 not in holds.values(), "a withdrawal hold is still pending"
    stats = await chain.stats()
    sent = stats["withdrawals"]
    states = Counter(r["state"] for r in rows.values())
    assert states["COMPLETED"] > 0 and states["FAILED"] + states["REJECTED"] > 0, states
    spent: dict[str, Decimal] = {a: Decimal(0) for a in accounts}
    for wid, row in rows.items():
        if row["state"] == "COMPLETED":
            assert sagas[wid] == "COMPLETED"
            assert holds[wid] == 2  # posted
            assert sent[wid]["status"] == "confirmed" and sent[wid]["txid"] == row["txid"]
            spent[row["account_id"]] += Decimal(requested[wid][1]) + 1  # amount + fee
        else:
            assert sagas[wid] == "COMPENSATED"
            assert holds.get(wid, 0) in (0, 3)  # never held, or voided
            # Never handed out, or handed out and dropped: the funds never left.
            assert wid not in sent or sent[wid]["status"] == "dropped", (wid, row["state"])
    # Compensation ran exactly once where there was something to undo.
    undone = await conn.fetch(
        """SELECT s.reference_id, count(*) AS n FROM funding.saga_steps t
           JOIN funding.sagas s USING (saga_id)
           WHERE t.compensation AND t.state = 'SUCCEEDED' GROUP BY s.reference_id"""
    )
    assert all(r["n"] == 1 for r in undone)
    assert {r["reference_id"] for r in undone} == {w for w, s in holds.items() if s == 3}
    voids = await conn.fetchval(
        "SELECT count(*) FROM ledger.transfers WHERE op = 4 AND id LIKE 'wd:%'"
    )
    assert voids == sum(1 for s in holds.values() if s == 3)
    for acct in accounts:
        assert Decimal(await ledger.available(acct, "USDT")) == 80 - spent[acct]
    audit = await ledger.audit()
    assert audit.balanced, audit


async def test_kill_9_at_step_boundaries_short(
    stack: Stack, trust: Trust, private_nats: str
) -> None:
    await crash_run(stack, trust, private_nats, points=SHORT_POINTS, per_point=8, random_kills=0)


@pytest.mark.chaos
async def test_kill_9_at_every_step_boundary_and_at_random(
    stack: Stack, trust: Trust, private_nats: str
) -> None:
    await crash_run(stack, trust, private_nats, points=ALL_POINTS * 2, per_point=6, random_kills=10)


async def test_kill_9_while_awaiting_approval_then_approve_completes_it_exactly_once(
    stack: Stack, trust: Trust, private_nats: str
) -> None:
    """A withdrawal above the threshold waits for an operator; funding is killed -9 from
    outside while it waits, then at the approval's commit and right after the broadcast's
    side effect: the approval survives, the withdrawal completes, broadcast once."""
    async with world(stack, trust, private_nats) as (database_url, ledger, chain):
        await chain.configure()  # no faults: this test's kills are its faults
        acct = new_account()
        await fund(ledger, acct, "1000")
        env = {
            **_env(ledger, chain, ""),
            "FUNDING_APPROVAL_THRESHOLDS": "USDT=100",
            "FUNDING_APPROVAL_POLL_S": "0.05",
        }
        proc = funding_process(stack, database_url, env)
        assert await proc.start()

        async def call(method: str, request: object) -> object:
            """The call, retried (same request) while funding is down or restarting."""
            for _ in range(200):
                async with trust.channel(proc.target) as channel:
                    stub = funding_pb2_grpc.FundingServiceStub(channel)
                    try:
                        return await getattr(stub, method)(request, timeout=5)
                    except grpc.aio.AioRpcError as error:
                        if error.code() not in RETRYABLE:
                            raise
                await asyncio.sleep(0.1)
            raise AssertionError(f"{method} never answered")

        async def state(wid: str) -> F.Withdrawal:
            reply = await call(
                "GetWithdrawal", F.GetWithdrawalRequest(account_id=acct, withdrawal_id=wid)
            )
            assert isinstance(reply, F.GetWithdrawalResponse)
            return reply.withdrawal

        async def reach(wid: str, wanted: int) -> F.Withdrawal:
            for _ in range(600):
                w = await state(wid)
                if w.state == wanted:
                    return w
                await asyncio.sleep(0.05)
            raise AssertionError(f"withdrawal never reached {wanted}: {w}")

        reply = await call(
            "RequestWithdrawal",
            F.RequestWithdrawalRequest(
                request_id="big-1", account_id=acct, asset="USDT", amount="150",
                address=ETH_ADDRESS,
            ),
        )  # fmt: skip
        assert isinstance(reply, F.RequestWithdrawalResponse)
        wid = reply.withdrawal.withdrawal_id
        await reach(wid, F.WITHDRAWAL_STATE_AWAITING_APPROVAL)
        await proc.kill()  # kill -9 from outside while it waits
        # Back, it still waits (held, not broadcast); it dies once the approval's
        # outcome commits (before the broadcast starts).
        proc.env["FUNDING_CRASH_POINTS"] = "committed:await_approval"
        assert await proc.start()
        waiting = await reach(wid, F.WITHDRAWAL_STATE_AWAITING_APPROVAL)
        assert waiting.review == F.WITHDRAWAL_REVIEW_UNSPECIFIED
        assert await ledger.available(acct, "USDT") == "849"
        assert wid not in (await chain.stats())["broadcast_calls"]
        approve = F.ApproveWithdrawalRequest(request_id="ok-1", withdrawal_id=wid, reason="ok")
        with contextlib.suppress(grpc.aio.AioRpcError):  # it may die before it answers
            await call("ApproveWithdrawal", approve)
        assert proc.process is not None
        assert await asyncio.wait_for(proc.process.wait(), 20) == -9
        # Next: it dies right after custody took the broadcast, before its outcome commits.
        proc.env["FUNDING_CRASH_POINTS"] = "acted:custody_broadcast"
        if await proc.start():
            assert await asyncio.wait_for(proc.process.wait(), 20) == -9
        proc.env["FUNDING_CRASH_POINTS"] = ""
        assert await proc.start()
        approved = await call("ApproveWithdrawal", approve)  # the same request: the same answer
        assert isinstance(approved, F.ApproveWithdrawalResponse)
        assert approved.withdrawal.review == F.WITHDRAWAL_REVIEW_APPROVED
        done = await reach(wid, F.WITHDRAWAL_STATE_COMPLETED)
        await proc.stop()
        stats = await chain.stats()
        assert stats["withdrawals"][wid] == {"txid": done.txid, "status": "confirmed"}
        assert stats["broadcast_calls"][wid] == 2  # the lost answer asked again, same id
        assert await ledger.available(acct, "USDT") == "849"
        conn = await asyncpg.connect(database_url)
        try:
            posts = await conn.fetchval(
                "SELECT count(*) FROM ledger.transfers WHERE id = $1", f"wd:{wid}:post"
            )
            approvals = await conn.fetchval(
                """SELECT count(*) FROM funding.saga_steps t JOIN funding.sagas s USING (saga_id)
                   WHERE s.reference_id = $1 AND t.name = 'await_approval'
                     AND t.state = 'SUCCEEDED'""",
                wid,
            )
        finally:
            await conn.close()
        assert (posts, approvals) == (1, 1)
        assert (await ledger.audit()).balanced


async def test_kill_9_while_awaiting_approval_then_a_freeze_voids_it_never_broadcast(
    stack: Stack, trust: Trust, private_nats: str, service_token: str
) -> None:
    """Issue 21: a withdrawal waits for an operator; funding is killed -9, the account is
    suspended at auth while funding is down (so no push reaches it: it learns from its
    reload at start), and funding dies again right after voiding the hold, before that
    outcome commits. Back, the void is done once, the withdrawal ends REJECTED with
    FUNDING_ACCOUNT_SUSPENDED, nothing was broadcast, and the money is all back."""
    async with (
        world(stack, trust, private_nats) as (database_url, ledger, chain),
        grpc.aio.insecure_channel(stack.edge) as edge,
    ):
        await chain.configure()  # no faults: this test's kills are its faults
        operator = (("authorization", f"Bearer {service_token}"),)
        auth = auth_pb2_grpc.AuthServiceStub(edge)
        acct = (
            await auth.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=new_account(), display_name="frozen"),
                metadata=operator,
            )
        ).account.account_id
        await fund(ledger, acct, "1000")
        env = {
            **_env(ledger, chain, ""),
            "FUNDING_APPROVAL_THRESHOLDS": "USDT=100",
            "FUNDING_APPROVAL_POLL_S": "0.05",
            "CEX_ACCOUNT_STATES_RELOAD_S": "0.5",
        }
        proc = funding_process(stack, database_url, env)
        assert await proc.start()

        async def call(method: str, request: object) -> object:
            for _ in range(200):
                async with trust.channel(proc.target) as channel:
                    stub = funding_pb2_grpc.FundingServiceStub(channel)
                    try:
                        return await getattr(stub, method)(request, timeout=5)
                    except grpc.aio.AioRpcError as error:
                        if error.code() not in RETRYABLE:
                            raise
                await asyncio.sleep(0.1)
            raise AssertionError(f"{method} never answered")

        async def reach(wid: str, wanted: int) -> F.Withdrawal:
            for _ in range(600):
                reply = await call(
                    "GetWithdrawal", F.GetWithdrawalRequest(account_id=acct, withdrawal_id=wid)
                )
                assert isinstance(reply, F.GetWithdrawalResponse)
                if reply.withdrawal.state == wanted:
                    return reply.withdrawal
                await asyncio.sleep(0.05)
            raise AssertionError(f"withdrawal never reached {wanted}: {reply.withdrawal}")

        reply = await call(
            "RequestWithdrawal",
            F.RequestWithdrawalRequest(
                request_id="big-1", account_id=acct, asset="USDT", amount="150",
                address=ETH_ADDRESS,
            ),
        )  # fmt: skip
        assert isinstance(reply, F.RequestWithdrawalResponse)
        wid = reply.withdrawal.withdrawal_id
        await reach(wid, F.WITHDRAWAL_STATE_AWAITING_APPROVAL)
        await proc.kill()  # kill -9 from outside while it waits
        await auth.SetAccountState(
            auth_pb2.SetAccountStateRequest(
                request_id=new_account(),
                account_id=acct,
                state=auth_pb2.ACCOUNT_STATE_SUSPENDED,
                reason="frozen while funding was down",
            ),
            metadata=operator,
        )
        proc.env["FUNDING_CRASH_POINTS"] = "acted:~ledger_hold"  # voided, not yet recorded
        if await proc.start():
            assert proc.process is not None
            assert await asyncio.wait_for(proc.process.wait(), 20) == -9
        proc.env["FUNDING_CRASH_POINTS"] = ""
        assert await proc.start()
        stopped = await reach(wid, F.WITHDRAWAL_STATE_REJECTED)
        await proc.stop()
        assert ErrorDetails.from_status(stopped.failure).reason == "FUNDING_ACCOUNT_SUSPENDED"
        assert not stopped.txid
        assert wid not in (await chain.stats())["broadcast_calls"]
        assert await ledger.available(acct, "USDT") == "1000"
        conn = await asyncpg.connect(database_url)
        try:
            voids = await conn.fetchval(
                "SELECT count(*) FROM ledger.transfers WHERE id = $1", f"wd:{wid}:void"
            )
            broadcasts = await conn.fetchval(
                """SELECT count(*) FROM funding.saga_steps t JOIN funding.sagas s USING (saga_id)
                   WHERE s.reference_id = $1 AND t.name = 'custody_broadcast'""",
                wid,
            )
        finally:
            await conn.close()
        assert (voids, broadcasts) == (1, 0)
        assert (await ledger.audit()).balanced
