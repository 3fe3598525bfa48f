"""The security cases of the auth and edge issue, through the real Envoy and directly.

Every case asserts the exact gRPC code and ErrorInfo reason. Through Envoy, a bad
token is refused by jwt_authn itself (EDGE_UNAUTHENTICATED, domain "envoy": Envoy
does not say which check failed); directly, the service's own interceptor refuses
it with the precise reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import duration_pb2
from google.rpc import status_pb2

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES
from services.chassis import ErrorDetails, ServiceCredentials
from services.chassis.tokens import b64url, sign
from tests.e2e.signing import signing_key

READ, TRADE = auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
AUTH = next(s for s in SERVICES if s.name == "auth")


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Party:
    account_id: str
    key_id: str
    secret: str
    token: str


@dataclass
class World:
    stack: Stack
    a: Party  # read + trade
    a_read_only: str  # a token of A's with only `read`
    b: Party  # read
    kid: str
    key: Ed25519PrivateKey

    def target(self, where: str) -> str:
        if where == "edge":
            return self.stack.edge
        return f"{self.stack.ports.host}:{self.stack.ports.grpc(AUTH)}"

    def forge(self, **overrides: object) -> str:
        """A token signed with auth's real current key, claims overridden."""
        claims: dict[str, object] = {
            "subject": self.a.account_id,
            "key_id": self.a.key_id,
            "scopes": ["read", "trade"],
            "issued_at": int(time.time()),
            "ttl_s": 300,
            "token_id": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return sign(self.key, self.kid, **claims)  # type: ignore[arg-type]


# The longest lifetime auth gives: the module's parties keep their tokens throughout.
_MODULE_LONG = duration_pb2.Duration(seconds=900)


async def _party(stub: auth_pb2_grpc.AuthServiceStub, operator: str, scopes: list[int]) -> Party:
    md = _md(operator)
    account = (
        await stub.CreateAccount(
            auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="t"),
            metadata=md,
        )
    ).account
    created = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            request_id=uuid.uuid4().hex, account_id=account.account_id, scopes=scopes
        ),
        metadata=md,
    )
    token = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            api_key_id=created.api_key.api_key_id, api_key_secret=created.secret, ttl=_MODULE_LONG
        )
    )
    return Party(account.account_id, created.api_key.api_key_id, created.secret, token.access_token)


@pytest.fixture(scope="module")
async def world(stack: Stack, service_credentials: ServiceCredentials) -> World:
    service_token = await service_credentials.token()
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        a = await _party(stub, service_token, [READ, TRADE])
        b = await _party(stub, service_token, [READ])
        narrowed = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                api_key_id=a.key_id, api_key_secret=a.secret, scopes=[READ], ttl=_MODULE_LONG
            )
        )
    kid, key = await signing_key(stack.database_url)
    return World(stack, a, narrowed.access_token, b, kid, key)


