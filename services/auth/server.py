"""auth service: proto <-> domain and errors.

Accounts and API keys, IssueToken (an API key, or a service credential, for a
short-lived EdDSA JWT), and auth's JWKS over HTTP. auth authenticates its own
callers with the same chassis policy as every service (see POLICY).

auth also owns the fee schedule and each account's fee tier (ADR 0016): the
operator's calls set them, `fees.Volumes` moves tiers by measured volume, and
every change is published (the outbox) for the order gateways' copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.order.v1 import order_pb2_grpc
from services.chassis import (
    INTERNAL,
    PUBLIC,
    AccountStates,
    AuthContext,
    Catalog,
    ChassisSettings,
    Outbox,
    PermissionDenied,
    Rule,
    Server,
    Unauthenticated,
    Unavailable,
    background,
    connect,
    current_auth,
    invalid_field,
    load_catalog,
    mesh_channel,
    optional_time,
    owned_resource,
    page_size,
    require_request_id,
    sees_every_account,
    service_credentials,
    time_key_after,
    time_keyed_page,
    timestamp_or_none,
    user,
)
from services.chassis.account_states import STREAM as STATE_STREAM
from services.chassis.account_states import SUBJECT as STATE_SUBJECT
from services.chassis.authn import service_secret
from services.chassis.fee_tiers import BASE_TIER, bps_rate
from services.chassis.fee_tiers import SUBJECT as FEE_SUBJECT
from services.chassis.markets import DEFAULT_CATALOG
from services.chassis.money import decimal_text
from services.chassis.tokens import sign

from . import domain
from .config import AuthConfig
from .fees import Volumes, VolumeSource, order_volumes
from .keys import Keyring, serve_jwks
from .store import FeeChange, FeeTiers, StateChange, Store

__all__ = ["POLICY", "AuthService", "build_server"]

MIGRATIONS = Path(__file__).with_name("migrations")
_log = logging.getLogger("cex.auth")

# Who may call what. Accounts are created by operators (admin) or by services
# (onboarding, the `cex` CLI with the stack's service credential): no open signup.
POLICY: dict[str, Rule] = {
    "IssueToken": PUBLIC,
    "CreateAccount": user("admin", services=True),
    "GetAccount": user("read", services=True),
    "SetAccountState": user("admin", services=True),
    # Sub-accounts (ADR 0017): a master creates its own (trade scope; an admin
    # or a service names the master), and lists them.
    "CreateSubAccount": user("trade", services=True),
    "ListSubAccounts": user("read", services=True),
    "CreateApiKey": user(services=True),  # grants at most the caller's own scopes
    "ListApiKeys": user("read", services=True),
    "RevokeApiKey": user(services=True),  # any scope may kill its own account's keys
    "GetFees": user(services=True),  # what a caller pays: any valid token may ask
    "GetFrozenAccounts": INTERNAL,  # every service's authenticator (account_states.py)
    # Fee schedules (ADR 0016): the operator's, and the order gateways' copy.
    "GetFeeSchedule": user("admin", services=True),
    "SetFeeSchedule": user("admin", services=True),
    "SetAccountFeeTier": user("admin", services=True),
    "EvaluateFeeTiers": user("admin", services=True),
    "GetFeeTiers": INTERNAL,  # order's fee-tier copy (fee_tiers.py)
}

_SCOPE_NAMES: dict[int, str] = {
    auth_pb2.API_KEY_SCOPE_READ: "read",
    auth_pb2.API_KEY_SCOPE_TRADE: "trade",
    auth_pb2.API_KEY_SCOPE_WITHDRAW: "withdraw",
    auth_pb2.API_KEY_SCOPE_ADMIN: "admin",
}
_SCOPE_VALUES: dict[str, auth_pb2.ApiKeyScope.ValueType] = {
    name: auth_pb2.ApiKeyScope.Value(f"API_KEY_SCOPE_{name.upper()}")
    for name in _SCOPE_NAMES.values()
}
_SERVICE_NAME = re.compile(r"^svc:[a-z][a-z0-9-]{0,30}$")
_ADMIN_ONLY = PermissionDenied("AUTH_SCOPE_MISSING", "needs scope admin")


def _scopes_in(values: Iterable[int], field: str) -> tuple[str, ...]:
    names = []
    for i, v in enumerate(values):
        if v not in _SCOPE_NAMES:
            raise invalid_field(
                "AUTH_INVALID_SCOPE",
                f"{field}[{i}]",
                "read, trade, withdraw or admin",
                message="unknown scope",
            )
        names.append(_SCOPE_NAMES[v])
    return tuple(sorted(set(names)))


def _account_pb(a: domain.Account) -> auth_pb2.Account:
    return auth_pb2.Account(
        account_id=a.account_id,
        display_name=a.display_name,
        email=a.email,
        type=a.type,  # type: ignore[arg-type]
        state=a.state,  # type: ignore[arg-type]
        fee_tier=a.fee_tier,
        create_time=timestamp_or_none(a.create_time),
        update_time=timestamp_or_none(a.update_time),
        fee_tier_assigned=a.fee_tier_assigned,
        traded_volume_30d=decimal_text(a.traded_volume),
        master_account_id=a.master_account_id,
    )


def _change_pb(c: StateChange) -> auth_pb2.AccountStateChange:
    return auth_pb2.AccountStateChange(
        change_seq=c.change_seq,
        account_id=c.account_id,
        state=c.state,  # type: ignore[arg-type]
        reason=c.reason,
        change_time=timestamp_or_none(c.change_time),
    )


async def frozen_accounts(store: Store) -> auth_pb2.GetFrozenAccountsResponse:
    seq, changes = await store.frozen_accounts()
    return auth_pb2.GetFrozenAccountsResponse(
        change_seq=seq, accounts=[_change_pb(c) for c in changes]
    )


def _key_pb(k: domain.ApiKey, now: datetime) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        api_key_id=k.api_key_id,
        account_id=k.account_id,
        label=k.label,
        scopes=[_SCOPE_VALUES[s] for s in k.scopes],
        allowed_cidrs=list(k.allowed_cidrs),
        state=k.state_at(now),  # type: ignore[arg-type]
        secret_prefix=k.secret_prefix,
        create_time=timestamp_or_none(k.create_time),
        expire_time=timestamp_or_none(k.expire_time),
        revoke_time=timestamp_or_none(k.revoke_time),
        last_used_time=timestamp_or_none(k.last_used_time),
    )


def _schedule_pb(
    schedule: Iterable[domain.FeeTier], asset: str, when: datetime | None = None
) -> auth_pb2.FeeSchedule:
    return auth_pb2.FeeSchedule(
        tiers=[
            auth_pb2.FeeTier(
                name=t.name,
                maker_fee_bps=decimal_text(t.maker_bps),
                taker_fee_bps=decimal_text(t.taker_bps),
                min_volume=decimal_text(t.min_volume),
            )
            for t in schedule
        ],
        volume_asset=asset,
        update_time=timestamp_or_none(when),
    )


def _fee_change_pb(c: FeeChange, asset: str) -> auth_pb2.FeeTierChange:
    change = auth_pb2.FeeTierChange(
        change_seq=c.change_seq, change_time=timestamp_or_none(c.change_time)
    )
    if c.schedule is not None:
        change.schedule.CopyFrom(_schedule_pb(c.schedule, asset))
    else:
        change.account.CopyFrom(
            auth_pb2.AccountFeeTier(
                account_id=c.account_id,
                fee_tier=c.fee_tier,
                assigned=c.assigned,
                change_seq=c.change_seq,
            )
        )
    return change


def _fee_tiers_pb(tiers: FeeTiers, asset: str) -> auth_pb2.GetFeeTiersResponse:
    return auth_pb2.GetFeeTiersResponse(
        change_seq=tiers.change_seq,
        schedule=_schedule_pb(tiers.schedule, asset, tiers.schedule_time),
        accounts=[
            auth_pb2.AccountFeeTier(account_id=a, fee_tier=t, assigned=assigned, change_seq=seq)
            for a, t, assigned, seq in tiers.accounts
        ],
    )


def _request_hash(
    request: auth_pb2.CreateAccountRequest
    | auth_pb2.CreateSubAccountRequest
    | auth_pb2.CreateApiKeyRequest
    | auth_pb2.SetAccountStateRequest
    | auth_pb2.SetFeeScheduleRequest
    | auth_pb2.SetAccountFeeTierRequest,
) -> str:
    body = type(request).FromString(request.SerializeToString())
    body.request_id = ""
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def _require_request_id(request_id: str) -> str:
    return require_request_id(request_id, "AUTH_REQUEST_ID_REQUIRED")


def _display_name(value: str) -> str:
    name = value.strip()
    if not name:
        raise invalid_field(
            "AUTH_DISPLAY_NAME_REQUIRED",
            "display_name",
            "must not be empty",
            message="display_name is required",
        )
    return name


def _require_account_id(account_id: str) -> None:
    if not account_id:
        raise invalid_field(
            "AUTH_ACCOUNT_REQUIRED", "account_id", "required", message="account_id is required"
        )


def _reason(text: str) -> str:
    """An operator's reason as the audit log keeps it."""
    return text.strip()[:500]


