"""Authentication and authorization in every service (defence in depth behind Envoy).

A service opts in by declaring a `Policy` per gRPC service it serves: method
name -> `Rule`. With a policy, every call of that service is checked before its
handler runs, and a method the policy does not name is refused (default deny).
Services that declare no policy are not touched, nor are health and reflection.

Rules:
- `PUBLIC`: no token needed (IssueToken, public market data).
- `user(*scopes)`: an end user's token carrying every scope named (none: any
  valid user token). A service may call such a method on behalf of a user by
  forwarding that user's token (`x-cex-on-behalf-of`): the user's scopes count.
- `INTERNAL`: only a service token (`sub` "svc:<name>", scope `internal`).
- `user(..., services=True)`: either. A service calling it with a user's token
  forwarded is admitted on its own authority (the user's scopes were checked by
  the method the user called); the handler sees the user's account, so
  `owned_account` still confines the call to it.

Handlers read the caller from `current_auth()` (an `AuthContext`).

Verified tokens are remembered (a bounded LRU by token string, `cache_size`):
a token seen again skips the Ed25519 check and the JSON parsing, but is still
refused once expired (same clock and skew as a full check), and a hit counts
only while the key that verified it is still the one the key set has under
that kid (a key dropped from the JWKS stops its tokens at the next key
refresh). The rule and scopes are checked on every call. Revocation keeps its
ADR 0004 meaning: tokens die at `exp`; there is no deny-list for a cache to
miss.

Frozen accounts: given `account_states` (account_states.py, the copy of auth's
SUSPENDED and CLOSED accounts), a user whose rule needs more than `read` is
refused when their account is frozen, whatever their token says:
PERMISSION_DENIED `AUTH_ACCOUNT_SUSPENDED` / `AUTH_ACCOUNT_CLOSED`, checked on
every call and, for client streams, on every message (`still_allowed`). Reads,
and rules without scopes (GetFees, RevokeApiKey), stay open. A service acting on
its own authority (`services=True`, a user's token forwarded) is not refused:
the user's call was checked where it entered, and a service's follow-up for a
frozen account (cancel-on-disconnect, a saga's compensation) must go through.

Service tokens: each service holds a shared secret (CEX_SERVICE_SECRET) and
exchanges `svc:<name>` + HMAC(secret, "svc:<name>") for a short-lived token at
auth's IssueToken. `ServiceCredentials` caches it; `service_auth_interceptors`
attaches it to every call on a mesh channel, with the inbound user's token when
the call is made on their behalf.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc.aio import ClientCallDetails

from .account_states import AccountStates
from .errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from .tokens import CLOCK_SKEW_S, Claims, KeySource, UnknownKey, kid_of, verify


class _HasAccount(Protocol):
    @property
    def account_id(self) -> str: ...


_Owned = TypeVar("_Owned", bound=_HasAccount)

__all__ = [
    "INTERNAL",
    "ON_BEHALF_HEADER",
    "PUBLIC",
    "AuthContext",
    "Authenticator",
    "Policy",
    "Rule",
    "ServiceCredentials",
    "auth_context_var",
    "current_auth",
    "owned_account",
    "owned_resource",
    "sees_every_account",
    "service_auth_interceptors",
    "service_secret",
    "user",
]

ON_BEHALF_HEADER = "x-cex-on-behalf-of"
SERVICE_SCOPE = "internal"
# What a frozen (SUSPENDED or CLOSED) account may still do.
READ_ONLY = frozenset({"read"})


@dataclass(frozen=True, slots=True)
class Rule:
    public: bool = False
    users: bool = False
    scopes: frozenset[str] = frozenset()
    services: bool = False


PUBLIC = Rule(public=True)
INTERNAL = Rule(services=True)


def user(*scopes: str, services: bool = False) -> Rule:
    return Rule(users=True, scopes=frozenset(scopes), services=services)


@dataclass(frozen=True, slots=True)
class AuthContext:
    """Who is calling. For a service acting on a user's behalf: the user, and `service`."""

    account_id: str  # empty for a service acting for itself
    key_id: str
    scopes: frozenset[str]
    service: str = ""  # the calling service's name, when a service token was presented
    token: str = field(default="", repr=False)  # the user's token, to forward downstream
    # The rule checked this user's scopes and needs more than `read`: a frozen
    # account is refused, at the call and at each message of its stream.
    writes: bool = False
    # The caller's sub-accounts (a master's token, ADR 0017): readable by the
    # master as its own, by rules that need no more than `read`.
    subs: frozenset[str] = frozenset()

    @property
    def is_service(self) -> bool:
        return bool(self.service) and not self.account_id

    def can(self, scope: str) -> bool:
        return scope in self.scopes

    def reads_sub(self, account_id: str) -> bool:
        """A master reading (or managing keys of) one of its sub-accounts: allowed for
        rules that need no more than `read`; anything that trades or withdraws for
        a sub needs the sub's own key (ADR 0017)."""
        return not self.writes and account_id in self.subs