async def _call(
    world: World, where: str, method: str, request: object, token: str | None
) -> ErrorDetails | object:
    async with grpc.aio.insecure_channel(world.target(where)) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        try:
            return await getattr(stub, method)(
                request, metadata=_md(token) if token else None, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return ErrorDetails.from_rpc_error(error)


def _refused(outcome: object, code: grpc.StatusCode, reason: str) -> None:
    assert isinstance(outcome, ErrorDetails), f"expected {code.name} {reason}, got {outcome}"
    assert (outcome.code, outcome.reason) == (code, reason), outcome


def _edge_or(where: str, direct_reason: str) -> str:
    return "EDGE_UNAUTHENTICATED" if where == "edge" else direct_reason


WHERE = ["edge", "direct"]


def _hs256_with_public_key(world: World) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": world.kid}).encode())
    valid = world.forge()
    payload = valid.split(".")[1]
    public = world.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    mac = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def _alg_none(world: World) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{world.forge().split('.')[1]}."


def _tampered(world: World) -> str:
    header, payload, signature = world.forge().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = world.b.account_id
    forged = b64url(json.dumps(claims).encode())
    return f"{header}.{forged}.{signature}"


BAD_TOKENS: dict[str, tuple[Callable[[World], str], str]] = {
    "expired": (
        lambda w: w.forge(issued_at=int(time.time()) - 3600, ttl_s=60),
        "AUTH_TOKEN_EXPIRED",
    ),
    "unknown_key": (
        lambda w: sign(
            Ed25519PrivateKey.generate(),
            "k-unknown",
            subject=w.a.account_id,
            key_id=w.a.key_id,
            scopes=["read"],
            issued_at=int(time.time()),
            ttl_s=300,
            token_id="x",
        ),
        "AUTH_UNKNOWN_KEY",
    ),
    "alg_none": (_alg_none, "AUTH_ALGORITHM_NOT_ALLOWED"),
    "hs256_with_public_key": (_hs256_with_public_key, "AUTH_ALGORITHM_NOT_ALLOWED"),
    "wrong_issuer": (lambda w: w.forge(issuer="someone-else"), "AUTH_WRONG_ISSUER"),
    "wrong_audience": (lambda w: w.forge(audience="other-exchange"), "AUTH_WRONG_AUDIENCE"),
    "tampered_payload": (_tampered, "AUTH_INVALID_SIGNATURE"),
    "garbage": (lambda w: "not.a.jwt", "AUTH_TOKEN_MALFORMED"),
}


@pytest.mark.parametrize("where", WHERE)
async def test_no_token_is_unauthenticated(world: World, where: str) -> None:
    outcome = await _call(world, where, "GetAccount", auth_pb2.GetAccountRequest(), None)
    _refused(outcome, UNAUTH, _edge_or(where, "AUTH_TOKEN_MISSING"))
    assert isinstance(outcome, ErrorDetails)
    assert outcome.domain == ("envoy" if where == "edge" else "auth")


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
@pytest.mark.parametrize("where", WHERE)
async def test_a_bad_token_is_unauthenticated(world: World, where: str, case: str) -> None:
    make, reason = BAD_TOKENS[case]
    outcome = await _call(world, where, "GetAccount", auth_pb2.GetAccountRequest(), make(world))
    if where == "edge" and case == "wrong_audience":  # jwt_authn answers 403 to that one
        _refused(outcome, DENIED, "EDGE_PERMISSION_DENIED")
    else:
        _refused(outcome, UNAUTH, _edge_or(where, reason))


@pytest.mark.parametrize("where", WHERE)
async def test_a_forged_token_from_the_real_key_is_accepted(world: World, where: str) -> None:
    """The control for the cases above: only the one thing changed makes them fail."""
    reply = await _call(world, where, "GetAccount", auth_pb2.GetAccountRequest(), world.forge())
    assert isinstance(reply, auth_pb2.GetAccountResponse)
    assert reply.account.account_id == world.a.account_id


@pytest.mark.parametrize("where", WHERE)
async def test_wrong_secret_and_unknown_key_get_no_token(world: World, where: str) -> None:
    for key_id, secret in ((world.a.key_id, "sk_wrong"), ("ak_nope", world.a.secret)):
        outcome = await _call(
            world,
            where,
            "IssueToken",
            auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret),
            None,
        )
        _refused(outcome, UNAUTH, "AUTH_INVALID_CREDENTIALS")


@pytest.mark.parametrize("where", WHERE)
async def test_a_revoked_key_gets_no_new_token_but_issued_tokens_live_to_expiry(
    world: World, where: str, service_token: str
) -> None:
    async with grpc.aio.insecure_channel(world.stack.edge) as channel:
        party = await _party(auth_pb2_grpc.AuthServiceStub(channel), service_token, [READ])
    revoked = await _call(
        world,
        where,
        "RevokeApiKey",
        auth_pb2.RevokeApiKeyRequest(request_id="r", api_key_id=party.key_id, reason="test"),
        party.token,
    )
    assert isinstance(revoked, auth_pb2.RevokeApiKeyResponse)
    assert revoked.api_key.state == auth_pb2.API_KEY_STATE_REVOKED
    outcome = await _call(
        world,
        where,
        "IssueToken",
        auth_pb2.IssueTokenRequest(api_key_id=party.key_id, api_key_secret=party.secret),
        None,
    )
    _refused(outcome, UNAUTH, "AUTH_KEY_REVOKED")
    # The revocation window: a token issued before works until it expires.
    still = await _call(world, where, "GetAccount", auth_pb2.GetAccountRequest(), party.token)
    assert isinstance(still, auth_pb2.GetAccountResponse)