def _mutating_caller(request_id: str) -> AuthContext:
    """The caller of a call that changes state, once its idempotency key is valid."""
    ctx = current_auth()
    _require_request_id(request_id)
    return ctx


# The client's address as the edge determined it: Envoy locally, the Istio ingress
# gateway in Kubernetes (`use_remote_address`, with `xff_num_trusted_hops` /
# `numTrustedProxies` trusted proxies in front), which overwrites any value a client
# sent. X-Forwarded-For is not read: its entries left of the trusted hops are the
# client's own claim, and for a loopback client Envoy appends its own host address.
CLIENT_ADDRESS_HEADER = "x-envoy-external-address"


def _client_ip(context: grpc.aio.ServicerContext[object, object]) -> str:
    """The caller's address: the edge's `x-envoy-external-address`, else the transport peer
    (a call that did not come through the edge)."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ADDRESS_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            return text.strip()
    peer = context.peer() or ""
    address = peer.split(":", 1)[1] if ":" in peer else peer
    return urllib.parse.unquote(address.rsplit(":", 1)[0]).strip("[]")


_PAGE_TOKEN_INVALID = "AUTH_INVALID_PAGE_TOKEN"


def _decimal(value: Decimal) -> str:
    return format(value, "f")


def _fees(
    catalog: Catalog, tier: str | None = None, rates: tuple[str, str] | None = None
) -> auth_pb2.GetFeesResponse:
    """A tier's rates (default: the catalog's schedule, the base tier until an
    operator sets one) and the catalog's withdrawal terms, as GetFees answers them."""
    tier = catalog.fees.tier if tier is None else tier
    maker, taker = rates or (_decimal(catalog.fees.maker_rate), _decimal(catalog.fees.taker_rate))
    return auth_pb2.GetFeesResponse(
        fee_tier=tier,
        maker_fee_rate=maker,
        taker_fee_rate=taker,
        markets=[
            auth_pb2.MarketFees(
                market=m.symbol,
                maker_fee_rate=maker,
                taker_fee_rate=taker,
                buy_fee_asset=m.base.symbol,  # a party pays in what it receives
                sell_fee_asset=m.quote.symbol,
            )
            for m in sorted(catalog.markets.values(), key=lambda m: m.symbol)
        ],
        assets=[
            auth_pb2.AssetFees(
                asset=a.symbol,
                network=a.network,
                withdrawal_fee=_decimal(a.withdrawal_fee) if a.network else "",
                min_withdrawal=_decimal(a.min_withdrawal) if a.network else "",
            )
            for a in sorted(catalog.assets.values(), key=lambda a: a.symbol)
        ],
    )


