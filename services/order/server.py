"""order service: proto <-> the flow and errors, and the composition root.

`build_server` wires the store, the downstream clients (risk, match
through the mesh), the match-event consumer (the read model's only writer),
the dead man's switches and the stream sessions into one `Server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from services.chassis import (
    INTERNAL,
    AlreadyExists,
    Catalog,
    ChassisSettings,
    ExchangeError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Rule,
    Server,
    background,
    bad_page_token,
    batch_size,
    connect,
    current_auth,
    invalid_field,
    load_catalog,
    mesh_channel,
    optional_time,
    page_size,
    page_token,
    parse_page_token,
    read_page_token,
    require_request_id,
    service_credentials,
    user,
)
from services.chassis.fee_tiers import FeeTiers, push_fee_tiers
from services.chassis.listings import Listings
from services.chassis.money import MoneyError, decimal_text, parse_decimal
from services.risk.bucket import RateLimiter
from services.risk.config import RiskConfig

from .config import OrderConfig
from .consumer import EventConsumer
from .deadman import DeadMan
from .domain import check_client_order_id
from .downstream import MatchClient, rate_usage_var
from .flow import Flow
from .killswitch import KillSwitchConsumer
from .risk_checks import RiskChecks, RulesFollower
from .store import OrderQuery, Store
from .streams import Sessions
from .views import fill_proto, order_proto, timestamp

__all__ = ["POLICY", "OrderService", "build_server"]

_MATCH_SERVICE = match_pb2.DESCRIPTOR.services_by_name["MatchService"].full_name

MIGRATIONS = Path(__file__).with_name("migrations")
_log = logging.getLogger("cex.order")
MAX_BATCH = 20
M = TypeVar("M", bound=Message)

# Users act on their own account only (the account comes from their token); a
# service may act for any account it names (or for a user whose token it forwards).
POLICY: dict[str, Rule] = {
    "PlaceOrder": user("trade", services=True),
    "BatchPlaceOrders": user("trade", services=True),
    "AmendOrder": user("trade", services=True),
    "CancelOrder": user("trade", services=True),
    "CancelAllOrders": user("trade", services=True),
    "CancelAllAfter": user("trade", services=True),
    "StreamOrders": user("trade", services=True),
    "GetOrder": user("read", services=True),
    "ListOrders": user("read", services=True),
    "ListFills": user("read", services=True),
    "ListTradedVolumes": INTERNAL,  # auth's fee tiers by volume (ADR 0016)
}


def caller_account(requested: str, field: str = "account_id") -> str:
    """The account a call acts on: the caller's own, or for a service the one it names.
    Another account does not exist for a user (NOT_FOUND, as for a made-up id), so
    the answer tells nothing about which accounts exist. A master reads its
    sub-accounts' orders and fills (ADR 0017); it trades for them with their keys."""
    ctx = current_auth()
    if ctx.account_id:
        if requested and requested != ctx.account_id and not ctx.reads_sub(requested):
            raise NotFound(
                "ORDER_ACCOUNT_NOT_FOUND",
                "no such account for this caller",
                violations=[FieldViolation(field, "not the caller's account")],
            )
        return requested or ctx.account_id
    if not requested:
        raise InvalidArgument(
            "ORDER_ACCOUNT_REQUIRED",
            "a service must name the account it acts for",
            violations=[FieldViolation(field, "required for service callers")],
        )
    return requested


def _request_id(value: str, field: str = "request_id") -> None:
    """The one rule for idempotency keys (ADR 0003): required, then the id's format."""
    require_request_id(value, "ORDER_REQUEST_ID_REQUIRED", field=field)
    if bad := check_client_order_id(value, field):
        raise InvalidArgument("ORDER_INVALID_REQUEST_ID", bad.description, violations=[bad])