@pytest.mark.parametrize("where", WHERE)
async def test_a_missing_scope_is_permission_denied(world: World, where: str) -> None:
    create = auth_pb2.CreateAccountRequest(request_id="x", display_name="x")
    _refused(
        await _call(world, where, "CreateAccount", create, world.a.token),
        DENIED,
        "AUTH_SCOPE_MISSING",
    )
    # A read-only token cannot mint a key that trades (no escalation through keys).
    grant = auth_pb2.CreateApiKeyRequest(request_id="y", scopes=[TRADE])
    _refused(
        await _call(world, where, "CreateApiKey", grant, world.a_read_only),
        DENIED,
        "AUTH_SCOPE_MISSING",
    )
    # A token narrower than its key.
    wider = auth_pb2.IssueTokenRequest(
        api_key_id=world.b.key_id, api_key_secret=world.b.secret, scopes=[TRADE]
    )
    _refused(await _call(world, where, "IssueToken", wider, None), DENIED, "AUTH_SCOPE_MISSING")


@pytest.mark.parametrize("where", WHERE)
async def test_account_a_cannot_see_or_touch_account_b(world: World, where: str) -> None:
    token = world.a.token
    cases = [
        (
            "GetAccount",
            auth_pb2.GetAccountRequest(account_id=world.b.account_id),
            "AUTH_ACCOUNT_NOT_FOUND",
        ),
        (
            "ListApiKeys",
            auth_pb2.ListApiKeysRequest(account_id=world.b.account_id),
            "AUTH_ACCOUNT_NOT_FOUND",
        ),
        (
            "RevokeApiKey",
            auth_pb2.RevokeApiKeyRequest(request_id="z", api_key_id=world.b.key_id),
            "AUTH_API_KEY_NOT_FOUND",
        ),
        (
            "CreateApiKey",
            auth_pb2.CreateApiKeyRequest(
                request_id="w", account_id=world.b.account_id, scopes=[READ]
            ),
            "AUTH_ACCOUNT_NOT_FOUND",
        ),
    ]
    for method, request, reason in cases:
        _refused(
            await _call(world, where, method, request, token), grpc.StatusCode.NOT_FOUND, reason
        )
    # ... and B's key is untouched.
    mine = await _call(world, where, "ListApiKeys", auth_pb2.ListApiKeysRequest(), world.b.token)
    assert isinstance(mine, auth_pb2.ListApiKeysResponse)
    assert [k.state for k in mine.api_keys] == [auth_pb2.API_KEY_STATE_ACTIVE]


