"""The frozen-accounts copy against the stack's auth and NATS (issue 21): a push that
never arrives is caught by the change sequence (the next change shows the gap) or,
when no change follows, by the timer's reload from auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex_stack.supervisor import Stack
from services.chassis import AccountStates, ServiceCredentials
from services.chassis.account_states import push_from_nats
from services.chassis.server import background

SUSPENDED = auth_pb2.ACCOUNT_STATE_SUSPENDED


class Lossy(AccountStates):
    """A copy whose push loses the changes of the accounts in `lost`."""

    lost: set[str]

    def apply(self, change: auth_pb2.AccountStateChange) -> None:
        if change.account_id in self.lost:
            return
        super().apply(change)


@pytest.fixture
async def auth(
    stack: Stack, service_credentials: ServiceCredentials
) -> AsyncIterator[tuple[auth_pb2_grpc.AuthServiceStub, tuple[tuple[str, str], ...]]]:
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        md = (("authorization", f"Bearer {await service_credentials.token()}"),)
        yield auth_pb2_grpc.AuthServiceStub(channel), md


async def _account(stub: auth_pb2_grpc.AuthServiceStub, md: object) -> str:
    reply = await stub.CreateAccount(
        auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="backstop"),
        metadata=md,
    )
    return reply.account.account_id


async def _freeze(stub: auth_pb2_grpc.AuthServiceStub, md: object, account: str) -> None:
    await stub.SetAccountState(
        auth_pb2.SetAccountStateRequest(
            request_id=uuid.uuid4().hex, account_id=account, state=SUSPENDED, reason="test"
        ),
        metadata=md,
    )


async def _frozen_within(states: AccountStates, accounts: list[str], within_s: float) -> float:
    began = time.monotonic()
    while not all(states.frozen(a) for a in accounts):
        assert time.monotonic() - began < within_s, [states.frozen(a) for a in accounts]
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_a_lost_push_is_caught_at_the_next_change_by_its_sequence(
    stack: Stack,
    auth: tuple[auth_pb2_grpc.AuthServiceStub, tuple[tuple[str, str], ...]],
) -> None:
    stub, md = auth
    missed, seen = await _account(stub, md), await _account(stub, md)
    states = Lossy(
        lambda: stub.GetFrozenAccounts(auth_pb2.GetFrozenAccountsRequest(), metadata=md),
        reload_s=3600,  # no timer: only the gap can tell
    )
    states.lost = {missed}
    push = push_from_nats(states, stack.nats_url, name="tests-backstop")
    async with background(states.run(push), "follower"):
        await asyncio.sleep(0.5)  # loaded and subscribed
        before = states.change_seq
        await _freeze(stub, md, missed)  # its push is lost
        await asyncio.sleep(0.3)
        assert states.frozen(missed) is None and states.change_seq == before
        await _freeze(stub, md, seen)  # its push shows that one change was skipped
        await _frozen_within(states, [seen, missed], within_s=1.0)
        assert states.change_seq >= before + 2


async def test_the_last_push_lost_is_caught_by_the_timers_reload(
    auth: tuple[auth_pb2_grpc.AuthServiceStub, tuple[tuple[str, str], ...]],
) -> None:
    stub, md = auth
    account = await _account(stub, md)
    states = AccountStates(
        lambda: stub.GetFrozenAccounts(auth_pb2.GetFrozenAccountsRequest(), metadata=md),
        reload_s=0.5,
    )
    async with background(states.run(), "follower"):  # no push at all
        await asyncio.sleep(0.2)
        await _freeze(stub, md, account)
        await _frozen_within(states, [account], within_s=1.5)
