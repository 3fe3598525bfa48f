"""Withdrawal protections against a real ledger, the stack's risk through Envoy, the chain
simulator as a process and PostgreSQL: the address allowlist (cooling, refusals that move
no money, the delayed turn-off) and the operator's approval above a threshold (approve ->
broadcast once, reject and deadline -> hold voided and the balance back)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from cex.funding.v1 import funding_pb2 as F
from cex_stack.supervisor import Stack
from services.chassis import ServiceCredentials
from tests.conftest import Trust
from tests.integration.funding.support import (
    ETH_ADDRESS,
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

COOLING_S = 2.0
OTHER_ADDRESS = "0x" + "c" * 40
# USDT above 100 waits for an operator; a minute to decide (the deadline test runs a
# replica of its own that gives a second).
GUARDED = {"address_cooling_s": COOLING_S, "approval_thresholds": {"USDT": "100"},
           "approval_timeout_s": 60.0, "approval_poll_s": 0.05}  # fmt: skip


@dataclass
class World:
    funding: Funding
    ledger: Ledger
    chain: Chain


@pytest.fixture(scope="module")
async def world(stack: Stack, trust: Trust, module_nats: str) -> AsyncIterator[World]:
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, module_nats) as ledger,
        chainsim() as chain,
        running_funding(
            stack,
            trust,
            database_url,
            funding_config(f"127.0.0.1:{ledger.server.port}", chain.target, **GUARDED),
        ) as funding,
    ):
        yield World(funding, ledger, chain)


async def add_address(
    world: World, account: str, address: str = ETH_ADDRESS
) -> F.WithdrawalAddress:
    reply = await world.funding.stub.AddWithdrawalAddress(
        F.AddWithdrawalAddressRequest(
            request_id=uuid.uuid4().hex, account_id=account, asset="USDT", address=address,
            label="cold wallet",
        ),
        timeout=10,
    )  # fmt: skip
    return reply.withdrawal_address


async def set_allowlist(world: World, account: str, enabled: bool) -> F.WithdrawalAllowlist:
    reply = await world.funding.stub.SetWithdrawalAllowlist(
        F.SetWithdrawalAllowlistRequest(
            request_id=uuid.uuid4().hex, account_id=account, enabled=enabled
        ),
        timeout=10,
    )
    return reply.withdrawal_allowlist


async def refused(world: World, account: str, address: str) -> str:
    error = await rpc_error(world.funding.withdraw(account, "10", address=address))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
    return error.reason


async def reach(
    funding: Funding, account: str, withdrawal_id: str, state: int, within_s: float = 30
) -> F.Withdrawal:
    until = time.monotonic() + within_s
    while True:
        w = await funding.get(account, withdrawal_id)
        if w.state == state:
            return w
        assert time.monotonic() < until, w
        await asyncio.sleep(0.05)


# -- the allowlist ---------------------------------------------------------------------


async def test_the_allowlist_refuses_unlisted_and_cooling_addresses_and_moves_nothing(
    world: World,
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    on = await set_allowlist(world, acct, True)
    assert on.enabled and not on.HasField("disable_time")
    assert await refused(world, acct, ETH_ADDRESS) == "FUNDING_ADDRESS_NOT_ALLOWED"
    added = await add_address(world, acct)
    assert added.network == "ethereum" and added.label == "cold wallet"
    cooling = (
        added.usable_time.ToDatetime().timestamp() - added.create_time.ToDatetime().timestamp()
    )
    assert cooling == pytest.approx(COOLING_S, abs=0.01)
    assert await refused(world, acct, ETH_ADDRESS) == "FUNDING_ADDRESS_COOLING"
    assert await refused(world, acct, OTHER_ADDRESS) == "FUNDING_ADDRESS_NOT_ALLOWED"
    # Refused before anything is held: no withdrawal, no hold, the balance untouched.
    listed = await world.funding.stub.ListWithdrawals(F.ListWithdrawalsRequest(account_id=acct))
    assert not listed.withdrawals
    assert await world.ledger.available(acct, "USDT") == "100"
    # Once cooled the address takes withdrawals; others still do not.
    await asyncio.sleep(max(0.0, added.usable_time.ToDatetime().timestamp() - time.time()) + 0.1)
    w = await world.funding.withdraw(acct, "10", address=ETH_ADDRESS)
    done = await world.funding.settle(acct, w.withdrawal_id)
    assert done.state == F.WITHDRAWAL_STATE_COMPLETED, done
    assert await refused(world, acct, OTHER_ADDRESS) == "FUNDING_ADDRESS_NOT_ALLOWED"
    assert await world.ledger.available(acct, "USDT") == "89"
    # Removing it takes effect at once.
    removed = await world.funding.stub.RemoveWithdrawalAddress(
        F.RemoveWithdrawalAddressRequest(
            request_id=uuid.uuid4().hex, account_id=acct, address_id=added.address_id
        )
    )
    assert removed.withdrawal_address.HasField("remove_time")
    assert await refused(world, acct, ETH_ADDRESS) == "FUNDING_ADDRESS_NOT_ALLOWED"
    assert (await world.ledger.audit()).balanced


async def test_turning_the_allowlist_off_waits_the_cooling_period(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "100")
    await set_allowlist(world, acct, True)
    off = await set_allowlist(world, acct, False)
    # Still on until disable_time: a stolen key cannot turn it off and withdraw at once.
    assert off.enabled and off.HasField("disable_time")
    assert await refused(world, acct, OTHER_ADDRESS) == "FUNDING_ADDRESS_NOT_ALLOWED"
    again = await set_allowlist(world, acct, False)  # asking again does not push it back
    assert again.disable_time == off.disable_time
    await asyncio.sleep(max(0.0, off.disable_time.ToDatetime().timestamp() - time.time()) + 0.1)
    got = await world.funding.stub.GetWithdrawalAllowlist(
        F.GetWithdrawalAllowlistRequest(account_id=acct)
    )
    assert not got.withdrawal_allowlist.enabled
    w = await world.funding.withdraw(acct, "10", address=OTHER_ADDRESS)
    assert (await world.funding.settle(acct, w.withdrawal_id)).state == (
        F.WITHDRAWAL_STATE_COMPLETED
    )


async def test_allowlist_calls_are_idempotent_by_request_id(world: World) -> None:
    acct = new_account()
    request = F.AddWithdrawalAddressRequest(
        request_id="add-1", account_id=acct, asset="USDT", address=ETH_ADDRESS
    )
    first = (await world.funding.stub.AddWithdrawalAddress(request)).withdrawal_address
    again = (await world.funding.stub.AddWithdrawalAddress(request)).withdrawal_address
    assert again == first
    # The same address again (another request_id) is the address already listed.
    assert (await add_address(world, acct)).address_id == first.address_id
    other = F.AddWithdrawalAddressRequest(
        request_id="add-1", account_id=acct, asset="USDT", address=OTHER_ADDRESS
    )
    reused = await rpc_error(world.funding.stub.AddWithdrawalAddress(other))
    assert (reused.code, reused.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "FUNDING_REQUEST_ID_REUSED",
    )
    listed = await world.funding.stub.ListWithdrawalAddresses(
        F.ListWithdrawalAddressesRequest(account_id=acct)
    )
    assert [a.address for a in listed.withdrawal_addresses] == [ETH_ADDRESS]
    bad = await rpc_error(
        world.funding.stub.AddWithdrawalAddress(
            F.AddWithdrawalAddressRequest(
                request_id="add-2", account_id=acct, asset="USDT", address="0xnope"
            )
        )
    )
    assert bad.reason == "FUNDING_WITHDRAWAL_ADDRESS_INVALID"
    assert [v.field for v in bad.violations] == ["address"]
    missing = await rpc_error(
        world.funding.stub.RemoveWithdrawalAddress(
            F.RemoveWithdrawalAddressRequest(request_id="rm", account_id=acct, address_id="wa_x")
        )
    )
    assert (missing.code, missing.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "FUNDING_WITHDRAWAL_ADDRESS_NOT_FOUND",
    )


# -- the operator's approval -------------------------------------------------------------


async def awaiting(world: World, acct: str, amount: str = "150") -> F.Withdrawal:
    w = await world.funding.withdraw(acct, amount)
    assert w.approval_required and w.HasField("approval_deadline_time")
    return await reach(world.funding, acct, w.withdrawal_id, F.WITHDRAWAL_STATE_AWAITING_APPROVAL)


async def test_below_the_threshold_no_approval_is_needed(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "200")
    w = await world.funding.withdraw(acct, "100")
    assert not w.approval_required
    done = await world.funding.settle(acct, w.withdrawal_id)
    assert done.state == F.WITHDRAWAL_STATE_COMPLETED
    refused_review = await rpc_error(
        world.funding.stub.ApproveWithdrawal(
            F.ApproveWithdrawalRequest(request_id="a", withdrawal_id=w.withdrawal_id)
        )
    )
    assert refused_review.reason == "FUNDING_APPROVAL_NOT_REQUIRED"


async def test_an_approved_withdrawal_is_broadcast_once_and_completes(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "1000")
    w = await awaiting(world, acct)
    # Held (amount + fee) and allowed by risk, not handed to custody.
    assert await world.ledger.available(acct, "USDT") == "849"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 1}
    assert w.withdrawal_id not in (await world.chain.stats())["broadcast_calls"]
    listed = await world.funding.stub.ListWithdrawals(
        F.ListWithdrawalsRequest(account_id=acct, state=F.WITHDRAWAL_STATE_AWAITING_APPROVAL)
    )
    assert [x.withdrawal_id for x in listed.withdrawals] == [w.withdrawal_id]
    approve = F.ApproveWithdrawalRequest(
        request_id="approve-1", withdrawal_id=w.withdrawal_id, reason="known customer"
    )
    approved = (await world.funding.stub.ApproveWithdrawal(approve)).withdrawal
    assert approved.review == F.WITHDRAWAL_REVIEW_APPROVED and approved.reviewed_by
    assert approved.review_reason == "known customer" and approved.HasField("review_time")
    assert (await world.funding.stub.ApproveWithdrawal(approve)).withdrawal.review == (
        F.WITHDRAWAL_REVIEW_APPROVED
    )  # the same request again
    done = await world.funding.settle(acct, w.withdrawal_id)
    assert done.state == F.WITHDRAWAL_STATE_COMPLETED, done
    assert (await world.chain.stats())["broadcast_calls"][w.withdrawal_id] == 1
    assert await world.ledger.available(acct, "USDT") == "849"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 2}
    late = await rpc_error(
        world.funding.stub.RejectWithdrawal(
            F.RejectWithdrawalRequest(request_id="r", withdrawal_id=w.withdrawal_id, reason="x")
        )
    )
    assert late.reason == "FUNDING_WITHDRAWAL_ALREADY_REVIEWED"
    saga = await world.funding.saga(done.saga_id)
    steps = [(s.name, s.state) for s in saga.steps]
    assert steps.index(("await_approval", F.SAGA_STEP_STATE_SUCCEEDED)) < steps.index(
        ("custody_broadcast", F.SAGA_STEP_STATE_STARTED)
    )
    assert (await world.ledger.audit()).balanced


async def test_a_rejected_withdrawal_voids_the_hold_and_restores_the_balance(
    world: World,
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "1000")
    w = await awaiting(world, acct)
    no_reason = await rpc_error(
        world.funding.stub.RejectWithdrawal(
            F.RejectWithdrawalRequest(request_id="rj", withdrawal_id=w.withdrawal_id)
        )
    )
    assert (no_reason.code, no_reason.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FUNDING_REASON_INVALID",
    )
    rejected = (
        await world.funding.stub.RejectWithdrawal(
            F.RejectWithdrawalRequest(
                request_id="rj", withdrawal_id=w.withdrawal_id, reason="address flagged"
            )
        )
    ).withdrawal
    assert rejected.state == F.WITHDRAWAL_STATE_REJECTED, rejected  # waited for the void
    assert rejected.review == F.WITHDRAWAL_REVIEW_REJECTED
    assert b"FUNDING_WITHDRAWAL_REJECTED_BY_OPERATOR" in rejected.failure.SerializeToString()
    assert await world.ledger.available(acct, "USDT") == "1000"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 3}
    assert w.withdrawal_id not in (await world.chain.stats())["broadcast_calls"]
    approve = await rpc_error(
        world.funding.stub.ApproveWithdrawal(
            F.ApproveWithdrawalRequest(request_id="ap", withdrawal_id=w.withdrawal_id)
        )
    )
    assert approve.reason == "FUNDING_WITHDRAWAL_ALREADY_REVIEWED"
    assert (await world.ledger.audit()).balanced


async def test_the_owner_may_cancel_while_it_awaits_approval(world: World) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "1000")
    w = await awaiting(world, acct)
    cancelled = await world.funding.stub.CancelWithdrawal(
        F.CancelWithdrawalRequest(request_id="c", account_id=acct, withdrawal_id=w.withdrawal_id)
    )
    assert cancelled.withdrawal.state == F.WITHDRAWAL_STATE_CANCELLED
    assert await world.ledger.available(acct, "USDT") == "1000"
    late = await rpc_error(
        world.funding.stub.ApproveWithdrawal(
            F.ApproveWithdrawalRequest(request_id="ap2", withdrawal_id=w.withdrawal_id)
        )
    )
    assert late.reason == "FUNDING_WITHDRAWAL_NOT_AWAITING_APPROVAL"


async def test_no_approval_before_the_deadline_voids_the_hold(
    world: World, stack: Stack, trust: Trust
) -> None:
    acct = new_account()
    await fund(world.ledger, acct, "1000")
    hasty = funding_config(
        f"127.0.0.1:{world.ledger.server.port}",
        world.chain.target,
        **{**GUARDED, "approval_timeout_s": 1.0},
    )
    # A second replica on the same database, whose requests get a one-second deadline.
    async with running_funding(stack, trust, world.funding.database_url, hasty) as replica:
        w = await replica.withdraw(acct, "150")
        deadline = w.approval_deadline_time.ToDatetime().timestamp()
        assert deadline - w.create_time.ToDatetime().timestamp() == pytest.approx(1.0, abs=0.01)
        done = await replica.settle(acct, w.withdrawal_id)
    assert done.state == F.WITHDRAWAL_STATE_REJECTED, done
    assert done.review == F.WITHDRAWAL_REVIEW_EXPIRED
    assert b"FUNDING_APPROVAL_EXPIRED" in done.failure.SerializeToString()
    assert await world.ledger.available(acct, "USDT") == "1000"
    assert await holds(world.funding.database_url, [w.withdrawal_id]) == {w.withdrawal_id: 3}
    late = await rpc_error(
        world.funding.stub.ApproveWithdrawal(
            F.ApproveWithdrawalRequest(request_id="late", withdrawal_id=w.withdrawal_id)
        )
    )
    assert (late.code, late.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FUNDING_APPROVAL_EXPIRED",
    )
    assert w.withdrawal_id not in (await world.chain.stats())["broadcast_calls"]
    assert (await world.ledger.audit()).balanced


async def test_nobody_reviews_their_own_accounts_withdrawal(
    world: World, stack: Stack, service_credentials: ServiceCredentials
) -> None:
    from cex.auth.v1 import auth_pb2, auth_pb2_grpc

    operator = bearer(await service_credentials.token())
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        acct = (
            await stub.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="op"),
                metadata=operator,
            )
        ).account.account_id
        key = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex, account_id=acct, allowed_cidrs=["0.0.0.0/0"],
                scopes=[auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_WITHDRAW,
                        auth_pb2.API_KEY_SCOPE_ADMIN],
            ),
            metadata=operator,
        )  # fmt: skip
        token = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(api_key_id=key.api_key.api_key_id, api_key_secret=key.secret)
        )
    md = bearer(token.access_token)
    await fund(world.ledger, acct, "1000")
    w = await world.funding.withdraw("", "150", md=md)  # an admin withdrawing for themself
    await reach(world.funding, acct, w.withdrawal_id, F.WITHDRAWAL_STATE_AWAITING_APPROVAL)
    own = await rpc_error(
        world.funding.stub.ApproveWithdrawal(
            F.ApproveWithdrawalRequest(request_id="self", withdrawal_id=w.withdrawal_id),
            metadata=md,
        )
    )
    assert (own.code, own.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FUNDING_SELF_REVIEW")
    waiting = await world.funding.get(acct, w.withdrawal_id)
    assert waiting.review == F.WITHDRAWAL_REVIEW_UNSPECIFIED