def _target(order_id: str, client_order_id: str) -> None:
    if bool(order_id) == bool(client_order_id):
        raise InvalidArgument(
            "ORDER_TARGET_REQUIRED",
            "set exactly one of order_id and client_order_id",
            violations=[FieldViolation("order_id", "set exactly one of order_id, client_order_id")],
        )
    if len(order_id) > 128 or len(client_order_id) > 64:
        raise InvalidArgument(
            "ORDER_TARGET_REQUIRED",
            "id too long",
            violations=[FieldViolation("order_id" if order_id else "client_order_id", "too long")],
        )


def _fingerprint(message: Message) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


_PAGE_SIZE_INVALID = "ORDER_INVALID_PAGE_SIZE"
_Listing = TypeVar("_Listing", order_pb2.ListOrdersRequest, order_pb2.ListFillsRequest)
_PAGE_TOKEN_INVALID = "ORDER_INVALID_PAGE_TOKEN"


def _page_size(value: int) -> int:
    return page_size(value, default=100, maximum=1000, reason=_PAGE_SIZE_INVALID)


def _query(request: _Listing, account: str) -> str:
    """The kind of a list's page tokens: its filters, so that a token is refused
    under any other filters than those of the page it continues."""
    filters = type(request)()
    filters.CopyFrom(request)
    filters.page_size = 0
    filters.page_token = ""
    filters.account_id = account
    return _fingerprint(filters)[:16]


def _order_position(time: str, order_id: str) -> tuple[datetime, str]:
    return datetime.fromisoformat(time), order_id


def _fill_position(time: str, seq: str, order_id: str) -> tuple[datetime, int, str]:
    return datetime.fromisoformat(time), int(seq), order_id


def _decimal_field(text: str, field: str) -> Decimal | None:
    if not text:
        return None
    try:
        value = parse_decimal(text)
    except MoneyError:
        value = Decimal(0)
    if value <= 0 or value.adjusted() > 15:
        raise InvalidArgument(
            "ORDER_INVALID_" + field.upper(),
            f"{field} must be a positive decimal below 1e16",
            violations=[FieldViolation(field, "must be a positive plain decimal")],
        )
    return value


async def _usage_headers(
    context: grpc.aio.ServicerContext[Any, Any], usage: tuple[int, int] | None = None
) -> None:
    """Risk's rate-limit budget, passed on as the major exchanges' used-weight headers
    (this call's, or `usage` when the checks ran in tasks of their own)."""
    usage = usage or rate_usage_var.get()
    if usage is not None:
        with contextlib.suppress(Exception):
            await context.send_initial_metadata(
                (("x-cex-order-limit-1s", str(usage[0])), ("x-cex-order-count-1s", str(usage[1])))
            )


def _status(error: ExchangeError) -> status_pb2.Status:
    return error.to_status("order")


