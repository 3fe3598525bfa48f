"""Risk's pre-trade order checks: a CheckOrderRequest in, its answer out.

One implementation for both places the checks run: risk's own CheckOrder and
CheckOrders, and the order gateway, which runs them in its own process on the
rules it follows from risk (WatchRules) so that no call leaves the process on
an order's way (ADR 0013). `rules` is whatever holds limits, kill switches and
reference prices (risk's State, or order's copy of it); `limiter` takes from
the per-account rate buckets in Redis (shared by every process that checks).
Malformed input raises INVALID_ARGUMENT with field violations; a denial is a
normal answer (allowed = false with a google.rpc.Status).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Protocol

import grpc
from google.rpc import status_pb2

from cex.risk.v1 import risk_pb2
from cex.type.v1 import types_pb2
from services.chassis import (
    Catalog,
    ExchangeError,
    FieldViolation,
    MoneyError,
    NotFound,
    Violations,
)

from .bucket import RateLimiter, Take
from .domain import EXACT, Denial, KillSwitches, Limits, OrderCheck, check_order

__all__ = [
    "DOMAIN",
    "OrderChecks",
    "Rules",
    "denial_status",
    "identifier",
    "units",
]

DOMAIN = "risk"
_OK = status_pb2.Status(code=0)
_MAX_ID = 128
_LIMIT_TYPES = (types_pb2.ORDER_TYPE_LIMIT, types_pb2.ORDER_TYPE_STOP_LIMIT)
_STOP_TYPES = (types_pb2.ORDER_TYPE_STOP_LIMIT, types_pb2.ORDER_TYPE_STOP_MARKET)
_MARKET_TYPES = (types_pb2.ORDER_TYPE_MARKET, types_pb2.ORDER_TYPE_STOP_MARKET)


class Rules(Protocol):
    """What the checks read: risk's State, or a follower's copy of it."""

    @property
    def switches(self) -> KillSwitches: ...

    def limits(self, account_id: str) -> Limits: ...

    def price(self, market: str) -> int | None: ...


def denial_status(denial: Denial) -> status_pb2.Status:
    error = ExchangeError(
        denial.reason,
        denial.message,
        code=grpc.StatusCode[denial.code],
        metadata=denial.metadata,
        retry_after_s=denial.retry_after_s,
    )
    return error.to_status(DOMAIN)


def identifier(v: Violations, field: str, value: str, *, required: bool = True) -> None:
    """An id field: required (unless said otherwise), at most 128 characters."""
    if required and not value:
        v.add(field, "required", "REQUIRED")
    elif len(value) > _MAX_ID:
        v.add(field, f"at most {_MAX_ID} characters", "TOO_LONG")


def units(v: Violations, field: str, text: str, parse: Callable[[str], int]) -> int | None:
    """A positive decimal string on its grid, or a violation."""
    try:
        found = parse(text)
    except MoneyError as error:
        v.add(field, str(error), error.reason)
        return None
    if found <= 0:
        v.add(field, "must be positive", "NOT_POSITIVE")
        return None
    return found


class OrderChecks:
    def __init__(
        self,
        rules: Rules,
        limiter: RateLimiter,
        catalog: Catalog,
        *,
        on_checked: Callable[[str], None] | None = None,
    ) -> None:
        self._state = rules
        self._limiter = limiter
        self._catalog = catalog
        self._on_checked = on_checked  # the outcome of each check: ALLOWED or the reason

    async def check(self, request: risk_pb2.CheckOrderRequest) -> risk_pb2.CheckOrderResponse:
        """One check; raises INVALID_ARGUMENT / NOT_FOUND for a malformed request."""
        order = self._order(request)
        limits = self._state.limits(order.account_id)
        take: Take = await self._limiter.take(order.account_id, limits.max_orders_per_second)
        return self._decide(order, limits, take)

    async def check_many(
        self, requests: Iterable[risk_pb2.CheckOrderRequest]
    ) -> list[risk_pb2.CheckOrderResult]:
        """Each check answered on its own (its error, or its answer), in order; the
        rate-limit takes of all of them go to Redis together."""
        results: list[risk_pb2.CheckOrderResult | None] = []
        valid: list[tuple[int, OrderCheck, Limits]] = []
        for check in requests:
            try:
                order = self._order(check)
            except ExchangeError as error:
                results.append(risk_pb2.CheckOrderResult(status=error.to_status(DOMAIN)))
                continue
            valid.append((len(results), order, self._state.limits(order.account_id)))
            results.append(None)
        takes = await self._limiter.take_many(
            [(order.account_id, limits.max_orders_per_second) for _, order, limits in valid]
        )
        for (i, order, limits), take in zip(valid, takes, strict=True):
            results[i] = risk_pb2.CheckOrderResult(
                status=_OK, response=self._decide(order, limits, take)
            )
        return [r for r in results if r is not None]

    # Over ruff's complexity limit on purpose: a flat list of independent field checks, one
    # violation each.
    def _order(self, request: risk_pb2.CheckOrderRequest) -> OrderCheck:  # noqa: C901
        v = Violations()
        identifier(v, "account_id", request.account_id)
        identifier(v, "order_id", request.order_id, required=False)
        identifier(v, "client_order_id", request.client_order_id, required=False)
        market = self._catalog.market(request.market)
        if not request.market:
            v.add("market", "required", "REQUIRED")
        if request.action not in risk_pb2.OrderAction.values():
            v.add("action", f"unknown action {request.action}", "UNKNOWN_ENUM")
        if request.side not in (types_pb2.SIDE_BUY, types_pb2.SIDE_SELL):
            v.add("side", "BUY or SELL", "REQUIRED")
        kind = request.type
        if kind not in (*_LIMIT_TYPES, *_STOP_TYPES, types_pb2.ORDER_TYPE_MARKET):
            v.add("type", "an order type is required", "REQUIRED")
        if request.open_orders < 0:
            v.add("open_orders", "must not be negative", "NEGATIVE")
        if request.market_open_orders < 0:
            v.add("market_open_orders", "must not be negative", "NEGATIVE")
        v.raise_if_any("RISK_ORDER_INVALID")
        if market is None:
            raise NotFound(
                "RISK_MARKET_NOT_FOUND",
                f"unknown market {request.market!r}",
                violations=[FieldViolation("market", "unknown market", "NOT_FOUND")],
            )
        price_ticks = stop_ticks = lots = None
        budget: Decimal | None = None
        if kind in _LIMIT_TYPES:
            if not request.price:
                v.add("price", f"required for {types_pb2.OrderType.Name(kind)}", "REQUIRED")
            else:
                price_ticks = units(v, "price", request.price, market.ticks)
        elif request.price:
            v.add("price", "must be empty for market orders", "NOT_ALLOWED")
        if kind in _STOP_TYPES:
            if not request.stop_price:
                v.add("stop_price", "required for stop orders", "REQUIRED")
            else:
                stop_ticks = units(v, "stop_price", request.stop_price, market.ticks)
        elif request.stop_price:
            v.add("stop_price", "only for stop orders", "NOT_ALLOWED")
        market_buy = kind in _MARKET_TYPES and request.side == types_pb2.SIDE_BUY
        if request.quote_quantity:
            if not market_buy:
                v.add("quote_quantity", "only for market buys", "NOT_ALLOWED")
            elif request.quantity:
                v.add("quote_quantity", "give quantity or quote_quantity, not both", "CONFLICT")
            else:
                minor = units(v, "quote_quantity", request.quote_quantity, market.quote.to_minor)
                if minor is not None:
                    budget = EXACT.multiply(Decimal(minor), market.quote.unit)
        elif not request.quantity:
            v.add("quantity", "required", "REQUIRED")
        if request.quantity:
            lots = units(v, "quantity", request.quantity, market.lots)
        v.raise_if_any("RISK_ORDER_INVALID")
        return OrderCheck(
            account_id=request.account_id,
            market=market,
            amend=request.action == risk_pb2.ORDER_ACTION_AMEND,
            band_price_ticks=price_ticks if kind == types_pb2.ORDER_TYPE_LIMIT else None,
            price_ticks=price_ticks if price_ticks is not None else stop_ticks,
            lots=lots,
            quote_budget=budget,
            open_orders=request.open_orders,
            market_open_orders=request.market_open_orders,
        )

    def _decide(self, order: OrderCheck, limits: Limits, take: Take) -> risk_pb2.CheckOrderResponse:
        reference = self._state.price(order.market.symbol)
        response = risk_pb2.CheckOrderResponse(
            allowed=True,
            reference_price=order.market.price(reference) if reference is not None else "",
            rate_limit=risk_pb2.RateLimitUsage(
                limit=take.limit, used=take.used, remaining=take.remaining
            ),
        )
        if not take.allowed:
            denial: Denial | None = Denial(
                "RISK_RATE_LIMITED",
                f"more than {take.limit} order commands per second",
                code="RESOURCE_EXHAUSTED",
                metadata={"limit": str(take.limit), "interval": "1s"},
                retry_after_s=max(take.retry_after_s, 0.001),
            )
        else:
            denial = check_order(
                order, limits=limits, switches=self._state.switches, reference_ticks=reference
            )
        if denial is not None:
            response.allowed = False
            response.denial.CopyFrom(denial_status(denial))
        # Counted per order under CheckOrder, whichever RPC carried the check.
        if self._on_checked is not None:
            self._on_checked(denial.reason if denial else "ALLOWED")
        return response
