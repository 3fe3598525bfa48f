"""Withdrawal sagas end to end against a real ledger, the stack's risk through Envoy,
the chain simulator as a process and PostgreSQL: the happy path, refusals, cancels,
idempotency, validation and the owner-only rule."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import grpc
import pytest

from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports
from services.chassis import ServiceCredentials
from tests.conftest import Trust
from tests.integration.funding.support import (
    BTC_ADDRESS,
    Chain,
    Funding,
    bearer,
    chainsim,
    fresh_database,
    fund,
    funding_config,
    holds,
    new_account,
    rpc_error,
    running_funding,
)
from tests.integration.ledger.support import Ledger, running_ledger


@dataclass
class World:
    funding: Funding
    ledger: Ledger
    chain: Chain


@pytest.fixture(scope="module")
async def world(stack: Stack, trust: Trust, module_nats: str) -> AsyncIterator[World]:
    """One ledger, chain and funding for the module; each test uses fresh accounts."""
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, module_nats) as ledger,
        chainsim() as chain,
        running_funding(
            stack,
            trust,
            database_url,
            funding_config(f"127.0.0.1:{ledger.server.port}", chain.target),
        ) as funding,
    ):
        yield World(funding, ledger, chain)


@pytest.fixture(autouse=True)
async def no_faults(request: pytest.FixtureRequest) -> None:
    if "world" in request.fixturenames:
        world: World = request.getfixturevalue("world")
        await world.chain.configure()


async def test_a_withdrawal_holds_checks_broadcasts_confirms_and_posts(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    w = await world.funding.withdraw(acct, "10")
    assert w.state == F.WITHDRAWAL_STATE_PENDING and w.fee == "1" and w.amount == "10"
    done = await world.funding.settle(acct, w.withdrawal_id)
    assert done.state == F.WITHDRAWAL_STATE_COMPLETED, done
    assert done.txid and done.confirmations >= done.required_confirmations == 3
    assert done.HasField("complete_time") and not done.HasField("failure")
    assert await world.ledger.available(acct, "USDT") == "89"
    assert (await world.ledger.balance("sys:fees", "USDT")).credits_posted == "1"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 2}
    saga = await world.funding.saga(done.saga_id)
    assert saga.state == F.SAGA_STATE_COMPLETED and saga.kind == F.SAGA_KIND_WITHDRAWAL
    succeeded = [s.name for s in saga.steps if s.state == F.SAGA_STEP_STATE_SUCCEEDED]
    assert succeeded == [
        "ledger_hold",
        "risk_check",
        "await_approval",  # below the threshold: done at once
        "custody_broadcast",
        "await_confirmations",
        "ledger_post",
    ]
    # Every side-effecting step logged STARTED before its outcome.
    names = [(s.name, s.state) for s in saga.steps]
    for step in ("ledger_hold", "risk_check", "custody_broadcast", "ledger_post"):
        assert names.index((step, F.SAGA_STEP_STATE_STARTED)) < names.index(
            (step, F.SAGA_STEP_STATE_SUCCEEDED)
        )
    stats = await world.chain.stats()
    assert stats["broadcast_calls"][w.withdrawal_id] == 1
    assert (await world.ledger.audit()).balanced


async def test_insufficient_funds_is_rejected_and_moves_nothing(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "5")
    w = await world.funding.settle(acct, (await world.funding.withdraw(acct, "5")).withdrawal_id)
    assert w.state == F.WITHDRAWAL_STATE_REJECTED  # 5 + fee 1 > 5
    assert w.failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "LEDGER_INSUFFICIENT_FUNDS" in w.failure.SerializeToString().decode(errors="ignore")
    assert await world.ledger.available(acct, "USDT") == "5"
    assert (await world.chain.stats())["broadcast_calls"].get(w.withdrawal_id) is None


async def test_a_risk_denial_voids_the_hold(world: World, stack: Stack, trust: Trust) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    await _freeze(trust, stack, acct)
    w = await world.funding.settle(acct, (await world.funding.withdraw(acct, "10")).withdrawal_id)
    assert w.state == F.WITHDRAWAL_STATE_REJECTED
    assert b"RISK_ACCOUNT_FROZEN" in w.failure.SerializeToString()
    assert await world.ledger.available(acct, "USDT") == "100"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 3}
    saga = await world.funding.saga(w.saga_id)
    assert saga.state == F.SAGA_STATE_COMPENSATED
    assert [(s.name, s.compensation, s.state) for s in saga.steps][-3:] == [
        ("risk_check", False, F.SAGA_STEP_STATE_FAILED),
        ("ledger_hold", True, F.SAGA_STEP_STATE_STARTED),
        ("ledger_hold", True, F.SAGA_STEP_STATE_SUCCEEDED),
    ]
    assert (await world.ledger.audit()).balanced


async def _freeze(trust: Trust, stack: Stack, account: str) -> None:
    from cex.risk.v1 import risk_pb2, risk_pb2_grpc

    async with trust.channel(stack.edge) as channel:
        await risk_pb2_grpc.RiskServiceStub(channel).SetKillSwitch(
            risk_pb2.SetKillSwitchRequest(
                request_id=uuid.uuid4().hex,
                scope=risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT,
                account_id=account,
                engaged=True,
                block_withdrawals=True,
                reason="funding test",
            ),
            timeout=10,
        )


async def test_custody_refusal_fails_the_withdrawal_and_voids_the_hold(world: World) -> None:
    await world.chain.configure(broadcast_reject=1.0)
    acct = new_account()
    await fund(world.ledger, acct, "100")
    w = await world.funding.settle(acct, (await world.funding.withdraw(acct, "10")).withdrawal_id)
    assert w.state == F.WITHDRAWAL_STATE_FAILED
    assert b"FUNDING_CUSTODY_REJECTED" in w.failure.SerializeToString()
    assert await world.ledger.available(acct, "USDT") == "100"
    assert (await world.ledger.audit()).balanced


async def test_a_dropped_transaction_fails_and_voids_the_hold(world: World) -> None:
    await world.chain.configure(drop=1.0)
    acct = new_account()
    await fund(world.ledger, acct, "100")
    w = await world.funding.settle(acct, (await world.funding.withdraw(acct, "10")).withdrawal_id)
    assert w.state == F.WITHDRAWAL_STATE_FAILED and w.txid
    assert b"FUNDING_TRANSACTION_DROPPED" in w.failure.SerializeToString()
    assert await world.ledger.available(acct, "USDT") == "100"


async def test_lost_answers_and_reorgs_still_broadcast_once_and_complete(world: World) -> None:
    await world.chain.configure(broadcast_timeout=1.0, broadcast_error=0.5, reorg=1.0)
    acct = new_account()
    await fund(world.ledger, acct, "100")
    ws = [await world.funding.withdraw(acct, "10") for _ in range(3)]
    done = [await world.funding.settle(acct, w.withdrawal_id) for w in ws]
    assert {d.state for d in done} == {F.WITHDRAWAL_STATE_COMPLETED}
    stats = await world.chain.stats()
    for w in ws:
        assert stats["broadcast_calls"][w.withdrawal_id] >= 2  # the first answer was lost
        assert stats["withdrawals"][w.withdrawal_id]["status"] == "confirmed"
    assert len({d.txid for d in done}) == 3
    assert await world.ledger.available(acct, "USDT") == "67"


async def test_the_same_request_id_is_one_withdrawal(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    first = await world.funding.withdraw(acct, "10", request_id="same")
    again = await world.funding.withdraw(acct, "10", request_id="same")
    assert again.withdrawal_id == first.withdrawal_id
    other = await rpc_error(world.funding.withdraw(acct, "11", request_id="same"))
    assert (other.code, other.reason, other.domain) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "FUNDING_REQUEST_ID_REUSED",
        "funding",
    )
    await world.funding.settle(acct, first.withdrawal_id)
    assert await world.ledger.available(acct, "USDT") == "89"


BAD_INPUT: list[tuple[dict[str, str], str, str]] = [
    ({"asset": "DOGE"}, "FUNDING_ASSET_UNSUPPORTED", "asset"),
    ({"address": "not-an-address"}, "FUNDING_ADDRESS_INVALID", "address"),
    ({"asset": "BTC", "address": "0x" + "b" * 40}, "FUNDING_ADDRESS_INVALID", "address"),
    ({"amount": "0.5"}, "FUNDING_AMOUNT_BELOW_MINIMUM", "amount"),
    ({"amount": "1.000000001"}, "FUNDING_AMOUNT_INVALID", "amount"),
    ({"amount": "1e3"}, "FUNDING_AMOUNT_INVALID", "amount"),
    ({"amount": "-5"}, "FUNDING_AMOUNT_INVALID", "amount"),
    ({"network": "tron"}, "FUNDING_NETWORK_UNSUPPORTED", "network"),
    ({"memo": "123"}, "FUNDING_MEMO_NOT_SUPPORTED", "memo"),
    ({"request_id": ""}, "FUNDING_REQUEST_ID_INVALID", "request_id"),
]


async def test_bad_input_is_refused_with_field_violations_and_moves_no_money(
    world: World,
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    for fields, reason, field in BAD_INPUT:
        request = F.RequestWithdrawalRequest(
            request_id=uuid.uuid4().hex,
            account_id=acct,
            asset="USDT",
            amount="10",
            address="0x" + "b" * 40,
        )
        for name, value in fields.items():
            setattr(request, name, value)
        bad = await rpc_error(world.funding.stub.RequestWithdrawal(request))
        assert (bad.code, bad.reason, bad.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            "funding",
        )
        assert [v.field for v in bad.violations] == [field]
        listed = await world.funding.stub.ListWithdrawals(F.ListWithdrawalsRequest(account_id=acct))
        assert not listed.withdrawals
        assert await world.ledger.available(acct, "USDT") == "100"


async def test_a_fee_above_max_fee_is_refused(world: World) -> None:
    acct = new_account()
    bad = await rpc_error(world.funding.withdraw(acct, "10", max_fee="0.5"))
    assert (bad.code, bad.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FUNDING_FEE_TOO_HIGH")
    ok = await world.funding.withdraw(acct, "10", max_fee="1", asset="USDT")
    assert ok.fee == "1"


async def test_btc_minimum_and_precision(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "1", asset="BTC")
    w = await world.funding.withdraw(acct, "0.5", asset="BTC", address=BTC_ADDRESS)
    assert (await world.funding.settle(acct, w.withdrawal_id)).state == F.WITHDRAWAL_STATE_COMPLETED
    assert await world.ledger.available(acct, "BTC") == "0.49998"


async def test_cancel_after_broadcast_or_after_the_end_is_refused(
    world: World, stack: Stack, trust: Trust
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    done = await world.funding.settle(
        acct, (await world.funding.withdraw(acct, "10")).withdrawal_id
    )
    assert done.state == F.WITHDRAWAL_STATE_COMPLETED
    late = await rpc_error(_cancel(world.funding, acct, done.withdrawal_id, "late"))
    assert (late.code, late.reason, late.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FUNDING_WITHDRAWAL_ALREADY_BROADCAST",
        "funding",
    )
    await _freeze(trust, stack, acct)
    refused = await world.funding.settle(
        acct, (await world.funding.withdraw(acct, "10")).withdrawal_id
    )
    assert refused.state == F.WITHDRAWAL_STATE_REJECTED
    after = await rpc_error(_cancel(world.funding, acct, refused.withdrawal_id, "after"))
    assert (after.code, after.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FUNDING_WITHDRAWAL_NOT_CANCELLABLE",
    )


def _cancel(funding: Funding, account: str, withdrawal_id: str, request_id: str):  # type: ignore[no-untyped-def]
    return funding.stub.CancelWithdrawal(
        F.CancelWithdrawalRequest(
            request_id=request_id, account_id=account, withdrawal_id=withdrawal_id
        ),
        timeout=10,
    )


async def test_cancel_before_broadcast_voids_the_hold_and_never_reaches_custody(
    stack: Stack, fresh_database_url: str, trust: Trust, private_nats: str
) -> None:
    # Risk unreachable: the saga holds, then retries the check with backoff.
    dead = f"127.0.0.1:{free_ports().edge}"
    async with (
        running_ledger(fresh_database_url, trust, private_nats) as ledger,
        chainsim() as chain,
        running_funding(
            stack,
            trust,
            fresh_database_url,
            funding_config(f"127.0.0.1:{ledger.server.port}", chain.target, risk_target=dead),
        ) as funding,
    ):
        acct = new_account()
        await fund(ledger, acct, "100")
        w = await funding.withdraw(acct, "10")
        for _ in range(200):
            saga = await funding.saga(w.saga_id)
            if any(s.state == F.SAGA_STEP_STATE_RETRYING for s in saga.steps):
                break
            await asyncio.sleep(0.02)
        assert await ledger.available(acct, "USDT") == "89"  # held
        cancelled = (await _cancel(funding, acct, w.withdrawal_id, "c1")).withdrawal
        assert cancelled.state == F.WITHDRAWAL_STATE_CANCELLED
        assert await ledger.available(acct, "USDT") == "100"
        assert await holds(fresh_database_url, [w.withdrawal_id]) == {w.withdrawal_id: 3}
        # The same cancel again, and another cancel, return the cancelled withdrawal.
        assert (await _cancel(funding, acct, w.withdrawal_id, "c1")).withdrawal.state == (
            F.WITHDRAWAL_STATE_CANCELLED
        )
        assert (await _cancel(funding, acct, w.withdrawal_id, "c2")).withdrawal.state == (
            F.WITHDRAWAL_STATE_CANCELLED
        )
        saga = await funding.saga(w.saga_id)
        assert saga.state == F.SAGA_STATE_COMPENSATED
        assert "custody_broadcast" not in {s.name for s in saga.steps}
        assert (await chain.stats())["broadcast_calls"] == {}
        # A risk that cannot answer is never an approval: a withdrawal left alone
        # runs out of retries and is rejected, its hold voided.
        other = await funding.settle(
            acct, (await funding.withdraw(acct, "10")).withdrawal_id, within_s=60
        )
        assert other.state == F.WITHDRAWAL_STATE_REJECTED
        assert await ledger.available(acct, "USDT") == "100"
        assert (await ledger.audit()).balanced


async def test_another_accounts_withdrawal_is_not_found(world: World) -> None:
    a, b = new_account(), new_account()
    await fund(world.ledger, a, "100")
    w = await world.funding.withdraw(a, "10")
    bad = await rpc_error(world.funding.get(b, w.withdrawal_id))
    assert (bad.code, bad.reason) == (grpc.StatusCode.NOT_FOUND, "FUNDING_WITHDRAWAL_NOT_FOUND")
    cancel = await rpc_error(
        world.funding.stub.CancelWithdrawal(
            F.CancelWithdrawalRequest(request_id="x", account_id=b, withdrawal_id=w.withdrawal_id),
        )
    )
    assert cancel.code == grpc.StatusCode.NOT_FOUND
    await world.funding.settle(a, w.withdrawal_id)


async def test_lists_page_newest_first(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    made = [(await world.funding.withdraw(acct, "2")).withdrawal_id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await world.funding.stub.ListWithdrawals(
            F.ListWithdrawalsRequest(account_id=acct, page_size=2, page_token=token),
        )
        seen += [w.withdrawal_id for w in page.withdrawals]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(made))
    sagas = await world.funding.stub.ListSagas(
        F.ListSagasRequest(account_id=acct, kind=F.SAGA_KIND_WITHDRAWAL),
    )
    assert len(sagas.sagas) == 5 and all(not s.steps for s in sagas.sagas)
    for wid in made:
        await world.funding.settle(acct, wid)


async def test_the_ledger_halt_refuses_new_holds(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    import asyncpg

    conn = await asyncpg.connect(world.funding.database_url)
    try:
        await conn.execute("UPDATE ledger.halt SET halted = true")
        w = await world.funding.settle(
            acct, (await world.funding.withdraw(acct, "10")).withdrawal_id
        )
        assert w.state == F.WITHDRAWAL_STATE_REJECTED
        assert b"LEDGER_HALTED" in w.failure.SerializeToString()
    finally:
        await conn.execute("UPDATE ledger.halt SET halted = false")
        await conn.close()
    assert await world.ledger.available(acct, "USDT") == "100"


async def test_a_thousand_concurrent_withdrawals_of_the_full_balance_accept_exactly_one(
    world: World,
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "11")  # 10 + fee 1
    never_negative = True
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal never_negative
        while not stop.is_set():
            b = await world.ledger.balance(acct, "USDT")
            never_negative &= Decimal(b.available) >= 0 and Decimal(b.total) >= 0
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())

    async def request(rid: str) -> F.Withdrawal:
        while True:  # as a client would: the same request_id until an answer
            try:
                return await world.funding.withdraw(acct, "10", request_id=rid)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise

    made = await asyncio.gather(*(request(f"all-{i}") for i in range(1000)))
    assert len({w.withdrawal_id for w in made}) == 1000
    finals = [await world.funding.settle(acct, w.withdrawal_id, within_s=120) for w in made]
    stop.set()
    await watcher
    states = Counter(f.state for f in finals)
    assert states == {F.WITHDRAWAL_STATE_COMPLETED: 1, F.WITHDRAWAL_STATE_REJECTED: 999}
    assert all(
        b"LEDGER_INSUFFICIENT_FUNDS" in f.failure.SerializeToString()
        for f in finals
        if f.state == F.WITHDRAWAL_STATE_REJECTED
    )
    assert never_negative
    assert await world.ledger.available(acct, "USDT") == "0"
    assert (await world.ledger.audit()).balanced


async def test_users_act_on_their_own_account_only(
    world: World, stack: Stack, service_credentials: ServiceCredentials
) -> None:
    from cex.auth.v1 import auth_pb2, auth_pb2_grpc

    operator = bearer(await service_credentials.token())

    async def user(scopes: list[int]) -> tuple[str, tuple[tuple[str, str]]]:
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            account = (
                await stub.CreateAccount(
                    auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="f"),
                    metadata=operator,
                )
            ).account.account_id
            key = await stub.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(
                    request_id=uuid.uuid4().hex,
                    account_id=account,
                    scopes=scopes,
                    allowed_cidrs=["0.0.0.0/0"],  # withdraw needs a list; any local caller
                ),
                metadata=operator,
            )
            token = await stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    api_key_id=key.api_key.api_key_id, api_key_secret=key.secret
                )
            )
        return account, bearer(token.access_token)

    read, withdraw = auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_WITHDRAW
    alice, alice_md = await user([read, withdraw])
    bob, bob_md = await user([read])
    await fund(world.ledger, alice, "50")
    mine = await world.funding.withdraw("", "10", md=alice_md)  # empty = the caller's own
    assert mine.account_id == alice
    await world.funding.settle(alice, mine.withdrawal_id)
    stub = world.funding.stub
    own = await stub.GetWithdrawal(
        F.GetWithdrawalRequest(withdrawal_id=mine.withdrawal_id), metadata=alice_md
    )
    assert own.withdrawal.state == F.WITHDRAWAL_STATE_COMPLETED
    # Bob can neither see Alice's withdrawal nor name her account.
    for call in (
        stub.GetWithdrawal(
            F.GetWithdrawalRequest(withdrawal_id=mine.withdrawal_id), metadata=bob_md
        ),
        stub.ListWithdrawals(F.ListWithdrawalsRequest(account_id=alice), metadata=bob_md),
        stub.GetDepositAddress(
            F.GetDepositAddressRequest(account_id=alice, asset="BTC"), metadata=bob_md
        ),
    ):
        assert (await rpc_error(call)).code == grpc.StatusCode.NOT_FOUND
    # Bob's key cannot withdraw, nor Alice's withdraw for Bob; sagas are for operators.
    no_scope = await rpc_error(world.funding.withdraw("", "10", md=bob_md))
    assert (no_scope.code, no_scope.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AUTH_SCOPE_MISSING",
    )
    other = await rpc_error(world.funding.withdraw(bob, "10", md=alice_md))
    assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "FUNDING_ACCOUNT_NOT_FOUND")
    sagas = await rpc_error(stub.ListSagas(F.ListSagasRequest(), metadata=alice_md))
    assert (sagas.code, sagas.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AUTH_SCOPE_MISSING")
    listed = await stub.ListWithdrawals(F.ListWithdrawalsRequest(), metadata=bob_md)
    assert not listed.withdrawals
    assert world.funding.server is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{world.funding.server.port}") as plain:
        no_token = funding_pb2_grpc.FundingServiceStub(plain)
        unauth = await rpc_error(no_token.ListWithdrawals(F.ListWithdrawalsRequest()))
    assert unauth.code == grpc.StatusCode.UNAUTHENTICATED
