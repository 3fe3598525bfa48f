"""auth on its own database: idempotency, paging, the JWKS over HTTP, key rotation."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.config import AuthConfig
from services.auth.server import build_server
from services.chassis import ChassisSettings, ErrorDetails
from services.chassis.authn import service_secret
from services.chassis.tokens import JwksCache, verify

SECRET = "test-shared-secret"
T0 = datetime.now(UTC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _auth(
    database_url: str,
    clock: Callable[[], datetime],
    jwks_port: int,
    *,
    nats_url: str | None = None,
) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    settings = ChassisSettings(service="auth", database_url=database_url, nats_url=nats_url)
    config = AuthConfig(jwks_port=jwks_port, service_secret=SECRET, scrypt_n=2**4)
    server = await build_server(settings, config=config, clock=clock)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield auth_pb2_grpc.AuthServiceStub(channel)
    finally:
        await server.stop(0)


async def _operator(stub: auth_pb2_grpc.AuthServiceStub) -> tuple[tuple[str, str], ...]:
    reply = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            api_key_id="svc:ops", api_key_secret=service_secret(SECRET, "ops")
        )
    )
    return (("authorization", f"Bearer {reply.access_token}"),)


def _jwks(port: int) -> dict[str, list[dict[str, str]]]:
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def _fails(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return ErrorDetails.from_rpc_error(failure.value)


async def test_idempotent_creation_and_paging(fresh_database_url: str) -> None:
    async with _auth(fresh_database_url, lambda: datetime.now(UTC), _free_port()) as stub:
        md = await _operator(stub)
        create = auth_pb2.CreateAccountRequest(request_id="r1", display_name="Bob", email="B@x.io")
        first = await stub.CreateAccount(create, metadata=md)
        again = await stub.CreateAccount(create, metadata=md)
        assert first.account.account_id == again.account.account_id
        assert first.account.email == "b@x.io"
        other = auth_pb2.CreateAccountRequest(request_id="r1", display_name="Eve")
        refused = await _fails(stub.CreateAccount(other, metadata=md))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "AUTH_REQUEST_ID_REUSED",
        )

        account = first.account.account_id
        keys = []
        for i in range(3):
            request = auth_pb2.CreateApiKeyRequest(
                request_id=f"k{i}", account_id=account, scopes=[auth_pb2.API_KEY_SCOPE_READ]
            )
            created = await stub.CreateApiKey(request, metadata=md)
            assert created.secret.startswith("sk_")
            retry = await stub.CreateApiKey(request, metadata=md)
            assert retry.api_key.api_key_id == created.api_key.api_key_id
            assert retry.secret == ""  # shown once
            keys.append(created.api_key.api_key_id)

        await stub.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(request_id="x", api_key_id=keys[0]), metadata=md
        )
        page1 = await stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(account_id=account, page_size=2), metadata=md
        )
        page2 = await stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(
                account_id=account, page_size=2, page_token=page1.next_page_token
            ),
            metadata=md,
        )
        listed = [k.api_key_id for k in [*page1.api_keys, *page2.api_keys]]
        assert listed == keys[::-1] and page2.next_page_token == ""
        revoked = await stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(account_id=account, state=auth_pb2.API_KEY_STATE_REVOKED),
            metadata=md,
        )
        assert [k.api_key_id for k in revoked.api_keys] == [keys[0]]

        wrong = await _fails(
            stub.IssueToken(auth_pb2.IssueTokenRequest(api_key_id="svc:ops", api_key_secret="x"))
        )
        assert wrong.reason == "AUTH_INVALID_CREDENTIALS"


async def test_keys_rotate_with_overlap_and_the_jwks_follows(fresh_database_url: str) -> None:
    now = [T0]
    port = _free_port()

    async def token(stub: auth_pb2_grpc.AuthServiceStub) -> str:
        return (await _operator(stub))[0][1].removeprefix("Bearer ")

    def kid(jwt: str) -> str:
        import base64

        return json.loads(base64.urlsafe_b64decode(jwt.split(".")[0] + "=="))["kid"]

    async with _auth(fresh_database_url, lambda: now[0], port) as stub:
        old_token = await token(stub)
        jwks = await asyncio.to_thread(_jwks, port)
        assert [k["kid"] for k in jwks["keys"]] == [kid(old_token)]
        with pytest.raises(urllib.error.HTTPError):
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/x", None, 5)

    now[0] = T0 + timedelta(days=7)  # a rotation is due: the next key is published first
    async with _auth(fresh_database_url, lambda: now[0], port) as stub:
        jwks = await asyncio.to_thread(_jwks, port)
        assert len(jwks["keys"]) == 2
        assert kid(await token(stub)) == kid(old_token)  # not signing yet

    now[0] = T0 + timedelta(days=7, minutes=11)
    async with _auth(fresh_database_url, lambda: now[0], port) as stub:
        new_token = await token(stub)
        assert kid(new_token) != kid(old_token)
        cache = JwksCache(f"http://127.0.0.1:{port}/.well-known/jwks.json")
        keys = await cache.keys()
        # The old key stays published until its last token has expired.
        assert set(keys) == {kid(old_token), kid(new_token)}
        assert verify(new_token, keys, now=now[0].timestamp()).subject == "svc:ops"

    now[0] = T0 + timedelta(days=7, minutes=10 + 15 + 2)  # past the overlap
    async with _auth(fresh_database_url, lambda: now[0], port):
        jwks = await asyncio.to_thread(_jwks, port)
        assert [k["kid"] for k in jwks["keys"]] == [kid(new_token)]


async def test_suspend_reactivate_and_close_an_account(fresh_database_url: str) -> None:
    async with _auth(fresh_database_url, lambda: datetime.now(UTC), _free_port()) as stub:
        md = await _operator(stub)
        account = (
            await stub.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id="a", display_name="Mallory"), metadata=md
            )
        ).account.account_id
        both = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id="k1",
                account_id=account,
                scopes=[auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE],
            ),
            metadata=md,
        )
        trade = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id="k2", account_id=account, scopes=[auth_pb2.API_KEY_SCOPE_TRADE]
            ),
            metadata=md,
        )

        def issue(created: auth_pb2.CreateApiKeyResponse) -> object:
            return stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    api_key_id=created.api_key.api_key_id, api_key_secret=created.secret
                )
            )

        def set_state(request_id: str, state: int, reason: str = "review") -> object:
            return stub.SetAccountState(
                auth_pb2.SetAccountStateRequest(
                    request_id=request_id, account_id=account, state=state, reason=reason
                ),
                metadata=md,
            )

        user_md = (("authorization", f"Bearer {(await issue(both)).access_token}"),)  # type: ignore[attr-defined]
        # Only an admin or a service may freeze: the account's own token may not.
        refused = await _fails(
            stub.SetAccountState(
                auth_pb2.SetAccountStateRequest(
                    request_id="s0", account_id=account, state=auth_pb2.ACCOUNT_STATE_ACTIVE
                ),
                metadata=user_md,
            )
        )
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_SCOPE_MISSING",
        )
        suspended = await set_state("s1", auth_pb2.ACCOUNT_STATE_SUSPENDED)
        assert suspended.account.state == auth_pb2.ACCOUNT_STATE_SUSPENDED  # type: ignore[attr-defined]
        # Frozen: new tokens are read-only; a key without read gets none.
        assert list((await issue(both)).scopes) == [auth_pb2.API_KEY_SCOPE_READ]  # type: ignore[attr-defined]
        frozen = await _fails(issue(trade))
        assert (frozen.code, frozen.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_ACCOUNT_SUSPENDED",
        )
        # The same request again is the same change; another body under its id is refused.
        again = await set_state("s1", auth_pb2.ACCOUNT_STATE_SUSPENDED)
        assert again.account.state == auth_pb2.ACCOUNT_STATE_SUSPENDED  # type: ignore[attr-defined]
        reused = await _fails(set_state("s1", auth_pb2.ACCOUNT_STATE_CLOSED))
        assert (reused.code, reused.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "AUTH_REQUEST_ID_REUSED",
        )
        await set_state("s2", auth_pb2.ACCOUNT_STATE_ACTIVE)
        assert len((await issue(both)).scopes) == 2  # type: ignore[attr-defined]
        # Closed is final.
        await set_state("s3", auth_pb2.ACCOUNT_STATE_CLOSED, "closed at the owner's request")
        closed = await _fails(issue(both))
        assert (closed.code, closed.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_ACCOUNT_NOT_ACTIVE",
        )
        reopen = await _fails(set_state("s4", auth_pb2.ACCOUNT_STATE_ACTIVE))
        assert (reopen.code, reopen.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "AUTH_ACCOUNT_CLOSED",
        )
        bad = await _fails(set_state("s5", auth_pb2.ACCOUNT_STATE_UNSPECIFIED))
        assert (bad.code, bad.reason, bad.violations[0].field) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "AUTH_INVALID_ACCOUNT_STATE",
            "state",
        )
        unknown = await _fails(
            stub.SetAccountState(
                auth_pb2.SetAccountStateRequest(
                    request_id="s6", account_id="acc_nope", state=auth_pb2.ACCOUNT_STATE_ACTIVE
                ),
                metadata=md,
            )
        )
        assert (unknown.code, unknown.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "AUTH_ACCOUNT_NOT_FOUND",
        )
