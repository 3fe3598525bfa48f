"""risk service: proto <-> domain and errors, and the composition root.

CheckOrder reads only memory and one Redis script; CheckWithdrawal and the admin
calls go to PostgreSQL. A denial is a normal answer (allowed = false with a
google.rpc.Status), malformed input an RPC error (INVALID_ARGUMENT with field
violations). The contract for callers: docs/adr/0007-risk.md.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from prometheus_client import CollectorRegistry, Counter

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import (
    INTERNAL,
    Catalog,
    ChassisSettings,
    ErrorDetails,
    FieldViolation,
    InvalidArgument,
    MoneyError,
    NotFound,
    PermissionDenied,
    Rule,
    Server,
    Violations,
    background,
    bad_page_token,
    connect,
    current_auth,
    invalid_field,
    load_catalog,
    metrics_registry,
    page_size,
    page_token,
    read_page_token,
    sees_every_account,
    user,
)
from services.chassis.clients import mesh_channel, service_credentials
from services.chassis.listings import Listings
from services.chassis.tokens import KeySource

from .bucket import RateLimiter
from .checks import OrderChecks, denial_status, identifier, units
from .config import RiskConfig
from .domain import (
    ANY,
    EXACT,
    KillSwitch,
    Limits,
    Scope,
    WithdrawalCheck,
    band_bps,
    check_withdrawal,
    limit_amount_problem,
    visible_switches,
    within_master,
)
from .events import Outbox
from .prices import PriceFollower
from .rules import limits_of, limits_pb, rules_pb, switch_pb
from .state import State
from .store import Store, StoredLimits

__all__ = ["POLICY", "RiskMetrics", "RiskService", "build_server"]

MIGRATIONS = Path(__file__).with_name("migrations")

# Order and funding call the checks with their service token (forwarding the
# user's is fine: the rule accepts both). Limits and kill switches are operator
# calls; read-scoped users may see their own limits and the switches that
# concern them.
POLICY: dict[str, Rule] = {
    "CheckOrder": INTERNAL,
    "CheckOrders": INTERNAL,
    "CheckWithdrawal": INTERNAL,
    "WatchRules": INTERNAL,
    "GetLimits": user("read", services=True),
    "ListKillSwitches": user("read", services=True),
    "SetLimits": user("admin", services=True),
    # A master, for its sub-accounts, within its own limits (ADR 0017).
    "SetSubAccountLimits": user("trade"),
    "SetKillSwitch": user("admin", services=True),
}

MAX_CHECKS = 1000  # per CheckOrders call
RATE_LIMIT_HEADER = "x-cex-order-limit-1s"
RATE_USED_HEADER = "x-cex-order-count-1s"

_MAX_TEXT = 500
_SCOPES = {
    risk_pb2.KILL_SWITCH_SCOPE_GLOBAL: Scope.GLOBAL,
    risk_pb2.KILL_SWITCH_SCOPE_MARKET: Scope.MARKET,
    risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT: Scope.ACCOUNT,
}


class RiskMetrics:
    """Risk's own Prometheus metrics (RED per method comes from the chassis)."""

    def __init__(self, registry: CollectorRegistry, limiter: RateLimiter) -> None:
        self.checks = Counter(
            "risk_checks",
            "Checks answered, by method and outcome (ALLOWED or the denial reason)",
            ["method", "outcome"],
            registry=registry,
        )
        fallbacks = Counter(
            "risk_ratelimit_local_fallbacks",
            "Rate-limit checks served by the local bucket because Redis was unavailable",
            registry=registry,
        )
        fallbacks.inc(0)
        self._limiter = limiter
        self._fallbacks = fallbacks
        self._seen = 0
        self._children: dict[tuple[str, str], Counter] = {}

    def checked(self, method: str, outcome: str) -> None:
        child = self._children.get((method, outcome))
        if child is None:
            child = self._children[(method, outcome)] = self.checks.labels(method, outcome)
        child.inc()

    def sync(self) -> None:
        delta = self._limiter.fallbacks - self._seen
        if delta:
            self._fallbacks.inc(delta)
            self._seen += delta