async def test_the_token_endpoint_is_rate_limited_at_the_edge(world: World) -> None:
    request = auth_pb2.IssueTokenRequest(api_key_id="ak_nope", api_key_secret="x")
    async with grpc.aio.insecure_channel(world.stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)

        async def attempt() -> ErrorDetails:
            try:
                await stub.IssueToken(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                return ErrorDetails.from_rpc_error(error)
            raise AssertionError("a wrong key got a token")

        outcomes = await asyncio.gather(*(attempt() for _ in range(60)))
    limited = [o for o in outcomes if o.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(limited) >= 60 - 20 - 10  # the bucket holds at most 20, refilling 10 a second
    assert {(o.reason, o.domain, o.retry_after_s) for o in limited} == {
        ("EDGE_RATE_LIMITED", "envoy", 1.0)
    }
    others = {(o.code, o.reason) for o in outcomes if o not in limited}
    assert others <= {(UNAUTH, "AUTH_INVALID_CREDENTIALS")}
    await asyncio.sleep(2.5)  # let the bucket refill for the tests after this one


@pytest.mark.parametrize("where", WHERE)
async def test_an_oversized_message_is_resource_exhausted(world: World, where: str) -> None:
    big = auth_pb2.IssueTokenRequest(api_key_id="ak_nope", api_key_secret="x" * (5 * 1024 * 1024))
    outcome = await _call(world, where, "IssueToken", big, None)
    assert isinstance(outcome, ErrorDetails)
    # grpc refuses it before any handler runs, so there is no ErrorInfo to attach.
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "")


def _http(
    url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def test_rest_through_transcoding_works_with_a_token_and_fails_without(
    world: World,
) -> None:
    base = f"http://{world.stack.edge}"
    url = f"{base}/v1/accounts/{world.a.account_id}"
    status, _, body = await asyncio.to_thread(
        _http, url, headers={"authorization": f"Bearer {world.a.token}"}
    )
    assert status == 200, body
    assert json.loads(body)["account"]["account_id"] == world.a.account_id

    status, headers, _ = await asyncio.to_thread(_http, url, headers={})
    assert status == 401
    assert headers.get("www-authenticate", "").startswith("Bearer")

    # The token endpoint is public over REST too.
    payload = json.dumps({"api_key_id": world.b.key_id, "api_key_secret": world.b.secret})
    status, _, body = await asyncio.to_thread(
        _http,
        f"{base}/v1/tokens",
        method="POST",
        body=payload.encode(),
        headers={"content-type": "application/json"},
    )
    assert status == 200, body
    assert json.loads(body)["account_id"] == world.b.account_id

    # A service error keeps its code and reason over REST (google.rpc.Status as JSON).
    status, _, body = await asyncio.to_thread(
        _http,
        f"{base}/v1/accounts/{world.b.account_id}",
        headers={"authorization": f"Bearer {world.a.token}"},
    )
    assert status == 404
    reply = json.loads(body)
    assert reply["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply["details"][0]["reason"] == "AUTH_ACCOUNT_NOT_FOUND"


def _grpc_web(world: World, token: str | None) -> tuple[int, dict[str, str], bytes]:
    message = auth_pb2.GetAccountRequest().SerializeToString()
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    status, response_headers, body = _http(
        f"http://{world.stack.edge}/cex.auth.v1.AuthService/GetAccount",
        method="POST",
        body=frame,
        headers=headers,
    )
    return status, {k.lower(): v for k, v in response_headers.items()}, body


async def test_grpc_web_works(world: World) -> None:
    status, _, body = await asyncio.to_thread(_grpc_web, world, world.a.token)
    assert status == 200
    assert body[0] == 0  # a data frame: the GetAccountResponse
    size = int.from_bytes(body[1:5], "big")
    reply = auth_pb2.GetAccountResponse.FromString(body[5 : 5 + size])
    assert reply.account.account_id == world.a.account_id
    assert body[5 + size] == 0x80  # then the trailers frame
    assert b"grpc-status:0" in body[5 + size + 5 :]

    # Refused by jwt_authn: HTTP 401 (grpc-web clients map it to UNAUTHENTICATED
    # too) with the gRPC status and its details in the headers.
    status, headers, _ = await asyncio.to_thread(_grpc_web, world, None)
    assert (status, headers["grpc-status"]) == (401, "16")
    details = ErrorDetails.from_status(
        status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    )
    assert (details.code, details.reason) == (UNAUTH, "EDGE_UNAUTHENTICATED")


@pytest.mark.parametrize("where", WHERE)
async def test_a_service_acts_for_a_user_with_their_token(
    world: World, where: str, service_token: str
) -> None:
    async with grpc.aio.insecure_channel(world.target(where)) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        on_behalf = (*_md(service_token), ("x-cex-on-behalf-of", f"Bearer {world.a.token}"))
        reply = await stub.GetAccount(auth_pb2.GetAccountRequest(), metadata=on_behalf)
        assert reply.account.account_id == world.a.account_id
        # For itself, a service must say which account it means.
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetAccount(auth_pb2.GetAccountRequest(), metadata=_md(service_token))
    _refused(
        ErrorDetails.from_rpc_error(failure.value),
        grpc.StatusCode.INVALID_ARGUMENT,
        "AUTH_ACCOUNT_REQUIRED",
    )


async def test_order_checks_tokens_itself_when_called_directly(stack: Stack) -> None:
    # Defence in depth: bypassing Envoy does not bypass order's own policy.
    order = next(s for s in SERVICES if s.name == "order")
    async with grpc.aio.insecure_channel(f"{stack.ports.host}:{stack.ports.grpc(order)}") as ch:
        call = ch.unary_unary(
            "/cex.order.v1.OrderService/GetOrder",
            request_serializer=lambda _: b"",
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(b"", timeout=5)
    assert ErrorDetails.from_rpc_error(failure.value).reason == "AUTH_TOKEN_MISSING"


async def _as(target: str, authority: str | None, token: str, call: str, request: object) -> object:
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stubs = {
            "ledger": ledger_pb2_grpc.LedgerServiceStub(channel),
            "match": match_pb2_grpc.MatchServiceStub(channel),
        }
        service, method = call.split(".")
        try:
            return await getattr(stubs[service], method)(request, metadata=_md(token), timeout=10)
        except grpc.aio.AioRpcError as error:
            return ErrorDetails.from_rpc_error(error)


@pytest.mark.parametrize("where", WHERE)
async def test_a_user_cannot_move_money_or_read_another_account(
    world: World, where: str, service_credentials: ServiceCredentials
) -> None:
    """Ledger and match are the services' own: a user's valid token (read + trade)
    cannot create transfers or submit match commands, through Envoy or directly; it
    reads its own balances and nobody else's."""
    ports = world.stack.ports
    spec = {s.name: s for s in SERVICES}

    def target(service: str) -> tuple[str, str | None]:
        if where == "edge":
            return world.stack.edge, service
        return f"{ports.host}:{ports.grpc(spec[service])}", None

    mint = ledger_pb2.CreateTransfersRequest(
        transfers=[
            ledger_pb2.Transfer(
                id=f"mint-{uuid.uuid4().hex}",
                debit_account_id="sys:custody",
                credit_account_id=world.a.account_id,
                asset="USDT",
                amount="1000000",
                kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
            )
        ]
    )
    _refused(
        await _as(*target("ledger"), world.a.token, "ledger.CreateTransfers", mint),
        grpc.StatusCode.PERMISSION_DENIED,
        "AUTH_INTERNAL_ONLY",
    )
    command = match_pb2.SubmitCommandsRequest(
        commands=[match_pb2.Command(command_id="c", market="BTC-USDT")]
    )
    channel_target, authority = target("match")
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(channel_target, options=options) as channel:
        call = match_pb2_grpc.MatchServiceStub(channel).SubmitCommands(
            metadata=_md(world.a.token), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            # the refusal may end the call before the write, or after it
            await call.write(command)
            await call.done_writing()
            await call.read()
    _refused(
        ErrorDetails.from_rpc_error(failure.value),
        grpc.StatusCode.PERMISSION_DENIED,
        "AUTH_INTERNAL_ONLY",
    )
    # Reads: B's balances are not found for A; A's own are readable once funded.
    deposit = ledger_pb2.CreateTransfersRequest(
        transfers=[
            ledger_pb2.Transfer(
                id=f"fund-{where}-{world.a.account_id}",
                debit_account_id="sys:custody",
                credit_account_id=world.a.account_id,
                asset="USDT",
                amount="5",
                kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
            )
        ]
    )
    funded = await _as(
        *target("ledger"), await service_credentials.token(), "ledger.CreateTransfers", deposit
    )
    assert isinstance(funded, ledger_pb2.CreateTransfersResponse)
    assert funded.results[0].status.code == 0, funded
    _refused(
        await _as(
            *target("ledger"),
            world.a.token,
            "ledger.GetBalances",
            ledger_pb2.GetBalancesRequest(account_id=world.b.account_id),
        ),
        grpc.StatusCode.NOT_FOUND,
        "LEDGER_ACCOUNT_NOT_FOUND",
    )
    own = await _as(
        *target("ledger"), world.a.token, "ledger.GetBalances", ledger_pb2.GetBalancesRequest()
    )
    assert isinstance(own, ledger_pb2.GetBalancesResponse), own
    assert [(b.account_id, b.asset) for b in own.balances] == [(world.a.account_id, "USDT")]