def base_tier(catalog: Catalog) -> domain.FeeTier:
    """The catalog's one fee schedule as the tier "default" (the schedule until an
    operator sets one)."""
    return domain.FeeTier(
        BASE_TIER,
        (catalog.fees.maker_rate * 10_000).normalize(),
        (catalog.fees.taker_rate * 10_000).normalize(),
        Decimal(0),
    )


def _changed_by(ctx: AuthContext) -> str:
    return f"svc:{ctx.service}" if ctx.service else ctx.account_id


def _tier_rows(tiers: Iterable[auth_pb2.FeeTier]) -> list[tuple[str, str, str, str]]:
    return [(t.name, t.maker_fee_bps, t.taker_fee_bps, t.min_volume) for t in tiers]


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    """cex.auth.v1.AuthService."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        config: AuthConfig,
        clock: Callable[[], datetime],
        new_id: Callable[[str], str],
        catalog: Catalog = DEFAULT_CATALOG,
        on_state_change: Callable[[], Awaitable[None]] | None = None,
        volumes: Volumes | None = None,
        on_fee_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self._on_state_change = on_state_change  # publish it now (outbox, own copy)
        self._on_fee_change = on_fee_change  # publish it now (outbox)
        self._volumes = volumes
        self.keyring = keyring
        self.config = config
        self.clock = clock
        self.new_id = new_id
        self._catalog = catalog
        # Checked against when the key id is unknown, at the same cost as a real one,
        # so the time taken does not tell existing key ids apart.
        self._decoy = domain.hash_secret(
            secrets.token_hex(16), b"decoy-salt-16byt", n=config.scrypt_n
        )

    async def CreateAccount(
        self,
        request: auth_pb2.CreateAccountRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.CreateAccountResponse:
        ctx = current_auth()
        if not (ctx.is_service or ctx.can("admin")):
            raise _ADMIN_ONLY
        _require_request_id(request.request_id)
        display_name = _display_name(request.display_name)
        account = await self.store.create_account(
            account_id=self.new_id("acc"),
            request_id=request.request_id,
            request_hash=_request_hash(request),
            display_name=display_name,
            email=request.email.strip().lower(),
            type_=request.type or auth_pb2.ACCOUNT_TYPE_INDIVIDUAL,
            now=self.clock(),
        )
        return auth_pb2.CreateAccountResponse(account=_account_pb(account))

    async def CreateSubAccount(
        self,
        request: auth_pb2.CreateSubAccountRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.CreateSubAccountResponse:
        ctx = _mutating_caller(request.request_id)
        # A user's master is their own account (another id, a sub's included, is
        # NOT_FOUND: the rule needs trade); an admin or a service names it.
        master = domain.owned_account(ctx, request.master_account_id)
        display_name = _display_name(request.display_name)
        account = await self.store.create_sub_account(
            master_account_id=master,
            account_id=self.new_id("acc"),
            request_id=request.request_id,
            request_hash=_request_hash(request),
            display_name=display_name[:200],
            now=self.clock(),
        )
        return auth_pb2.CreateSubAccountResponse(account=_account_pb(account))

    async def ListSubAccounts(
        self,
        request: auth_pb2.ListSubAccountsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.ListSubAccountsResponse:
        ctx = current_auth()
        master = domain.owned_account(ctx, request.master_account_id)
        if master != ctx.account_id and not sees_every_account(ctx):
            raise domain.no_such_account()  # a sub's subs
        size = page_size(
            request.page_size, default=50, maximum=100, reason="AUTH_INVALID_PAGE_SIZE"
        )
        after = time_key_after(request.page_token, "sub_accounts", reason=_PAGE_TOKEN_INVALID)
        page, token = time_keyed_page(
            await self.store.sub_accounts(master, limit=size + 1, after=after),
            size,
            "sub_accounts",
            lambda a: (a.create_time, a.account_id),
        )
        return auth_pb2.ListSubAccountsResponse(
            accounts=[_account_pb(a) for a in page], next_page_token=token
        )

    async def GetFees(
        self,
        request: auth_pb2.GetFeesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetFeesResponse:
        # The caller's tier's rates (the ones order sends with its orders) and the
        # terms funding applies to withdrawals; a service is shown the base tier.
        account = await self.store.account(current_auth().account_id or "")
        tier = account.fee_tier if account is not None else BASE_TIER
        schedule, _ = await self.store.fee_schedule()
        found = next((t for t in schedule if t.name == tier), None)
        if found is None:
            found = next((t for t in schedule if t.name == BASE_TIER), base_tier(self._catalog))
        rates = (bps_rate(str(found.maker_bps)), bps_rate(str(found.taker_bps)))
        return _fees(self._catalog, found.name, rates)

    async def GetFeeSchedule(
        self,
        request: auth_pb2.GetFeeScheduleRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetFeeScheduleResponse:
        schedule, when = await self.store.fee_schedule()
        return auth_pb2.GetFeeScheduleResponse(
            schedule=_schedule_pb(schedule, self.config.fee_volume_asset, when)
        )

    async def SetFeeSchedule(
        self,
        request: auth_pb2.SetFeeScheduleRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.SetFeeScheduleResponse:
        ctx = _mutating_caller(request.request_id)
        schedule = domain.parse_schedule(_tier_rows(request.tiers))
        await self.store.set_fee_schedule(
            schedule,
            request_id=request.request_id,
            request_hash=_request_hash(request),
            reason=_reason(request.reason),
            changed_by=_changed_by(ctx),
            now=self.clock(),
        )
        await self._fee_changed()
        return auth_pb2.SetFeeScheduleResponse(
            schedule=(await self.GetFeeSchedule(auth_pb2.GetFeeScheduleRequest(), context)).schedule
        )

    async def SetAccountFeeTier(
        self,
        request: auth_pb2.SetAccountFeeTierRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.SetAccountFeeTierResponse:
        ctx = _mutating_caller(request.request_id)
        _require_account_id(request.account_id)
        account = domain.found_account(
            await self.store.set_account_fee_tier(
                request.account_id,
                request.fee_tier.strip(),
                request_id=request.request_id,
                request_hash=_request_hash(request),
                reason=_reason(request.reason),
                changed_by=_changed_by(ctx),
                now=self.clock(),
            )
        )
        await self._fee_changed()
        return auth_pb2.SetAccountFeeTierResponse(account=_account_pb(account))

    async def EvaluateFeeTiers(
        self,
        request: auth_pb2.EvaluateFeeTiersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.EvaluateFeeTiersResponse:
        if self._volumes is None:
            raise Unavailable("AUTH_VOLUMES_UNAVAILABLE", "this auth cannot reach order")
        measured, changes = await self._volumes.measure(_changed_by(current_auth()))
        return auth_pb2.EvaluateFeeTiersResponse(
            accounts_measured=measured,
            changed=[
                auth_pb2.AccountFeeTier(account_id=c.account_id, fee_tier=c.fee_tier)
                for c in changes
            ],
        )

    async def GetFeeTiers(
        self,
        request: auth_pb2.GetFeeTiersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetFeeTiersResponse:
        return _fee_tiers_pb(await self.store.fee_tiers(), self.config.fee_volume_asset)

    async def _fee_changed(self) -> None:
        if self._on_fee_change is not None:
            await self._on_fee_change()

    async def GetAccount(
        self,
        request: auth_pb2.GetAccountRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetAccountResponse:
        account_id = domain.owned_account(current_auth(), request.account_id)
        account = domain.found_account(await self.store.account(account_id))
        return auth_pb2.GetAccountResponse(account=_account_pb(account))

    async def SetAccountState(
        self,
        request: auth_pb2.SetAccountStateRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.SetAccountStateResponse:
        ctx = _mutating_caller(request.request_id)
        _require_account_id(request.account_id)
        if request.state not in _SETTABLE_STATES:
            raise invalid_field(
                "AUTH_INVALID_ACCOUNT_STATE",
                "state",
                "not a state an account can be put in",
                message="state must be ACTIVE, SUSPENDED or CLOSED",
            )
        account = domain.found_account(
            await self.store.set_account_state(
                account_id=request.account_id,
                state=request.state,
                reason=_reason(request.reason),
                request_id=request.request_id,
                request_hash=_request_hash(request),
                changed_by=_changed_by(ctx),
                now=self.clock(),
            )
        )
        if self._on_state_change is not None:
            await self._on_state_change()
        return auth_pb2.SetAccountStateResponse(account=_account_pb(account))

    async def GetFrozenAccounts(
        self,
        request: auth_pb2.GetFrozenAccountsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetFrozenAccountsResponse:
        return await frozen_accounts(self.store)

    async def CreateApiKey(
        self,
        request: auth_pb2.CreateApiKeyRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.CreateApiKeyResponse:
        ctx = _mutating_caller(request.request_id)
        account_id = domain.owned_account(ctx, request.account_id)
        now = self.clock()
        scopes = _scopes_in(request.scopes, "scopes")
        cidrs = domain.validate_cidrs(request.allowed_cidrs)
        expire = optional_time(request, "expire_time")
        domain.validate_new_key(ctx, scopes, cidrs, expire, now)
        domain.found_account(await self.store.account(account_id))
        secret = f"sk_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        secret_hash = await asyncio.to_thread(
            domain.hash_secret, secret, salt, n=self.config.scrypt_n
        )
        key, created = await self.store.create_key(
            domain.ApiKey(
                api_key_id=self.new_id("ak"),
                account_id=account_id,
                label=request.label,
                scopes=scopes,
                allowed_cidrs=cidrs,
                state=domain.KeyState.ACTIVE,
                secret_prefix=secret[:7],
                secret_hash=secret_hash,
                create_time=now,
                expire_time=expire,
            ),
            request_id=request.request_id,
            request_hash=_request_hash(request),
        )
        return auth_pb2.CreateApiKeyResponse(
            api_key=_key_pb(key, now), secret=secret if created else ""
        )

    async def ListApiKeys(
        self,
        request: auth_pb2.ListApiKeysRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.ListApiKeysResponse:
        account_id = domain.owned_account(current_auth(), request.account_id)
        size = page_size(
            request.page_size, default=50, maximum=500, reason="AUTH_INVALID_PAGE_SIZE"
        )
        after = time_key_after(request.page_token, "api_keys", reason=_PAGE_TOKEN_INVALID)
        page, token = time_keyed_page(
            await self.store.list_keys(
                account_id, state=request.state, limit=size + 1, after=after
            ),
            size,
            "api_keys",
            lambda k: (k.create_time, k.api_key_id),
        )
        now = self.clock()
        return auth_pb2.ListApiKeysResponse(
            api_keys=[_key_pb(k, now) for k in page], next_page_token=token
        )

    async def RevokeApiKey(
        self,
        request: auth_pb2.RevokeApiKeyRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.RevokeApiKeyResponse:
        ctx = _mutating_caller(request.request_id)
        key = owned_resource(
            ctx, await self.store.key(request.api_key_id), component="AUTH", resource="API key"
        )
        now = self.clock()
        revoked = await self.store.revoke_key(key.api_key_id, reason=request.reason, now=now)
        assert revoked is not None
        return auth_pb2.RevokeApiKeyResponse(api_key=_key_pb(revoked, now))

    async def IssueToken(
        self,
        request: auth_pb2.IssueTokenRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.IssueTokenResponse:
        now = self.clock()
        if request.api_key_id.startswith("svc:"):
            return self._service_token(request, now)
        requested = _scopes_in(request.scopes, "scopes")
        ttl = domain.token_ttl(
            request.ttl.seconds,
            default_s=self.config.token_ttl_s,
            max_s=self.config.token_ttl_max_s,
        )
        key = await self.store.key(request.api_key_id) if len(request.api_key_id) < 64 else None
        account = await self.store.account(key.account_id) if key else None
        stored = key.secret_hash if key else self._decoy
        secret_ok = await asyncio.to_thread(
            domain.secret_matches, request.api_key_secret[:256], stored
        )
        scopes = domain.check_issue(
            key,
            account,
            secret_ok=secret_ok and key is not None,
            client_ip=_client_ip(context),
            requested=requested,
            now=now,
        )
        assert key is not None
        await self.store.touch_key(key.api_key_id, now)
        # A master's token names its subs (ADR 0017): every service lets it read
        # them without asking auth. A sub created later is in the next token.
        subs = await self.store.sub_account_ids(key.account_id)
        return self._token(key.account_id, key.api_key_id, scopes, now, ttl, subs=subs)

    def _service_token(
        self, request: auth_pb2.IssueTokenRequest, now: datetime
    ) -> auth_pb2.IssueTokenResponse:
        name = request.api_key_id.removeprefix("svc:")
        expected = service_secret(self.config.service_secret or "", name)
        if (
            not self.config.service_secret
            or not _SERVICE_NAME.match(request.api_key_id)
            or not hmac.compare_digest(expected, request.api_key_secret)
        ):
            raise Unauthenticated("AUTH_INVALID_CREDENTIALS", "unknown API key or wrong secret")
        return self._token(
            request.api_key_id,
            request.api_key_id,
            ("internal",),
            now,
            self.config.service_token_ttl_s,
        )

    def _token(
        self,
        subject: str,
        key_id: str,
        scopes: tuple[str, ...],
        now: datetime,
        ttl: int,
        *,
        subs: Iterable[str] = (),
    ) -> auth_pb2.IssueTokenResponse:
        kid, private = self.keyring.signer()
        issued = int(now.timestamp())
        token = sign(
            private,
            kid,
            subject=subject,
            key_id=key_id,
            scopes=scopes,
            issued_at=issued,
            ttl_s=ttl,
            token_id=secrets.token_hex(12),
            subs=tuple(subs),
        )
        expire = Timestamp(seconds=issued + ttl)
        return auth_pb2.IssueTokenResponse(
            access_token=token,
            token_type="Bearer",
            expire_time=expire,
            scopes=[_SCOPE_VALUES[s] for s in scopes if s in _SCOPE_VALUES],
            account_id=subject,
        )


_SETTABLE_STATES = (
    auth_pb2.ACCOUNT_STATE_ACTIVE,
    auth_pb2.ACCOUNT_STATE_SUSPENDED,
    auth_pb2.ACCOUNT_STATE_CLOSED,
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def build_server(
    settings: ChassisSettings,
    *,
    config: AuthConfig | None = None,
    clock: Callable[[], datetime] = _utcnow,
    new_id: Callable[[str], str] = _new_id,
    catalog: Catalog | None = None,
    volume_source: VolumeSource | None = None,
) -> Server:
    """The composition root. `volume_source`: where traded volumes come from
    (default: order's ListTradedVolumes through the mesh)."""
    config = config or AuthConfig.from_env()
    catalog = load_catalog() if catalog is None else catalog
    server = Server(settings)
    # NATS carries the account-state push; without it, followers reload on their timer.
    infra = await connect(
        server, schema="auth", migrations=MIGRATIONS, nats=bool(settings.nats_url)
    )
    assert infra.pool is not None
    store = Store(infra.pool)
    # auth's own authenticator refuses frozen accounts too, from its own tables.
    states = AccountStates(
        lambda: frozen_accounts(store), reload_s=settings.account_states_reload_s
    )
    server.account_states = states
    outbox: Outbox | None = None
    if infra.nats is not None:
        js = infra.nats.jetstream()

        async def publish(changes: list[StateChange]) -> None:
            for change in changes:
                await js.publish(
                    STATE_SUBJECT,
                    _change_pb(change).SerializeToString(),
                    stream=STATE_STREAM,
                    headers={"Nats-Msg-Id": f"auth-as-{change.change_seq}"},
                )

        async def publish_fees(changes: list[FeeChange]) -> None:
            for change in changes:
                await js.publish(
                    FEE_SUBJECT,
                    _fee_change_pb(change, config.fee_volume_asset).SerializeToString(),
                    stream=STATE_STREAM,
                    headers={"Nats-Msg-Id": f"auth-ft-{change.change_seq}"},
                )

        async def relay() -> int:
            return await store.publish_state_changes(publish) + await store.publish_fee_changes(
                publish_fees
            )

        outbox = Outbox(js, STATE_STREAM, ["auth.events.>"], relay)
        await server.enter(background(outbox.run(), "auth-state-outbox"))

    async def on_state_change() -> None:
        if outbox is not None:
            outbox.notify()
        try:  # this process refuses the account from its very next call
            await states.reload()
        except Exception:
            _log.warning("reloading the frozen accounts after a change failed", exc_info=True)

    async def on_fee_change() -> None:
        if outbox is not None:
            outbox.notify()

    await store.seed_fee_schedule(base_tier(catalog))
    volumes: Volumes | None = None
    credentials = service_credentials(settings)
    order_target = config.order_target or settings.mesh_addr
    if volume_source is None and credentials is not None and order_target is not None:
        order_channel = await server.enter(mesh_channel(order_target, credentials=credentials))
        volume_source = order_volumes(order_pb2_grpc.OrderServiceStub(order_channel))
    if volume_source is not None:
        volumes = Volumes(
            store,
            volume_source,
            asset=config.fee_volume_asset,
            days=config.fee_volume_days,
            clock=clock,
            changed=on_fee_change,
        )
        if config.fee_volume_interval_s > 0:
            await server.enter(
                background(volumes.run(config.fee_volume_interval_s), "auth-fee-volumes")
            )

    keyring = Keyring(store, config, clock)
    await keyring.rotate_and_reload()
    server.keys = keyring  # auth verifies tokens against its own keyring, not over HTTP
    await server.enter(serve_jwks(keyring, settings.host, config.jwks_port))
    await server.enter(background(keyring.maintain(), "auth-keyring"))
    server.add(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        AuthService(
            store,
            keyring,
            config,
            clock,
            new_id,
            catalog,
            on_state_change,
            volumes=volumes,
            on_fee_change=on_fee_change,
        ),
        policy=POLICY,
    )
    return server
