"""The chassis authentication policy: rules, default deny, service calls, and the wiring."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.chassis import (
    INTERNAL,
    PUBLIC,
    AuthContext,
    ChassisSettings,
    ErrorDetails,
    ExchangeError,
    Policy,
    Server,
    ServiceCredentials,
    current_auth,
    mesh_channel,
    user,
)
from services.chassis.authn import ON_BEHALF_HEADER, Authenticator, auth_context_var
from services.chassis.tokens import StaticKeys, sign

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000
RULES = {
    "IssueToken": PUBLIC,
    "GetAccount": user("read"),
    "CreateAccount": INTERNAL,
    "ListApiKeys": user("read", services=True),
    # CreateApiKey and the others: not named, so denied.
}


def _token(subject: str = "acc_1", scopes: tuple[str, ...] = ("read",), kid: str = "k1") -> str:
    return sign(KEY, kid, subject=subject, key_id="ak_1", scopes=scopes, issued_at=NOW,
                ttl_s=300, token_id="t")  # fmt: skip


def _md(token: str, on_behalf: str | None = None) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {token}")]
    if on_behalf:
        md.append((ON_BEHALF_HEADER, f"Bearer {on_behalf}"))
    return md


class CountingKeys:
    def __init__(self) -> None:
        self.refreshes = 0

    async def keys(self, *, refresh: bool = False) -> dict[str, object]:
        self.refreshes += refresh
        return {"k1": KEY.public_key()}


def _authenticator(keys: object | None = None) -> Authenticator:
    return Authenticator(
        [Policy.of(AUTH, RULES)],
        keys or StaticKeys(lambda: {"k1": KEY.public_key()}),  # type: ignore[arg-type]
        clock=lambda: NOW + 1,
    )


async def _reason(method: str, metadata: list[tuple[str, str]] | None) -> tuple[str, str]:
    with pytest.raises(ExchangeError) as refused:
        await _authenticator().check(f"/cex.auth.v1.AuthService/{method}", metadata)
    return refused.value.code.name, refused.value.reason


async def test_public_methods_need_nothing_and_unlisted_services_are_not_guarded() -> None:
    auth = _authenticator()
    assert await auth.check("/cex.auth.v1.AuthService/IssueToken", None) is None
    assert not auth.guards("/grpc.health.v1.Health/Check")
    assert not auth.guards("/cex.order.v1.OrderService/PlaceOrder")
    assert auth.guards("/cex.auth.v1.AuthService/GetAccount")


async def test_a_user_with_the_scope_gets_an_auth_context() -> None:
    ctx = await _authenticator().check("/cex.auth.v1.AuthService/GetAccount", _md(_token()))
    assert ctx is not None
    assert (ctx.account_id, ctx.key_id, ctx.scopes, ctx.service) == ("acc_1", "ak_1", {"read"}, "")


@pytest.mark.parametrize(
    ("method", "metadata", "expected"),
    [
        ("CreateApiKey", _md(_token()), ("PERMISSION_DENIED", "AUTH_METHOD_NOT_ALLOWED")),
        ("GetAccount", None, ("UNAUTHENTICATED", "AUTH_TOKEN_MISSING")),
        ("GetAccount", [("authorization", "Basic abc")], ("UNAUTHENTICATED", "AUTH_TOKEN_MISSING")),
        ("GetAccount", _md(_token(scopes=("trade",))), ("PERMISSION_DENIED", "AUTH_SCOPE_MISSING")),
        ("CreateAccount", _md(_token(scopes=("admin",))),
         ("PERMISSION_DENIED", "AUTH_INTERNAL_ONLY")),
        ("GetAccount", _md(_token("svc:order", ("internal",))),
         ("PERMISSION_DENIED", "AUTH_USER_REQUIRED")),
        ("GetAccount", _md(_token("svc:order", ("read",))),
         ("UNAUTHENTICATED", "AUTH_TOKEN_MALFORMED")),
        ("GetAccount", _md(_token(kid="k2")), ("UNAUTHENTICATED", "AUTH_UNKNOWN_KEY")),
        ("GetAccount", _md(_token("svc:order", ("internal",)), _token("svc:risk", ("internal",))),
         ("UNAUTHENTICATED", "AUTH_TOKEN_MALFORMED")),
    ],
    ids=["default-deny", "missing", "not-bearer", "scope", "internal-only", "service-for-user",
         "svc-without-internal", "unknown-kid", "on-behalf-of-a-service"],
)  # fmt: skip
async def test_refusals(method: str, metadata: object, expected: tuple[str, str]) -> None:
    assert await _reason(method, metadata) == expected  # type: ignore[arg-type]


async def test_services_call_internal_methods_and_act_for_users() -> None:
    auth = _authenticator()
    svc = _token("svc:order", ("internal",))
    alone = await auth.check("/cex.auth.v1.AuthService/CreateAccount", _md(svc))
    assert alone is not None and alone.is_service and alone.service == "order"
    user_token = _token("acc_7", ("read",))
    for_user = await auth.check("/cex.auth.v1.AuthService/GetAccount", _md(svc, user_token))
    assert for_user is not None
    assert (for_user.account_id, for_user.service, for_user.token) == ("acc_7", "order", user_token)
    # On a user method, the forwarded user's scopes are what count.
    weak = _token("acc_7", ("trade",))
    with pytest.raises(ExchangeError) as refused:
        await auth.check("/cex.auth.v1.AuthService/GetAccount", _md(svc, weak))
    assert refused.value.reason == "AUTH_SCOPE_MISSING"
    # A user cannot borrow another user's identity with the on-behalf header.
    mine = await auth.check("/cex.auth.v1.AuthService/GetAccount", _md(_token(), user_token))
    assert mine is not None and mine.account_id == "acc_1"


async def test_an_unknown_kid_refreshes_the_keys_once() -> None:
    keys = CountingKeys()
    with pytest.raises(ExchangeError):
        await _authenticator(keys).check(
            "/cex.auth.v1.AuthService/GetAccount", _md(_token(kid="k9"))
        )
    assert keys.refreshes == 1


class SwappableKeys:
    """A key set whose key under k1 can be replaced (a JWKS refresh after a rotation)."""

    def __init__(self) -> None:
        self.key = KEY.public_key()

    async def keys(self, *, refresh: bool = False) -> dict[str, object]:
        return {"k1": self.key}


async def test_verified_tokens_are_remembered_until_they_expire() -> None:
    now = [NOW + 1.0]
    keys = SwappableKeys()
    auth = Authenticator(
        [Policy.of(AUTH, RULES)],
        keys,  # type: ignore[arg-type]
        clock=lambda: now[0],
        cache_size=2,
    )
    method = "/cex.auth.v1.AuthService/GetAccount"
    token = _token()
    first = await auth.check(method, _md(token))
    # A hit returns the same claims, and the rule's scopes are still checked per call.
    assert await auth.check(method, _md(token)) == first
    with pytest.raises(ExchangeError) as refused:
        await auth.check("/cex.auth.v1.AuthService/CreateAccount", _md(token))
    assert refused.value.reason == "AUTH_INTERNAL_ONLY"
    # The key under the token's kid changes: the remembered verdict no longer counts.
    keys.key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ExchangeError) as refused:
        await auth.check(method, _md(token))
    assert refused.value.reason == "AUTH_INVALID_SIGNATURE"
    keys.key = KEY.public_key()
    assert await auth.check(method, _md(token)) == first
    # Past exp (+ the skew) a remembered token dies like any other (ADR 0004).
    now[0] = NOW + 300 + 30
    with pytest.raises(ExchangeError) as refused:
        await auth.check(method, _md(token))
    assert refused.value.reason == "AUTH_TOKEN_EXPIRED"


async def test_the_token_cache_is_bounded() -> None:
    auth = Authenticator(
        [Policy.of(AUTH, RULES)],
        StaticKeys(lambda: {"k1": KEY.public_key()}),
        clock=lambda: NOW + 1,
        cache_size=3,
    )
    for i in range(10):
        await auth.check("/cex.auth.v1.AuthService/GetAccount", _md(_token(f"acc_{i}")))
    assert len(auth._verified) == 3


def test_a_policy_naming_a_method_the_service_lacks_is_a_bug() -> None:
    with pytest.raises(ValueError, match="PlaceOrder"):
        Policy.of(AUTH, {"PlaceOrder": PUBLIC})


async def test_service_credentials_are_cached_until_near_expiry() -> None:
    issued: list[str] = []
    now = [1000.0]

    async def issue(key_id: str, secret: str) -> tuple[str, float]:
        issued.append(key_id)
        return f"tok{len(issued)}", now[0] + 300

    creds = ServiceCredentials("order", issue, "shared", clock=lambda: now[0])
    assert await creds.token() == "tok1"
    now[0] += 200
    assert await creds.token() == "tok1"
    now[0] += 50  # within a minute of expiry
    assert await creds.token() == "tok2"
    assert issued == ["svc:order", "svc:order"]


# ---- the wiring, in-process: a chassis Server with a policy ---------------------


class Echo(auth_pb2_grpc.AuthServiceServicer):
    async def GetAccount(
        self, request: auth_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetAccountResponse:
        ctx = current_auth()
        return auth_pb2.GetAccountResponse(
            account=auth_pb2.Account(account_id=ctx.account_id, display_name=ctx.service)
        )


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    server = Server(
        ChassisSettings(service="auth"), keys=StaticKeys(lambda: {"k1": KEY.public_key()})
    )
    server.add(AUTH, auth_pb2_grpc.add_AuthServiceServicer_to_server, Echo(), policy=RULES)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_the_server_authenticates_before_the_handler(guarded: str) -> None:
    # The real clock is far from NOW, so mint fresh tokens here.
    import time

    def fresh(subject: str, scopes: tuple[str, ...]) -> str:
        return sign(KEY, "k1", subject=subject, key_id="ak_1", scopes=scopes,
                    issued_at=int(time.time()), ttl_s=300, token_id="t")  # fmt: skip

    async with grpc.aio.insecure_channel(guarded) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        reply = await stub.GetAccount(
            auth_pb2.GetAccountRequest(), metadata=_md(fresh("acc_3", ("read",)))
        )
        assert reply.account.account_id == "acc_3"
        for request, metadata, reason in (
            ("GetAccount", None, "AUTH_TOKEN_MISSING"),
            ("ListApiKeys", _md(fresh("acc_3", ("read",))), "AUTH_UNIMPLEMENTED"),
            ("RevokeApiKey", _md(fresh("acc_3", ("read",))), "AUTH_METHOD_NOT_ALLOWED"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                message = getattr(auth_pb2, f"{request}Request")()
                await getattr(stub, request)(message, metadata=metadata)
            details = ErrorDetails.from_rpc_error(failure.value)
            assert (details.reason, details.domain) == (reason, "auth")

    # A service token through mesh_channel with credentials, acting for a user.
    async def issue(key_id: str, secret: str) -> tuple[str, float]:
        return fresh(key_id, ("internal",)), time.time() + 300

    # As inside a handler serving acc_9: the interceptor had set this.
    user_token = fresh("acc_9", ("read",))
    token = auth_context_var.set(
        AuthContext("acc_9", "ak_1", frozenset({"read"}), token=user_token)
    )
    try:
        creds = ServiceCredentials("order", issue, "shared")
        async with mesh_channel(guarded, credentials=creds) as channel:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).GetAccount(
                auth_pb2.GetAccountRequest()
            )
    finally:
        auth_context_var.reset(token)
    assert (reply.account.account_id, reply.account.display_name) == ("acc_9", "order")
