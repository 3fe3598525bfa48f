"""auth publishes every account-state change (issue 21): on NATS after the commit, in
change-sequence order, and as a whole in GetFrozenAccounts; its own authenticator
refuses a frozen account's old token at once (real PostgreSQL and NATS)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import nats

from cex.auth.v1 import auth_pb2
from services.chassis import ErrorDetails
from services.chassis.account_states import SUBJECT
from tests.integration.auth.test_auth_service import _auth, _free_port, _operator

ADMIN, READ = auth_pb2.API_KEY_SCOPE_ADMIN, auth_pb2.API_KEY_SCOPE_READ


async def test_changes_are_pushed_in_sequence_and_refused_at_the_next_call(
    fresh_database_url: str, private_nats: str
) -> None:
    heard: asyncio.Queue[auth_pb2.AccountStateChange] = asyncio.Queue()
    client = await nats.connect(private_nats)

    async def on_message(message: object) -> None:
        await heard.put(auth_pb2.AccountStateChange.FromString(message.data))  # type: ignore[attr-defined]

    await client.subscribe(SUBJECT, cb=on_message)
    try:
        async with _auth(
            fresh_database_url,
            lambda: datetime.now(UTC),
            _free_port(),
            nats_url=private_nats,
        ) as stub:
            md = await _operator(stub)
            account = (
                await stub.CreateAccount(
                    auth_pb2.CreateAccountRequest(request_id="a", display_name="Ops"), metadata=md
                )
            ).account.account_id
            key = await stub.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(
                    request_id="k", account_id=account, scopes=[READ, ADMIN]
                ),
                metadata=md,
            )
            token = await stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    api_key_id=key.api_key.api_key_id, api_key_secret=key.secret
                )
            )
            admin_md = (("authorization", f"Bearer {token.access_token}"),)
            create = auth_pb2.CreateAccountRequest(request_id="b", display_name="Bob")
            await stub.CreateAccount(create, metadata=admin_md)

            async def set_state(request_id: str, state: int) -> None:
                await stub.SetAccountState(
                    auth_pb2.SetAccountStateRequest(
                        request_id=request_id, account_id=account, state=state, reason="review"
                    ),
                    metadata=md,
                )

            await set_state("s1", auth_pb2.ACCOUNT_STATE_SUSPENDED)
            first = await asyncio.wait_for(heard.get(), 1.0)  # pushed within a second
            assert (first.change_seq, first.account_id, first.state, first.reason) == (
                1,
                account,
                auth_pb2.ACCOUNT_STATE_SUSPENDED,
                "review",
            )
            # The token issued before the freeze still carries admin: refused now,
            # not when it expires. Its reads stay.
            with_old = auth_pb2.CreateAccountRequest(request_id="c", display_name="Carol")
            try:
                await stub.CreateAccount(with_old, metadata=admin_md)
                raise AssertionError("a suspended account's admin token still worked")
            except grpc.aio.AioRpcError as error:
                refused = ErrorDetails.from_rpc_error(error)
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "AUTH_ACCOUNT_SUSPENDED",
            )
            read = await stub.GetAccount(auth_pb2.GetAccountRequest(), metadata=admin_md)
            assert read.account.state == auth_pb2.ACCOUNT_STATE_SUSPENDED
            frozen = await stub.GetFrozenAccounts(auth_pb2.GetFrozenAccountsRequest(), metadata=md)
            assert frozen.change_seq == 1
            assert [(a.account_id, a.change_seq) for a in frozen.accounts] == [(account, 1)]
            # Users may not read the list.
            try:
                await stub.GetFrozenAccounts(auth_pb2.GetFrozenAccountsRequest(), metadata=admin_md)
                raise AssertionError("a user read the frozen accounts")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED

            await set_state("s2", auth_pb2.ACCOUNT_STATE_ACTIVE)
            second = await asyncio.wait_for(heard.get(), 1.0)
            assert (second.change_seq, second.state) == (2, auth_pb2.ACCOUNT_STATE_ACTIVE)
            await stub.CreateAccount(with_old, metadata=admin_md)  # reactivated: allowed again
            assert not (
                await stub.GetFrozenAccounts(auth_pb2.GetFrozenAccountsRequest(), metadata=md)
            ).accounts
            await set_state("s3", auth_pb2.ACCOUNT_STATE_CLOSED)
            third = await asyncio.wait_for(heard.get(), 1.0)
            assert (third.change_seq, third.state) == (3, auth_pb2.ACCOUNT_STATE_CLOSED)
            try:
                await stub.CreateAccount(
                    auth_pb2.CreateAccountRequest(request_id="d", display_name="Dan"),
                    metadata=admin_md,
                )
                raise AssertionError("a closed account's admin token still worked")
            except grpc.aio.AioRpcError as error:
                assert ErrorDetails.from_rpc_error(error).reason == "AUTH_ACCOUNT_CLOSED"
            # The stream keeps every change, with its sequence as the message id.
            js = client.jetstream()
            info = await js.stream_info("AUTH_EVENTS")
            assert info.state.messages == 3
    finally:
        await client.close()