auth_context_var: contextvars.ContextVar[AuthContext | None] = contextvars.ContextVar(
    "auth_context", default=None
)


def current_auth() -> AuthContext:
    """The caller of the current RPC (set by the chassis before the handler runs)."""
    ctx = auth_context_var.get()
    if ctx is None:
        raise Unauthenticated("AUTH_TOKEN_MISSING", "this call needs an access token")
    return ctx


def owned_account(
    ctx: AuthContext, requested: str, *, component: str, resource: str = "account"
) -> str:
    """The account a call acts on: the caller's own unless they are admin or a service
    (who must name one). Another account's data is `<COMPONENT>_<RESOURCE>_NOT_FOUND`,
    never PERMISSION_DENIED, so ids cannot be probed."""
    if sees_every_account(ctx):
        if not requested and not ctx.account_id:
            raise InvalidArgument(
                f"{component}_ACCOUNT_REQUIRED",
                "account_id is required",
                violations=[FieldViolation("account_id", "required for this caller")],
            )
        return requested or ctx.account_id
    if requested and requested != ctx.account_id:
        if ctx.reads_sub(requested):
            return requested
        raise NotFound(f"{component}_{resource.upper()}_NOT_FOUND", f"no such {resource}")
    return ctx.account_id


def sees_every_account(ctx: AuthContext) -> bool:
    """A service or an admin may read any account's resources; a user only their own."""
    return ctx.is_service or ctx.can("admin")


def owned_resource(
    ctx: AuthContext,
    found: _Owned | None,
    *,
    component: str,
    resource: str,
) -> _Owned:
    """A resource looked up by id, if the caller may see it. Another account's
    resource is `<COMPONENT>_<RESOURCE>_NOT_FOUND`, the very answer a made-up id
    gets (same code, reason and message), so ids cannot be probed."""
    if found is None or not (
        sees_every_account(ctx)
        or found.account_id == ctx.account_id
        or ctx.reads_sub(found.account_id)
    ):
        name = resource.replace(" ", "_").upper()
        raise NotFound(f"{component}_{name}_NOT_FOUND", f"no such {resource}")
    return found


@dataclass(frozen=True, slots=True)
class Policy:
    """Rules for the methods of one gRPC service; unnamed methods are denied."""

    service: str  # full name, e.g. "cex.auth.v1.AuthService"
    rules: Mapping[str, Rule]

    @classmethod
    def of(cls, descriptor: ServiceDescriptor, rules: Mapping[str, Rule]) -> Policy:
        unknown = set(rules) - set(descriptor.methods_by_name)
        if unknown:
            raise ValueError(f"{descriptor.full_name} has no methods {sorted(unknown)}")
        return cls(descriptor.full_name, dict(rules))


def _metadata(metadata: Iterable[Any] | None, key: str) -> str:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _bearer(value: str) -> str:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Authenticator:
    """Checks one inbound call against the policies; returns the caller or raises."""

    def __init__(
        self,
        policies: Iterable[Policy],
        keys: KeySource,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        account_states: AccountStates | None = None,
    ) -> None:
        self._policies = {p.service: p for p in policies}
        self.account_states = account_states
        self._keys = keys
        self._clock = clock
        self._cache_size = cache_size
        # token -> (its claims, the kid and the key object that verified it)
        self._verified: OrderedDict[str, tuple[Claims, str, object]] = OrderedDict()

    def guards(self, full_method: str) -> bool:
        service = full_method.lstrip("/").partition("/")[0]
        return service in self._policies

    async def verify(self, token: str) -> Claims:
        keys = await self._keys.keys()
        hit = self._verified.get(token)
        if hit is not None:
            claims, kid, key = hit
            if keys.get(kid) is key and self._clock() < claims.expires_at + CLOCK_SKEW_S:
                self._verified.move_to_end(token)
                return claims
            del self._verified[token]  # expired or its key changed: the full check says why
        try:
            claims = verify(token, keys, now=self._clock())
        except UnknownKey:
            keys = await self._keys.keys(refresh=True)  # a key published since the last fetch?
            try:
                claims = verify(token, keys, now=self._clock())
            except UnknownKey:
                raise Unauthenticated(
                    "AUTH_UNKNOWN_KEY", "the token is signed by a key this exchange does not know"
                ) from None
        if self._cache_size > 0:
            kid = _kid(token)
            self._verified[token] = (claims, kid, keys.get(kid))
            if len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return claims

    async def check(self, full_method: str, metadata: Iterable[Any] | None) -> AuthContext | None:
        service, _, method = full_method.lstrip("/").partition("/")
        policy = self._policies.get(service)
        if policy is None:
            return None
        rule = policy.rules.get(method)
        if rule is None:
            raise PermissionDenied(
                "AUTH_METHOD_NOT_ALLOWED", f"{full_method} is not open to any caller"
            )
        if rule.public:
            return None
        token = _bearer(_metadata(metadata, "authorization"))
        if not token:
            raise Unauthenticated("AUTH_TOKEN_MISSING", "this call needs an access token")
        claims = await self.verify(token)
        if claims.is_service:
            return await self._as_service(full_method, rule, claims, metadata)
        if claims.subject.startswith("svc:"):
            raise Unauthenticated("AUTH_TOKEN_MALFORMED", "a service subject without its scope")
        return self._as_user(full_method, rule, claims, token, service="")

    async def _as_service(
        self, full_method: str, rule: Rule, claims: Claims, metadata: Iterable[Any] | None
    ) -> AuthContext:
        name = claims.subject.removeprefix("svc:")
        forwarded = _bearer(_metadata(metadata, ON_BEHALF_HEADER))
        if forwarded:
            on_behalf = await self.verify(forwarded)
            if on_behalf.is_service or on_behalf.subject.startswith("svc:"):
                raise Unauthenticated("AUTH_TOKEN_MALFORMED", "on-behalf token is not a user's")
            if rule.services:
                return _user_context(on_behalf, forwarded, service=name)
            return self._as_user(full_method, rule, on_behalf, forwarded, service=name)
        if not rule.services:
            raise PermissionDenied(
                "AUTH_USER_REQUIRED", f"{full_method} acts for a user: forward their token"
            )
        return AuthContext(account_id="", key_id=claims.key_id, scopes=claims.scopes, service=name)

    def _as_user(
        self, full_method: str, rule: Rule, claims: Claims, token: str, *, service: str
    ) -> AuthContext:
        if not rule.users:
            raise PermissionDenied(
                "AUTH_INTERNAL_ONLY", f"{full_method} is for services of the exchange only"
            )
        missing = rule.scopes - claims.scopes
        if missing:
            raise PermissionDenied(
                "AUTH_SCOPE_MISSING",
                f"{full_method} needs scope {', '.join(sorted(missing))}",
                metadata={"missing_scopes": " ".join(sorted(missing))},
            )
        writes = bool(rule.scopes - READ_ONLY)
        if writes and self.account_states is not None:
            self.account_states.refuse_frozen(claims.subject)
        return _user_context(claims, token, service=service, writes=writes)

    def still_allowed(self, ctx: AuthContext | None) -> None:
        """Again, for each message a stream receives: a freeze since the call began
        refuses it (the stream ends with the refusal)."""
        if ctx is not None and ctx.writes and self.account_states is not None:
            self.account_states.refuse_frozen(ctx.account_id)