def _limit_decimal(v: Violations, field: str, text: str, unit: Decimal | None) -> None:
    problem = limit_amount_problem(text, unit)
    if problem is not None:
        v.add(field, *problem)


def _switch_after(token: str) -> tuple[int, str, str] | None:
    found = read_page_token(token, "kill_switches", parts=3, reason="RISK_PAGE_TOKEN_INVALID")
    if found is None:
        return None
    scope, market, account = found
    if not scope.isdigit():
        raise bad_page_token("RISK_PAGE_TOKEN_INVALID")
    return int(scope), market, account


_LimitsRequest = risk_pb2.SetLimitsRequest | risk_pb2.SetSubAccountLimitsRequest
_LimitsResponse = TypeVar(
    "_LimitsResponse", risk_pb2.SetLimitsResponse, risk_pb2.SetSubAccountLimitsResponse
)


def _check_limits_request(v: Violations, request: _LimitsRequest) -> None:
    """A limits change names its limits and the version it replaces (0: any)."""
    if not request.HasField("limits"):
        v.add("limits", "required", "REQUIRED")
    if request.expected_version < 0:
        v.add("expected_version", "must not be negative", "NEGATIVE")
    v.raise_if_any("RISK_REQUEST_INVALID")


class RiskService(risk_pb2_grpc.RiskServiceServicer):
    """cex.risk.v1.RiskService."""

    def __init__(
        self,
        *,
        store: Store,
        state: State,
        limiter: RateLimiter,
        catalog: Catalog,
        clock: Callable[[], int] = time.time_ns,
        outbox: Outbox | None = None,
        metrics: RiskMetrics | None = None,
        heartbeat_s: float = 1.0,
    ) -> None:
        self._outbox = outbox
        self._metrics = metrics or RiskMetrics(CollectorRegistry(), limiter)
        self._checks = OrderChecks(
            state,
            limiter,
            catalog,
            on_checked=lambda outcome: self._metrics.checked("CheckOrder", outcome),
        )
        self._heartbeat_s = heartbeat_s
        self._store = store
        self._state = state
        self._limiter = limiter
        self._catalog = catalog
        self._clock = clock

    # -- CheckOrder -----------------------------------------------------------

    async def CheckOrder(
        self, request: risk_pb2.CheckOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.CheckOrderResponse:
        response = await self._checks.check(request)
        limit = response.rate_limit.limit
        if limit:
            await context.send_initial_metadata(
                ((RATE_LIMIT_HEADER, str(limit)), (RATE_USED_HEADER, str(response.rate_limit.used)))
            )
        self._metrics.sync()
        return response

    async def CheckOrders(
        self, request: risk_pb2.CheckOrdersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.CheckOrdersResponse:
        n = len(request.checks)
        if not 1 <= n <= MAX_CHECKS:
            raise invalid_field(
                "RISK_REQUEST_INVALID",
                "checks",
                f"1 to {MAX_CHECKS} checks, got {n}",
                "OUT_OF_RANGE",
            )
        results = await self._checks.check_many(request.checks)
        self._metrics.sync()
        return risk_pb2.CheckOrdersResponse(results=results)

    async def WatchRules(
        self, request: risk_pb2.WatchRulesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[risk_pb2.WatchRulesResponse]:
        heartbeat_ms = int(self._heartbeat_s * 1000)
        version = -1
        while True:
            seen, version = version, await self._state.changed(version, self._heartbeat_s)
            if version == seen:  # nothing changed: only say so (the set may be large)
                yield risk_pb2.WatchRulesResponse(
                    change_seq=self._state.change_seq, heartbeat_ms=heartbeat_ms, unchanged=True
                )
            else:
                yield rules_pb(self._state, self._catalog, heartbeat_ms)

    # -- CheckWithdrawal ------------------------------------------------------

    async def CheckWithdrawal(
        self,
        request: risk_pb2.CheckWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> risk_pb2.CheckWithdrawalResponse:
        v = Violations()
        identifier(v, "withdrawal_id", request.withdrawal_id)
        identifier(v, "account_id", request.account_id)
        if not request.asset:
            v.add("asset", "required", "REQUIRED")
        if not request.amount:
            v.add("amount", "required", "REQUIRED")
        for name in ("network", "address"):
            if len(getattr(request, name)) > _MAX_TEXT:
                v.add(name, f"at most {_MAX_TEXT} characters", "TOO_LONG")
        v.raise_if_any("RISK_WITHDRAWAL_INVALID")
        asset = self._catalog.assets.get(request.asset)
        if asset is None:
            raise NotFound(
                "RISK_ASSET_NOT_FOUND",
                f"unknown asset {request.asset!r}",
                violations=[FieldViolation("asset", "unknown asset", "NOT_FOUND")],
            )
        amount = units(v, "amount", request.amount, asset.to_minor)
        v.raise_if_any("RISK_WITHDRAWAL_INVALID")
        assert amount is not None
        # Money leaves the exchange: decide on the limits and switches as PostgreSQL
        # has them now, not as of the last reload tick (one cheap query).
        await self._state.refresh()
        limits = self._state.limits(request.account_id)
        switches = self._state.switches

        def decide(day_minor: int, day_count: int) -> tuple[bool, bytes]:
            denial = check_withdrawal(
                WithdrawalCheck(
                    account_id=request.account_id,
                    asset=asset.symbol,
                    amount=EXACT.multiply(Decimal(amount), asset.unit),
                    day_amount=EXACT.multiply(Decimal(day_minor), asset.unit),
                    day_count=day_count,
                ),
                limits=limits,
                switches=switches,
            )
            response = risk_pb2.CheckWithdrawalResponse(allowed=denial is None)
            if denial is not None:
                response.denial.CopyFrom(denial_status(denial))
            return denial is None, response.SerializeToString()

        stored = await self._store.check_withdrawal(
            withdrawal_id=request.withdrawal_id,
            account_id=request.account_id,
            asset=asset.symbol,
            amount=amount,
            body=request.SerializeToString(deterministic=True),
            now_ns=self._clock(),
            decide=decide,
        )
        reply = risk_pb2.CheckWithdrawalResponse.FromString(stored)
        outcome = ErrorDetails.from_status(reply.denial).reason if not reply.allowed else "ALLOWED"
        self._metrics.checked("CheckWithdrawal", outcome)
        return reply

    # -- limits ----------------------------------------------------------------

    def _visible_account(self, account_id: str) -> str:
        """A read-scoped user (or a service acting for one) sees only their own account;
        admins and services acting for themselves any."""
        ctx = current_auth()
        if sees_every_account(ctx):
            return account_id
        if account_id and account_id != ctx.account_id and not ctx.reads_sub(account_id):
            raise NotFound("RISK_LIMITS_NOT_FOUND", f"no limits for account {account_id}")
        return account_id or ctx.account_id

    async def GetLimits(
        self, request: risk_pb2.GetLimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.GetLimitsResponse:
        v = Violations()
        identifier(v, "account_id", request.account_id, required=False)
        v.raise_if_any("RISK_REQUEST_INVALID")
        account = self._visible_account(request.account_id)
        defaults = self._state.defaults
        if not account:
            return risk_pb2.GetLimitsResponse(
                limits=limits_pb(defaults.limits, defaults.version, defaults.update_time_ns)
            )
        own = self._state.stored(account)
        effective = self._state.limits(account)
        version, when = (own.version, own.update_time_ns) if own else (0, defaults.update_time_ns)
        return risk_pb2.GetLimitsResponse(limits=limits_pb(effective, version, when))

    def _validated_limits(self, message: risk_pb2.Limits) -> Limits:
        v = Violations()
        identifier(v, "limits.account_id", message.account_id, required=False)
        if not 0 <= message.max_orders_per_second <= 1_000_000:
            v.add("limits.max_orders_per_second", "0 (no limit) to 1000000", "OUT_OF_RANGE")
        if message.max_open_orders < 0:
            v.add("limits.max_open_orders", "must not be negative", "NEGATIVE")
        seen: set[str] = set()
        for i, m in enumerate(message.markets):
            f = f"limits.markets[{i}]"
            market = self._catalog.market(m.market)
            if m.market != ANY and market is None:
                v.add(f"{f}.market", f"unknown market {m.market!r}", "NOT_FOUND")
            if m.market in seen:
                v.add(f"{f}.market", "listed twice", "DUPLICATE")
            seen.add(m.market)
            _limit_decimal(
                v,
                f"{f}.max_order_quantity",
                m.max_order_quantity,
                market.lot_size if market else None,
            )
            _limit_decimal(v, f"{f}.max_order_notional", m.max_order_notional, None)
            if m.price_band:
                try:
                    if band_bps(m.price_band) > 10_000:
                        v.add(f"{f}.price_band", "at most 1 (100%)", "OUT_OF_RANGE")
                except MoneyError as error:
                    v.add(f"{f}.price_band", str(error), error.reason)
            if m.max_open_orders < 0:
                v.add(f"{f}.max_open_orders", "must not be negative", "NEGATIVE")
        seen = set()
        for i, w in enumerate(message.withdrawals):
            f = f"limits.withdrawals[{i}]"
            asset = self._catalog.assets.get(w.asset)
            if w.asset != ANY and asset is None:
                v.add(f"{f}.asset", f"unknown asset {w.asset!r}", "NOT_FOUND")
            if w.asset in seen:
                v.add(f"{f}.asset", "listed twice", "DUPLICATE")
            seen.add(w.asset)
            unit = asset.unit if asset else None
            _limit_decimal(v, f"{f}.max_amount", w.max_amount, unit)
            _limit_decimal(v, f"{f}.max_amount_per_day", w.max_amount_per_day, unit)
            if w.max_count_per_day < 0:
                v.add(f"{f}.max_count_per_day", "must not be negative", "NEGATIVE")
        v.raise_if_any("RISK_LIMITS_INVALID")
        return limits_of(message)

    @staticmethod
    def _actor() -> str:
        """Who makes an admin change; a service relaying a user needs an admin user."""
        ctx = current_auth()
        if not sees_every_account(ctx):
            raise PermissionDenied("RISK_ADMIN_REQUIRED", "changing risk settings needs admin")
        if ctx.account_id:
            return ctx.account_id + (f" via svc:{ctx.service}" if ctx.service else "")
        return f"svc:{ctx.service}"

    def _admin_change(self, request_id: str) -> tuple[str, Violations]:
        """Who makes an admin change, and the violations of its request so far (its
        request_id checked)."""
        actor = self._actor()
        v = Violations()
        identifier(v, "request_id", request_id)
        return actor, v

    async def _write_once(
        self,
        method: str,
        request: _LimitsRequest | risk_pb2.SetKillSwitchRequest,
        write: Callable[[Any], Awaitable[bytes]],
    ) -> bytes:
        """An admin change's answer: `write`'s, made once per request_id (the first
        answer to a retry); the rules are reloaded either way."""
        body = request.SerializeToString(deterministic=True)
        raw = await self._store.idempotent(method, request.request_id, body, write)
        await self._state.reload()
        return raw

    async def _put_limits(
        self,
        method: str,
        request: _LimitsRequest,
        limits: Limits,
        actor: str,
        answer: type[_LimitsResponse],
    ) -> _LimitsResponse:
        """Store `limits` at the request's expected version, once per request_id
        (keyed by `method`), and answer them as `answer`."""
        now = self._clock()

        async def write(conn: Any) -> bytes:
            stored: StoredLimits = await Store.put_limits(
                conn, limits, request.expected_version, actor, now
            )
            return answer(
                limits=limits_pb(stored.limits, stored.version, stored.update_time_ns)
            ).SerializeToString()

        return answer.FromString(await self._write_once(method, request, write))

    async def SetLimits(
        self, request: risk_pb2.SetLimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.SetLimitsResponse:
        actor, v = self._admin_change(request.request_id)
        _check_limits_request(v, request)
        limits = self._validated_limits(request.limits)
        return await self._put_limits(
            "SetLimits", request, limits, actor, risk_pb2.SetLimitsResponse
        )

    async def SetSubAccountLimits(
        self,
        request: risk_pb2.SetSubAccountLimitsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> risk_pb2.SetSubAccountLimitsResponse:
        ctx = current_auth()
        v = Violations()
        identifier(v, "request_id", request.request_id)
        _check_limits_request(v, request)
        sub = request.limits.account_id
        if sub not in ctx.subs:  # another account, the exchange defaults ("") included
            raise NotFound("RISK_LIMITS_NOT_FOUND", f"no limits for account {sub}")
        requested = self._validated_limits(request.limits)
        # The master's own effective limits, the operator's, bound the sub's.
        limits, over = within_master(requested, self._state.limits(ctx.account_id))
        if over:
            raise InvalidArgument(
                "RISK_ABOVE_MASTER_LIMITS",
                "a sub-account's limits must be within its master's",
                violations=[FieldViolation(f, why) for f, why in over],
            )
        # Request ids are the master's own: keyed by it, one master's id tells
        # nothing of another's.
        return await self._put_limits(
            f"SetSubAccountLimits:{ctx.account_id}",
            request,
            limits,
            f"{ctx.account_id} (master)",
            risk_pb2.SetSubAccountLimitsResponse,
        )

    # -- kill switches -----------------------------------------------------------

    async def SetKillSwitch(
        self, request: risk_pb2.SetKillSwitchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> risk_pb2.SetKillSwitchResponse:
        actor, v = self._admin_change(request.request_id)
        scope = _SCOPES.get(request.scope)
        if scope is None:
            v.add("scope", "GLOBAL, MARKET or ACCOUNT", "REQUIRED")
        if scope is Scope.MARKET:
            if not request.market:
                v.add("market", "required for MARKET scope", "REQUIRED")
            elif self._catalog.market(request.market) is None:
                v.add("market", f"unknown market {request.market!r}", "NOT_FOUND")
        elif request.market:
            v.add("market", "only for MARKET scope", "NOT_ALLOWED")
        if scope is Scope.ACCOUNT:
            identifier(v, "account_id", request.account_id)
        elif request.account_id:
            v.add("account_id", "only for ACCOUNT scope", "NOT_ALLOWED")
        if request.block_withdrawals and (scope is Scope.MARKET or not request.engaged):
            v.add(
                "block_withdrawals", "only when engaging a GLOBAL or ACCOUNT switch", "NOT_ALLOWED"
            )
        if request.cancel_open_orders and not request.engaged:
            v.add("cancel_open_orders", "only when engaging", "NOT_ALLOWED")
        if not request.reason.strip():
            v.add("reason", "required (kept in the audit log)", "REQUIRED")
        elif len(request.reason) > _MAX_TEXT:
            v.add("reason", f"at most {_MAX_TEXT} characters", "TOO_LONG")
        v.raise_if_any("RISK_REQUEST_INVALID")
        assert scope is not None
        switch = KillSwitch(
            scope=scope,
            market=request.market,
            account_id=request.account_id,
            engaged=request.engaged,
            block_withdrawals=request.block_withdrawals,
            reason=request.reason,
            updated_by=actor,
            update_time_ns=self._clock() // 1000 * 1000,
        )

        async def write(conn: Any) -> bytes:
            await Store.put_kill_switch(
                conn,
                switch,
                request_id=request.request_id,
                cancel_open_orders=request.cancel_open_orders,
            )
            return risk_pb2.SetKillSwitchResponse(kill_switch=switch_pb(switch)).SerializeToString()

        raw = await self._write_once("SetKillSwitch", request, write)
        if self._outbox is not None:
            self._outbox.notify()
        return risk_pb2.SetKillSwitchResponse.FromString(raw)

    async def ListKillSwitches(
        self,
        request: risk_pb2.ListKillSwitchesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> risk_pb2.ListKillSwitchesResponse:
        size = page_size(
            request.page_size, default=100, maximum=1000, reason="RISK_REQUEST_INVALID"
        )
        after = _switch_after(request.page_token)
        ctx = current_auth()
        found = visible_switches(
            await self._store.kill_switches(),
            account=None if sees_every_account(ctx) else ctx.account_id,
            engaged_only=request.engaged_only,
            after=after,
        )
        token = ""
        if len(found) > size:
            found = found[:size]
            scope, market, account = found[-1].key
            token = page_token("kill_switches", str(scope), market, account)
        return risk_pb2.ListKillSwitchesResponse(
            kill_switches=[switch_pb(s) for s in found], next_page_token=token
        )


async def build_server(
    settings: ChassisSettings,
    *,
    config: RiskConfig | None = None,
    catalog: Catalog | None = None,
    clock: Callable[[], int] = time.time_ns,
    keys: KeySource | None = None,
    registry: CollectorRegistry | None = None,
) -> Server:
    """The composition root. `keys` replaces auth's JWKS (tests)."""
    config = RiskConfig.from_env() if config is None else config
    registry = metrics_registry(registry, settings.metrics_port)
    catalog = load_catalog() if catalog is None else catalog
    server = Server(settings, keys=keys)
    infra = await connect(
        server,
        schema="risk",
        migrations=MIGRATIONS,
        redis=settings.redis_url is not None,
        nats=config.prices and settings.nats_url is not None,
    )
    pool = infra.pool
    assert isinstance(pool, asyncpg.Pool)
    store = Store(pool)
    state = State(store)
    await state.reload()
    if config.reload_interval_s > 0:
        await server.enter(background(state.run(config.reload_interval_s), "risk-reload"))
    outbox = None
    if infra.nats is not None:
        js = infra.nats.jetstream()
        outbox = Outbox(store, js, every_s=max(config.reload_interval_s, 0.1))
        await server.enter(background(outbox.run(), "risk-outbox"))
        follower = PriceFollower(
            js=js,
            catalog=catalog,
            store=store,
            state=state,
            durable=config.consumer_name,
        )
        await server.enter(background(follower.run(), "risk-prices"))
    if settings.mesh_addr:  # markets listed at runtime (ADR 0018): limits may name them
        channel = await server.enter(
            mesh_channel(
                settings.mesh_addr, credentials=service_credentials(settings), authority="match"
            )
        )
        listings = Listings(catalog, channel)
        await listings.load()
        await server.enter(background(listings.run(), "risk-listings"))
    limiter = RateLimiter(infra.redis, prefix=config.redis_prefix, timeout_s=config.redis_timeout_s)
    server.add(
        risk_pb2.DESCRIPTOR.services_by_name["RiskService"],
        risk_pb2_grpc.add_RiskServiceServicer_to_server,
        RiskService(
            store=store,
            state=state,
            limiter=limiter,
            catalog=catalog,
            clock=clock,
            outbox=outbox,
            metrics=RiskMetrics(registry, limiter),
            heartbeat_s=config.rules_heartbeat_s,
        ),
        policy=POLICY,
    )
    return server