class OrderService(order_pb2_grpc.OrderServiceServicer):
    """cex.order.v1.OrderService."""

    def __init__(
        self,
        flow: Flow,
        sessions: Sessions,
        deadman: DeadMan,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.flow = flow
        self.store = flow.store
        self.catalog: Catalog = flow.catalog
        self.sessions = sessions
        self.deadman = deadman
        self.clock = clock

    # -- shared by the unary methods and the stream ------------------------------

    async def _idempotent(
        self,
        account: str,
        request_id: str,
        kind: str,
        request: Message,
        response_type: type[M],
        compute: Callable[[], Awaitable[M]],
    ) -> M:
        body = type(request)()
        body.CopyFrom(request)
        if hasattr(body, "account_id"):
            body.account_id = ""
        fingerprint = _fingerprint(body)
        found = await self.flow.requests.submit((account, request_id))
        if found is not None:
            if found[0] != kind or found[1] != fingerprint:
                raise AlreadyExists(
                    "ORDER_DUPLICATE_REQUEST_ID",
                    "this request_id was used for another request",
                )
            return response_type.FromString(found[2])
        response = await compute()
        await self.flow.remembers.submit(
            (account, request_id, kind, fingerprint, response.SerializeToString())
        )
        return response

    async def place(
        self, account: str, request: order_pb2.PlaceOrderRequest, session_id: str = ""
    ) -> order_pb2.PlaceOrderResponse:
        order = await self.flow.place(account, request, session_id=session_id)
        return order_pb2.PlaceOrderResponse(order=order_proto(order, self.catalog))

    async def amend(
        self, account: str, request: order_pb2.AmendOrderRequest
    ) -> order_pb2.AmendOrderResponse:
        _request_id(request.request_id)
        _target(request.order_id, request.client_order_id)
        price = _decimal_field(request.price, "price")
        quantity = _decimal_field(request.quantity, "quantity")
        if price is None and quantity is None:
            raise InvalidArgument(
                "ORDER_AMEND_EMPTY",
                "set price and/or quantity",
                violations=[FieldViolation("quantity", "set price and/or quantity")],
            )
        order = await self.flow.find(account, request.order_id, request.client_order_id)
        market = self.catalog.markets[order.market]
        violations = []
        if price is not None and price % market.tick_size:
            violations.append(
                FieldViolation(
                    "price", f"must be a multiple of {market.tick_size}", "ORDER_PRICE_OFF_TICK"
                )
            )
        if quantity is not None and quantity % market.lot_size:
            violations.append(
                FieldViolation(
                    "quantity", f"must be a multiple of {market.lot_size}", "ORDER_QUANTITY_OFF_LOT"
                )
            )
        if violations:
            raise InvalidArgument(
                violations[0].reason, violations[0].description, violations=violations
            )

        async def compute() -> order_pb2.AmendOrderResponse:
            tag = (
                request.request_id
                or hashlib.sha256(
                    f"{request.price}|{request.quantity}|{self.clock().timestamp()}".encode()
                ).hexdigest()[:16]
            )
            amended = await self.flow.amend(order, price, quantity, tag)
            return order_pb2.AmendOrderResponse(order=order_proto(amended, self.catalog))

        return await self._idempotent(
            account, request.request_id, "amend", request, order_pb2.AmendOrderResponse, compute
        )

    async def cancel(
        self, account: str, request: order_pb2.CancelOrderRequest
    ) -> order_pb2.CancelOrderResponse:
        _request_id(request.request_id)
        _target(request.order_id, request.client_order_id)
        order = await self.flow.find(account, request.order_id, request.client_order_id)

        async def compute() -> order_pb2.CancelOrderResponse:
            cancelled = await self.flow.cancel(order)
            return order_pb2.CancelOrderResponse(order=order_proto(cancelled, self.catalog))

        return await self._idempotent(
            account, request.request_id, "cancel", request, order_pb2.CancelOrderResponse, compute
        )

    async def cancel_all(
        self,
        account: str,
        request: order_pb2.CancelAllOrdersRequest,
        reason: int = t.CANCEL_REASON_USER_REQUESTED,
    ) -> order_pb2.CancelAllOrdersResponse:
        _request_id(request.request_id)
        violations = []
        if request.market and self.catalog.market(request.market) is None:
            violations.append(FieldViolation("market", "not a market", "ORDER_UNKNOWN_MARKET"))
        if request.side not in (0, t.SIDE_BUY, t.SIDE_SELL):
            violations.append(FieldViolation("side", "not a side", "ORDER_INVALID_SIDE"))
        if violations:
            raise InvalidArgument(
                violations[0].reason, violations[0].description, violations=violations
            )

        async def compute() -> order_pb2.CancelAllOrdersResponse:
            orders = await self.flow.cancel_all(
                account, request.market, request.side, reason, tag=request.request_id
            )
            return order_pb2.CancelAllOrdersResponse(
                orders=[order_proto(o, self.catalog) for o in orders]
            )

        return await self._idempotent(
            account,
            request.request_id,
            "cancel_all",
            request,
            order_pb2.CancelAllOrdersResponse,
            compute,
        )

    async def cancel_all_after(
        self, account: str, request: order_pb2.CancelAllAfterRequest
    ) -> order_pb2.CancelAllAfterResponse:
        _request_id(request.request_id)
        violations = []
        if not 0 <= request.timeout_seconds <= 600:
            violations.append(
                FieldViolation("timeout_seconds", "0 to 600", "ORDER_INVALID_TIMEOUT")
            )
        if request.market and self.catalog.market(request.market) is None:
            violations.append(FieldViolation("market", "not a market", "ORDER_UNKNOWN_MARKET"))
        if violations:
            raise InvalidArgument(
                violations[0].reason, violations[0].description, violations=violations
            )
        trigger = await self.deadman.set(account, request.market, request.timeout_seconds)
        response = order_pb2.CancelAllAfterResponse()
        if trigger is not None:
            response.trigger_time.CopyFrom(timestamp(trigger))
        return response

    # -- unary RPCs ----------------------------------------------------------------

    async def PlaceOrder(
        self, request: order_pb2.PlaceOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.PlaceOrderResponse:
        try:
            return await self.place(caller_account(request.account_id), request)
        finally:
            await _usage_headers(context)

    async def BatchPlaceOrders(
        self,
        request: order_pb2.BatchPlaceOrdersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> order_pb2.BatchPlaceOrdersResponse:
        batch_size(
            len(request.requests), maximum=MAX_BATCH, field="requests", reason="ORDER_BATCH_SIZE"
        )
        ctx = current_auth()
        seen: set[str] = set()
        usages: list[tuple[int, int]] = []

        async def one(i: int, item: order_pb2.PlaceOrderRequest) -> order_pb2.PlaceOrderResult:
            try:
                account = caller_account(item.account_id, f"requests[{i}].account_id")
                if item.client_order_id in seen:
                    raise InvalidArgument(
                        "ORDER_DUPLICATE_CLIENT_ORDER_ID",
                        "the same client_order_id twice in one batch",
                        violations=[FieldViolation(f"requests[{i}].client_order_id", "repeated")],
                    )
                seen.add(item.client_order_id)
                order = await self.flow.place(account, item, prefix=f"requests[{i}].")
                return order_pb2.PlaceOrderResult(
                    client_order_id=item.client_order_id,
                    status=status_pb2.Status(code=0),
                    order=order_proto(order, self.catalog),
                )
            except ExchangeError as error:
                return order_pb2.PlaceOrderResult(
                    client_order_id=item.client_order_id, status=_status(error)
                )
            finally:
                if (usage := rate_usage_var.get()) is not None:  # this task's own check
                    usages.append(usage)

        del ctx
        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(request.requests)))
        await _usage_headers(context, max(usages, key=lambda u: u[1], default=None))
        return order_pb2.BatchPlaceOrdersResponse(results=results)

    async def AmendOrder(
        self, request: order_pb2.AmendOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.AmendOrderResponse:
        try:
            return await self.amend(caller_account(request.account_id), request)
        finally:
            await _usage_headers(context)

    async def CancelOrder(
        self, request: order_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.CancelOrderResponse:
        return await self.cancel(caller_account(request.account_id), request)

    async def CancelAllOrders(
        self,
        request: order_pb2.CancelAllOrdersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> order_pb2.CancelAllOrdersResponse:
        return await self.cancel_all(caller_account(request.account_id), request)

    async def CancelAllAfter(
        self,
        request: order_pb2.CancelAllAfterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> order_pb2.CancelAllAfterResponse:
        return await self.cancel_all_after(caller_account(request.account_id), request)

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.GetOrderResponse:
        account = caller_account(request.account_id)
        _target(request.order_id, request.client_order_id)
        order = await self.flow.find(account, request.order_id, request.client_order_id)
        return order_pb2.GetOrderResponse(order=order_proto(order, self.catalog))

    async def ListOrders(
        self, request: order_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.ListOrdersResponse:
        account = caller_account(request.account_id)
        limit = _page_size(request.page_size)
        if request.status not in (0, 1, 2):
            raise InvalidArgument(
                "ORDER_INVALID_STATUS_FILTER",
                "unknown status filter",
                violations=[FieldViolation("status", "OPEN, CLOSED or unset")],
            )
        kind = _query(request, account)
        after = parse_page_token(
            request.page_token, kind, _order_position, parts=2, reason=_PAGE_TOKEN_INVALID
        )
        query = OrderQuery(
            account_id=account,
            working={0: None, 1: True, 2: False}[request.status],
            market=request.market,
            side=request.side,
            start_time=optional_time(request, "start_time"),
            end_time=optional_time(request, "end_time"),
            after=after,
            limit=limit + 1,
        )
        await self.flow.caught_up(account)
        rows = await self.store.query(query)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            token = page_token(kind, last.create_time.isoformat(), last.order_id)
        return order_pb2.ListOrdersResponse(
            orders=[order_proto(o, self.catalog) for o in rows], next_page_token=token
        )

    async def ListFills(
        self, request: order_pb2.ListFillsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.ListFillsResponse:
        account = caller_account(request.account_id)
        limit = _page_size(request.page_size)
        kind = _query(request, account)
        after = parse_page_token(
            request.page_token, kind, _fill_position, parts=3, reason=_PAGE_TOKEN_INVALID
        )
        await self.flow.caught_up(account)
        rows = await self.store.fills(
            account,
            market=request.market,
            order_id=request.order_id,
            start_time=optional_time(request, "start_time"),
            end_time=optional_time(request, "end_time"),
            after=after,
            limit=limit + 1,
        )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            token = page_token(kind, last.trade_time.isoformat(), str(last.seq), last.order_id)
        return order_pb2.ListFillsResponse(
            fills=[fill_proto(f) for f in rows], next_page_token=token
        )

    async def ListTradedVolumes(
        self,
        request: order_pb2.ListTradedVolumesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> order_pb2.ListTradedVolumesResponse:
        if request.quote_asset not in self.catalog.assets:
            raise invalid_field(
                "ORDER_INVALID_ASSET", "quote_asset", "an asset of the catalog, e.g. USDT"
            )
        if not request.HasField("start_time"):
            raise invalid_field("ORDER_FIELD_REQUIRED", "start_time", "required")
        size = page_size(request.page_size, default=1000, maximum=10_000, reason=_PAGE_SIZE_INVALID)
        found = read_page_token(request.page_token, "volumes", parts=1, reason=_PAGE_TOKEN_INVALID)
        if found is not None and not found[0]:
            raise bad_page_token(_PAGE_TOKEN_INVALID)
        markets = sorted(
            m.symbol for m in self.catalog.markets.values() if m.quote.symbol == request.quote_asset
        )
        rows = await self.store.traded_volumes(
            request.start_time.ToDatetime(tzinfo=UTC),
            markets,
            after=found[0] if found else "",
            limit=size + 1,
        )
        page = rows[:size]
        return order_pb2.ListTradedVolumesResponse(
            volumes=[order_pb2.TradedVolume(account_id=a, volume=decimal_text(v)) for a, v in page],
            next_page_token=page_token("volumes", page[-1][0]) if len(rows) > size else "",
        )

    def StreamOrders(
        self,
        request_iterator: AsyncIterator[order_pb2.StreamOrdersRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[order_pb2.StreamOrdersResponse]:
        return self.sessions.serve(self, request_iterator, context)


async def _every(seconds: float, job: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("%s failed", name)
        await asyncio.sleep(seconds)


async def _follow_fee_tiers(
    server: Server, settings: ChassisSettings, config: OrderConfig, catalog: Catalog
) -> FeeTiers | None:
    """Each account's fee rates, followed from auth (pushed on NATS, reloaded through
    the mesh: chassis' fee_tiers.py); None without the mesh or a service credential
    (every order is then priced at the configured rates)."""
    credentials = service_credentials(settings)
    target = config.auth_target or settings.mesh_addr
    if credentials is None or target is None:
        return None
    channel = await server.enter(mesh_channel(target, credentials=credentials))
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def load() -> auth_pb2.GetFeeTiersResponse:
        reply: auth_pb2.GetFeeTiersResponse = await stub.GetFeeTiers(
            auth_pb2.GetFeeTiersRequest(), timeout=5.0
        )
        return reply

    tiers = FeeTiers(
        load,
        default=(parse_decimal(config.maker_fee_rate), parse_decimal(config.taker_fee_rate)),
        reload_s=settings.account_states_reload_s,
    )
    push = (
        push_fee_tiers(tiers, settings.nats_url, name=f"{settings.service}-fee-tiers")
        if settings.nats_url
        else None
    )
    await server.enter(background(tiers.run(push), "order-fee-tiers"))
    return tiers


async def build_server(
    settings: ChassisSettings,
    *,
    config: OrderConfig | None = None,
    catalog: Catalog | None = None,
    mesh_target: str | None = None,
) -> Server:
    """The composition root. mesh_target overrides where risk and match are called."""
    config = OrderConfig.from_env() if config is None else config
    catalog = load_catalog() if catalog is None else catalog
    server = Server(settings)
    # Order keeps no session state (transaction-scoped settings only): no reset
    # round trip each time a connection goes back to the pool.
    infra = await connect(
        server,
        schema="order",
        migrations=MIGRATIONS,
        nats=True,  # the read model is built from match's events
        redis=settings.redis_url is not None,  # the rate buckets risk's checks take from
        session_reset=False,
    )
    assert infra.pool is not None
    store = Store(infra.pool)
    target = mesh_target or config.mesh_target or settings.mesh_addr
    if target is None:
        raise ValueError("order needs CEX_MESH_ADDR (or ORDER_MESH_TARGET) to reach its peers")
    credentials = service_credentials(settings)
    risk_channel = await server.enter(
        mesh_channel(config.risk_target or target, credentials=credentials)
    )
    match_channel = await server.enter(
        mesh_channel(config.match_target or target, credentials=credentials, serving=_MATCH_SERVICE)
    )
    match = MatchClient(match_channel, token=credentials.token if credentials else None)
    # Markets listed at runtime (ADR 0018): at start, then as a backstop to the events.
    listings = Listings(catalog, match_channel)
    await listings.load()
    await server.enter(background(listings.run(), "order-listings"))
    risk_config = RiskConfig.from_env()
    follower = RulesFollower(risk_channel, catalog)
    await server.enter(background(follower.run(), "order-risk-rules"))
    limiter = RateLimiter(
        infra.redis, prefix=risk_config.redis_prefix, timeout_s=risk_config.redis_timeout_s
    )
    risk = RiskChecks(follower, limiter, catalog, enabled=config.risk_checks)
    await server.enter(background(match.run(), "order-match-stream"))
    sessions = Sessions(
        catalog,
        queue_size=config.stream_queue,
        replica=config.replica,
        lease_s=config.session_lease_s,
        resume_s=config.session_resume_s,
        reports_keep_s=config.session_reports_keep_s,
    )
    assert infra.nats is not None
    consumer = EventConsumer(
        store=store,
        catalog=catalog,
        js=infra.nats.jetstream(),
        replay=match.replay,
        sink=sessions.publish,
        durable=config.consumer_name,
        inactive_threshold_s=config.consumer_inactive_s or None,
    )
    await server.enter(background(consumer.run(), "order-consumer"))
    flow = Flow(
        store=store,
        catalog=catalog,
        config=config,
        risk=risk,
        match=match,
        consumer=consumer,
        fee_tiers=await _follow_fee_tiers(server, settings, config, catalog),
        listings=listings,
    )
    sessions.flow = flow
    await server.enter(background(flow.run(), "order-batchers"))
    deadman = DeadMan(store, flow)
    if config.kill_switches:
        kills = KillSwitchConsumer(
            flow=flow, js=infra.nats.jetstream(), durable=config.kill_switch_consumer
        )
        await server.enter(background(kills.run(), "order-kill-switches"))
    await server.enter(
        background(_every(config.deadman_interval_s, deadman.fire_due, "deadman"), "order-deadman")
    )
    await server.enter(background(sessions.run(store), "order-sessions"))
    server.add(
        order_pb2.DESCRIPTOR.services_by_name["OrderService"],
        order_pb2_grpc.add_OrderServiceServicer_to_server,
        OrderService(flow, sessions, deadman),
        policy=POLICY,
    )
    return server