def _kid(token: str) -> str:
    """The kid of a token that has just verified (so its header is well formed)."""
    return kid_of(token)


def _user_context(claims: Claims, token: str, *, service: str, writes: bool = False) -> AuthContext:
    return AuthContext(
        account_id=claims.subject,
        key_id=claims.key_id,
        scopes=claims.scopes,
        service=service,
        token=token,
        writes=writes,
        subs=claims.subs,
    )


# ---- the client side: service credentials on mesh channels ------------------


def service_secret(shared_secret: str, service: str) -> str:
    """The API-key secret of `svc:<service>`, derived from the shared secret."""
    digest = hmac.new(shared_secret.encode(), f"svc:{service}".encode(), hashlib.sha256)
    return digest.hexdigest()


class ServiceCredentials:
    """A short-lived service token from auth's IssueToken, renewed before it expires."""

    def __init__(
        self,
        service: str,
        issue: Callable[[str, str], Awaitable[tuple[str, float]]],
        shared_secret: str,
        *,
        renew_before_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self._issue = issue  # (key id, secret) -> (token, expires at, unix seconds)
        self._secret = service_secret(shared_secret, service)
        self._renew_before_s = renew_before_s
        self._clock = clock
        self._token = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._clock() < self._expires_at - self._renew_before_s:
            return self._token
        async with self._lock:
            if self._clock() >= self._expires_at - self._renew_before_s:
                self._token, self._expires_at = await self._issue(
                    f"svc:{self.service}", self._secret
                )
        return self._token


class _ServiceAuth:
    """Attaches the service token, and the current user's token when acting for one."""

    def __init__(self, credentials: ServiceCredentials) -> None:
        self._credentials = credentials

    async def _details(self, details: ClientCallDetails) -> ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if not metadata.get_all("authorization"):
            metadata.add("authorization", f"Bearer {await self._credentials.token()}")
        ctx = auth_context_var.get()
        if ctx is not None and ctx.token and not metadata.get_all(ON_BEHALF_HEADER):
            metadata.add(ON_BEHALF_HEADER, f"Bearer {ctx.token}")
        return ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryAuth(_ServiceAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _UnaryStreamAuth(_ServiceAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _StreamUnaryAuth(_ServiceAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


class _StreamStreamAuth(_ServiceAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


def service_auth_interceptors(credentials: ServiceCredentials) -> list[grpc.aio.ClientInterceptor]:
    """The service's token on every kind of call. One interceptor per kind: grpc.aio
    files an interceptor under the first kind it implements and no other, so a single
    object implementing all four would leave streams without a token."""
    kinds = (_UnaryUnaryAuth, _UnaryStreamAuth, _StreamUnaryAuth, _StreamStreamAuth)
    return [kind(credentials) for kind in kinds]
