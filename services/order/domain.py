"""Orders as pure logic: validation, holds, amend checks and match events.

No I/O, no clock, no ids here: callers pass the time and the order id in.
Quantities and prices are exact `Decimal`s on the market's grid; ledger
amounts are integers in the asset's minor units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import (
    Catalog,
    FailedPrecondition,
    FieldViolation,
    Market,
    MoneyError,
    Violations,
)
from services.chassis.money import decimal_text, parse_decimal

__all__ = [
    "TERMINAL",
    "WORKING",
    "Execution",
    "NewOrder",
    "OrderRecord",
    "answered_order",
    "apply_event",
    "check_amend",
    "check_client_order_id",
    "fingerprint",
    "hold_for",
    "journaled_place",
    "place_command",
    "placed_record",
    "protection_price",
    "validate_place",
]

WORKING = frozenset(
    {
        t.ORDER_STATE_PENDING_NEW,
        t.ORDER_STATE_UNTRIGGERED,
        t.ORDER_STATE_OPEN,
        t.ORDER_STATE_PARTIALLY_FILLED,
    }
)
TERMINAL = frozenset(
    {t.ORDER_STATE_FILLED, t.ORDER_STATE_CANCELLED, t.ORDER_STATE_REJECTED, t.ORDER_STATE_EXPIRED}
)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SIDES = (t.SIDE_BUY, t.SIDE_SELL)
_TYPES = (
    t.ORDER_TYPE_LIMIT,
    t.ORDER_TYPE_MARKET,
    t.ORDER_TYPE_STOP_LIMIT,
    t.ORDER_TYPE_STOP_MARKET,
)
_MARKETS = (t.ORDER_TYPE_MARKET, t.ORDER_TYPE_STOP_MARKET)
_STOPS = (t.ORDER_TYPE_STOP_LIMIT, t.ORDER_TYPE_STOP_MARKET)
_ZERO = Decimal(0)
_MAX_MAGNITUDE = 15  # no price, quantity or notional of any market comes near 1e16
_TOO_LARGE = {
    "price": "ORDER_PRICE_TOO_LARGE",
    "stop_price": "ORDER_PRICE_TOO_LARGE",
    "quantity": "ORDER_QUANTITY_TOO_LARGE",
    "quote_quantity": "ORDER_QUOTE_QUANTITY_TOO_LARGE",
}


def fingerprint(request: order_pb2.PlaceOrderRequest) -> str:
    """What makes two places "the same body" (the account is the key's, not the body's)."""
    body = order_pb2.PlaceOrderRequest()
    body.CopyFrom(request)
    body.account_id = ""
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def check_client_order_id(value: str, field_name: str = "client_order_id") -> FieldViolation | None:
    if not _CLIENT_ID.match(value):
        return FieldViolation(
            field_name, "1-64 characters of [A-Za-z0-9._:-]", "ORDER_INVALID_CLIENT_ORDER_ID"
        )
    return None


class _Violations(Violations):
    def decimal(
        self, name: str, text: str, unit: Decimal, reason: str, grid: str
    ) -> Decimal | None:
        """A positive decimal on the grid `unit`, or None (with a violation if malformed)."""
        if not text:
            return None
        try:
            value = parse_decimal(text)
        except MoneyError:
            self.add(name, f"{text[:40]!r} is not a plain decimal number", reason)
            return None
        if value <= 0:
            self.add(name, "must be positive", reason)
            return None
        if value.adjusted() > _MAX_MAGNITUDE:
            self.add(name, f"larger than 1e{_MAX_MAGNITUDE + 1}", _TOO_LARGE.get(name, reason))
            return None
        if value % unit:
            self.add(name, f"must be a multiple of {unit}", grid)
            return None
        return value


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A place request that passed validation."""

    client_order_id: str
    market: Market
    side: int
    type: int
    time_in_force: int
    self_trade_prevention: int
    price: Decimal | None
    stop_price: Decimal | None
    quantity: Decimal | None
    quote_quantity: Decimal | None
    post_only: bool
    expire_time: datetime | None
    fingerprint: str

    @property
    def is_market(self) -> bool:
        return self.type in _MARKETS


# Over ruff's complexity limit on purpose: a flat list of independent field checks, one violation
# each.
def validate_place(  # noqa: C901
    request: order_pb2.PlaceOrderRequest, catalog: Catalog, now: datetime, prefix: str = ""
) -> NewOrder:
    """Every field checked; InvalidArgument with all field violations if any is wrong."""
    v = _Violations(prefix)
    bad_id = check_client_order_id(request.client_order_id, f"{prefix}client_order_id")
    if bad_id:
        v.items.append(bad_id)
    market = catalog.market(request.market)
    if market is None:
        v.add("market", f"no market {request.market[:40]!r}", "ORDER_UNKNOWN_MARKET")
    if request.side not in _SIDES:
        v.add("side", "BUY or SELL is required", "ORDER_INVALID_SIDE")
    if request.type not in _TYPES:
        v.add("type", "an order type is required", "ORDER_INVALID_TYPE")
    tif = request.time_in_force
    is_market = request.type in _MARKETS
    if tif == t.TIME_IN_FORCE_UNSPECIFIED:
        tif = t.TIME_IN_FORCE_IOC if is_market else t.TIME_IN_FORCE_GTC
    elif tif not in (
        t.TIME_IN_FORCE_GTC,
        t.TIME_IN_FORCE_IOC,
        t.TIME_IN_FORCE_FOK,
        t.TIME_IN_FORCE_GTD,
    ):
        v.add("time_in_force", "unknown time in force", "ORDER_INVALID_TIME_IN_FORCE")
    elif is_market and tif not in (t.TIME_IN_FORCE_IOC, t.TIME_IN_FORCE_FOK):
        v.add("time_in_force", "market orders are IOC or FOK", "ORDER_INVALID_TIME_IN_FORCE")
    stp = request.self_trade_prevention or t.SELF_TRADE_PREVENTION_CANCEL_NEWEST
    if stp not in (1, 2, 3, 4):
        v.add("self_trade_prevention", "unknown mode", "ORDER_INVALID_SELF_TRADE_PREVENTION")
    expire: datetime | None = None
    if tif == t.TIME_IN_FORCE_GTD:
        if not request.HasField("expire_time"):
            v.add("expire_time", "required for GTD", "ORDER_INVALID_EXPIRE_TIME")
        else:
            expire = request.expire_time.ToDatetime(tzinfo=UTC)
            if expire <= now:
                v.add("expire_time", "must be in the future", "ORDER_INVALID_EXPIRE_TIME")
    elif request.HasField("expire_time"):
        v.add("expire_time", "only for GTD orders", "ORDER_INVALID_EXPIRE_TIME")
    if request.post_only and (
        request.type != t.ORDER_TYPE_LIMIT or tif not in (t.TIME_IN_FORCE_GTC, t.TIME_IN_FORCE_GTD)
    ):
        v.add("post_only", "only for LIMIT orders with GTC or GTD", "ORDER_INVALID_POST_ONLY")

    price = stop = qty = budget = None
    if market is not None:
        price = v.decimal(
            "price", request.price, market.tick_size, "ORDER_INVALID_PRICE", "ORDER_PRICE_OFF_TICK"
        )
        stop = v.decimal(
            "stop_price",
            request.stop_price,
            market.tick_size,
            "ORDER_INVALID_STOP_PRICE",
            "ORDER_PRICE_OFF_TICK",
        )
        qty = v.decimal(
            "quantity",
            request.quantity,
            market.lot_size,
            "ORDER_INVALID_QUANTITY",
            "ORDER_QUANTITY_OFF_LOT",
        )
        budget = v.decimal(
            "quote_quantity",
            request.quote_quantity,
            market.notional_unit,
            "ORDER_INVALID_QUOTE_QUANTITY",
            "ORDER_QUOTE_QUANTITY_OFF_GRID",
        )
        if request.type in (t.ORDER_TYPE_LIMIT, t.ORDER_TYPE_STOP_LIMIT):
            if not request.price:
                v.add("price", "required for limit orders", "ORDER_INVALID_PRICE")
        elif is_market and request.price:
            v.add("price", "must be empty for market orders", "ORDER_INVALID_PRICE")
        if request.type in _STOPS and not request.stop_price:
            v.add("stop_price", "required for stop orders", "ORDER_INVALID_STOP_PRICE")
        elif request.type not in _STOPS and request.stop_price:
            v.add("stop_price", "only for stop orders", "ORDER_INVALID_STOP_PRICE")
        if request.quote_quantity:
            if not (is_market and request.side == t.SIDE_BUY):
                v.add("quote_quantity", "only for market buys", "ORDER_INVALID_QUOTE_QUANTITY")
            elif request.quantity:
                v.add(
                    "quote_quantity",
                    "give quantity or quote_quantity, not both",
                    "ORDER_INVALID_QUOTE_QUANTITY",
                )
        elif not request.quantity:
            v.add("quantity", "required", "ORDER_INVALID_QUANTITY")
        if qty is not None:
            if qty < market.min_quantity:
                v.add(
                    "quantity",
                    f"below the minimum {market.min_quantity}",
                    "ORDER_QUANTITY_TOO_SMALL",
                )
            elif qty > market.max_quantity:
                v.add(
                    "quantity",
                    f"above the maximum {market.max_quantity}",
                    "ORDER_QUANTITY_TOO_LARGE",
                )
            elif price is not None and price * qty < market.min_notional:
                v.add(
                    "quantity",
                    f"price x quantity is below the minimum notional {market.min_notional}",
                    "ORDER_NOTIONAL_TOO_SMALL",
                )
        if budget is not None and budget < market.min_notional:
            v.add(
                "quote_quantity",
                f"below the minimum notional {market.min_notional}",
                "ORDER_NOTIONAL_TOO_SMALL",
            )
    v.raise_if_any()  # under the first violation's reason
    assert market is not None
    return NewOrder(
        client_order_id=request.client_order_id,
        market=market,
        side=request.side,
        type=request.type,
        time_in_force=tif,
        self_trade_prevention=stp,
        price=price,
        stop_price=stop,
        quantity=qty,
        quote_quantity=budget,
        post_only=request.post_only,
        expire_time=expire,
        fingerprint=fingerprint(request),
    )


def protection_price(market: Market, side: int, reference: Decimal, bound: Decimal) -> Decimal:
    """The worst price a market order may trade at: reference +- bound, on the tick grid."""
    tick = market.tick_size
    if side == t.SIDE_BUY:
        ticks = (reference * (1 + bound) / tick).to_integral_value(rounding=ROUND_FLOOR)
    else:
        ticks = (reference * (1 - bound) / tick).to_integral_value(rounding=ROUND_CEILING)
    return max(ticks, Decimal(1)) * tick


def _minor(amount: Decimal, unit: Decimal) -> int:
    return int((amount / unit).to_integral_value(rounding=ROUND_CEILING))


def hold_for(order: NewOrder, protection: Decimal | None) -> tuple[str, int]:
    """(asset, minor units) of the most the order can spend.

    Buys spend quote: price x quantity (exact on the grid), a market buy its
    budget or protection price x quantity. Sells spend their base quantity.
    Fees are charged in the asset the party receives, so no fee is held.
    """
    m = order.market
    if order.side == t.SIDE_SELL:
        assert order.quantity is not None
        return m.base.symbol, _minor(order.quantity, m.base.unit)
    if order.quote_quantity is not None:
        return m.quote.symbol, _minor(order.quote_quantity, m.quote.unit)
    price = protection if order.is_market else order.price
    assert price is not None and order.quantity is not None
    return m.quote.symbol, _minor(price * order.quantity, m.quote.unit)


@dataclass(slots=True)
class OrderRecord:
    """One order as stored (mutable: the consumer applies events to it)."""

    order_id: str
    account_id: str
    client_order_id: str
    market: str
    side: int
    type: int
    time_in_force: int
    self_trade_prevention: int
    price: Decimal | None
    stop_price: Decimal | None
    quantity: Decimal | None
    quote_quantity: Decimal | None
    post_only: bool
    expire_time: datetime | None
    protection_price: Decimal | None
    fingerprint: str
    hold_asset: str
    hold_amount: int
    phase: str
    state: int
    create_time: datetime
    update_time: datetime
    filled_quantity: Decimal = _ZERO
    filled_quote_quantity: Decimal = _ZERO
    cumulative_fee: Decimal = _ZERO
    fee_asset: str = ""
    remaining_quantity: Decimal | None = None
    reject_reason: str = ""
    reject_code: int = 0
    reject_message: str = ""
    reject_domain: str = ""
    cancel_reason: int = 0
    trigger_time: datetime | None = None
    version: int = 1
    last_seq: int = 0
    session_id: str = ""

    @property
    def working(self) -> bool:
        return self.state in WORKING

    def copy(self) -> OrderRecord:
        return dataclasses.replace(self)


def place_command(
    order: NewOrder,
    *,
    order_id: str,
    account_id: str,
    protection: Decimal | None,
    session_id: str,
    fees: tuple[str, str],
    limits: tuple[int, int] = (0, 0),
) -> match_pb2.Command:
    """The writer's command for a validated order (ADR 0013): it carries the hold the
    order needs, the open-order limits (account, market) the writer enforces, and
    all a read model needs to build the order from the journal."""
    hold_asset, hold_amount = hold_for(order, protection)
    place = match_pb2.PlaceCommand(
        order_id=order_id,
        client_order_id=order.client_order_id,
        account_id=account_id,
        side=order.side,  # type: ignore[arg-type]
        type=order.type,  # type: ignore[arg-type]
        time_in_force=order.time_in_force,  # type: ignore[arg-type]
        self_trade_prevention=order.self_trade_prevention,  # type: ignore[arg-type]
        price=decimal_text(protection if protection is not None else order.price),
        stop_price=decimal_text(order.stop_price),
        quantity=decimal_text(order.quantity),
        quote_quantity=decimal_text(order.quote_quantity),
        post_only=order.post_only,
        maker_fee_rate=fees[0],
        taker_fee_rate=fees[1],
        hold_asset=hold_asset,
        hold_amount=order.market.asset(hold_asset).format(hold_amount),
        session_id=session_id,
        request_fingerprint=order.fingerprint,
        max_open_orders=limits[0],
        max_market_open_orders=limits[1],
    )
    if order.expire_time is not None:
        place.expire_time.FromDatetime(order.expire_time)
    return match_pb2.Command(
        command_id=f"place:{order_id}", market=order.market.symbol, place=place
    )


def placed_record(market: Market, place: match_pb2.PlaceCommand, when: datetime) -> OrderRecord:
    """The order a journaled place command describes, as of `when`, before its events."""
    is_market = place.type in _MARKETS
    price = _optional(place.price)
    return OrderRecord(
        order_id=place.order_id,
        account_id=place.account_id,
        client_order_id=place.client_order_id,
        market=market.symbol,
        side=place.side,
        type=place.type,
        time_in_force=place.time_in_force,
        self_trade_prevention=place.self_trade_prevention,
        price=None if is_market else price,
        stop_price=_optional(place.stop_price),
        quantity=_optional(place.quantity),
        quote_quantity=_optional(place.quote_quantity),
        post_only=place.post_only,
        expire_time=(
            place.expire_time.ToDatetime(tzinfo=UTC) if place.HasField("expire_time") else None
        ),
        protection_price=price if is_market else None,
        fingerprint=place.request_fingerprint,
        hold_asset=place.hold_asset,
        hold_amount=(
            market.asset(place.hold_asset).to_minor(place.hold_amount) if place.hold_asset else 0
        ),
        phase="placed",
        state=t.ORDER_STATE_PENDING_NEW,
        create_time=when,
        update_time=when,
        remaining_quantity=_optional(place.quantity),
        session_id=place.session_id,
    )


def answered_order(market: Market, events: Sequence[match_pb2.MatchEvent]) -> OrderRecord | None:
    """The order a place command's events describe (built from the journaled place
    that its accepted or rejected event carries), with those events applied."""
    order = None
    for event in events:
        if order is None and (place := journaled_place(event)) is not None:
            order = placed_record(market, place, event.event_time.ToDatetime(tzinfo=UTC))
        if order is not None:
            apply_event(order, event)
    return order


def journaled_place(event: match_pb2.MatchEvent) -> match_pb2.PlaceCommand | None:
    """The place command an accepted event, or a refused place's event, carries."""
    kind = event.WhichOneof("kind")
    if kind in ("accepted", "rejected") and getattr(event, kind).HasField("place"):
        return getattr(event, kind).place  # type: ignore[no-any-return]
    return None


def check_amend(
    order: OrderRecord, market: Market, price: Decimal | None, quantity: Decimal | None
) -> None:
    """Refuse an amend the order's hold cannot back, or that match would refuse.

    The hold (`hold:<order_id>`) was sized when the order was placed and cannot
    grow, so an amend may only need as much as what is left of it: a buy's
    new price x new unfilled quantity, a sell's new unfilled quantity. More
    than that is FAILED_PRECONDITION ORDER_AMEND_EXCEEDS_HOLD (cancel and place
    a new order instead: an increase loses queue priority either way).
    """
    if order.state == t.ORDER_STATE_UNTRIGGERED:
        raise FailedPrecondition(
            "ORDER_NOT_AMENDABLE", "untriggered stop orders cannot be amended: cancel and place"
        )
    if order.type not in (t.ORDER_TYPE_LIMIT, t.ORDER_TYPE_STOP_LIMIT) or order.price is None:
        raise FailedPrecondition("ORDER_NOT_AMENDABLE", "only limit orders can be amended")
    new_qty = quantity if quantity is not None else order.quantity
    new_price = price if price is not None else order.price
    assert new_qty is not None and order.quantity is not None
    if new_qty <= order.filled_quantity:
        raise FailedPrecondition(
            "ORDER_AMEND_QUANTITY_TOO_LOW",
            f"the new quantity must be above what has filled ({order.filled_quantity})",
            metadata={"filled_quantity": decimal_text(order.filled_quantity)},
        )
    unfilled = new_qty - order.filled_quantity
    if order.side == t.SIDE_BUY:
        left = order.hold_amount - _minor(order.filled_quote_quantity, market.quote.unit)
        need = _minor(new_price * unfilled, market.quote.unit)
    else:
        left = order.hold_amount - _minor(order.filled_quantity, market.base.unit)
        need = _minor(unfilled, market.base.unit)
    if need > left:
        raise FailedPrecondition(
            "ORDER_AMEND_EXCEEDS_HOLD",
            "the amend needs more funds than the order holds: cancel and place a new order",
            metadata={
                "held": decimal_text(Decimal(left) * _unit(order, market)),
                "needed": decimal_text(Decimal(need) * _unit(order, market)),
            },
        )


def _unit(order: OrderRecord, market: Market) -> Decimal:
    return market.quote.unit if order.side == t.SIDE_BUY else market.base.unit


# ---- match events ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Execution:
    """One change to one order, from one match event: an execution report's body."""

    execution_type: int
    order: OrderRecord  # the order after the event (a copy)
    match_seq: int
    event_time: datetime
    last_price: str = ""
    last_quantity: str = ""
    last_quote_quantity: str = ""
    fee: str = ""
    fee_asset: str = ""
    liquidity: int = 0
    trade_id: str = ""
    cancel_reason: int = 0
    reject_reason: str = ""
    fill: dict[str, object] | None = field(default=None)

    @property
    def execution_id(self) -> str:
        return f"{self.order.market}:{self.match_seq}:{self.order.order_id}"


def _dec(text: str) -> Decimal:
    return parse_decimal(text) if text else _ZERO


def _optional(text: str) -> Decimal | None:
    return parse_decimal(text) if text else None


def apply_event(order: OrderRecord, event: match_pb2.MatchEvent) -> Execution | None:
    """Apply one match event to the order it concerns; None if it changes nothing.

    Idempotent: an event at or below the order's last_seq is ignored.
    """
    if event.seq <= order.last_seq:
        return None
    kind = event.WhichOneof("kind")
    when = event.event_time.ToDatetime(tzinfo=UTC)
    extra: dict[str, object] = {}
    if kind == "accepted":
        a = event.accepted
        if a.untriggered:
            order.state, etype = t.ORDER_STATE_UNTRIGGERED, 1
        else:
            order.state, etype = t.ORDER_STATE_OPEN, 1
        if a.quantity:
            order.remaining_quantity = _dec(a.quantity)
    elif kind == "rejected":
        if event.command_id != f"place:{order.order_id}":
            return None  # a refused cancel or amend leaves the order as it was
        r = event.rejected
        order.state, etype = t.ORDER_STATE_REJECTED, 5
        order.reject_reason, order.reject_message = r.reason, r.message
        order.reject_code, order.reject_domain = 9, "match"  # FAILED_PRECONDITION
        order.remaining_quantity = _ZERO
        extra["reject_reason"] = r.reason
    elif kind == "trade":
        tr = event.trade
        maker = tr.maker_order_id == order.order_id
        qty, quote = _dec(tr.quantity), _dec(tr.quote_quantity)
        fee = tr.maker_fee if maker else tr.taker_fee
        fee_asset = tr.maker_fee_asset if maker else tr.taker_fee_asset
        remaining = tr.maker_remaining_quantity if maker else tr.taker_remaining_quantity
        order.filled_quantity += qty
        order.filled_quote_quantity += quote
        order.cumulative_fee += _dec(fee)
        order.fee_asset = fee_asset
        order.remaining_quantity = _dec(remaining)
        done = order.remaining_quantity == 0
        order.state = t.ORDER_STATE_FILLED if done else t.ORDER_STATE_PARTIALLY_FILLED
        etype = 2
        liquidity = t.LIQUIDITY_MAKER if maker else t.LIQUIDITY_TAKER
        extra.update(
            last_price=tr.price,
            last_quantity=tr.quantity,
            last_quote_quantity=tr.quote_quantity,
            fee=fee,
            fee_asset=fee_asset,
            liquidity=liquidity,
            trade_id=tr.trade_id,
        )
        extra["fill"] = {
            "trade_id": tr.trade_id,
            "price": _dec(tr.price),
            "quantity": qty,
            "quote_quantity": quote,
            "fee": _dec(fee),
            "fee_asset": fee_asset,
            "liquidity": liquidity,
        }
    elif kind == "cancelled":
        c = event.cancelled
        order.remaining_quantity = _dec(c.remaining_quantity)
        etype = 3
        if order.remaining_quantity == 0:
            expired = c.reason == t.CANCEL_REASON_EXPIRED
            order.state = t.ORDER_STATE_EXPIRED if expired else t.ORDER_STATE_CANCELLED
            etype = 6 if expired else 3
        order.cancel_reason = c.reason
        extra["cancel_reason"] = c.reason
    elif kind == "amended":
        am = event.amended
        order.price = _dec(am.price)
        order.quantity = _dec(am.quantity)
        order.remaining_quantity = _dec(am.remaining_quantity)
        etype = 4
    elif kind == "triggered":
        order.state = (
            t.ORDER_STATE_PARTIALLY_FILLED if order.filled_quantity else t.ORDER_STATE_OPEN
        )
        order.trigger_time = when
        etype = 7
    else:
        return None
    order.last_seq = event.seq
    order.version += 1
    order.update_time = when
    fill = extra.pop("fill", None)
    return Execution(
        execution_type=etype,
        order=order.copy(),
        match_seq=event.seq,
        event_time=when,
        fill=fill,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )


def event_order_ids(event: match_pb2.MatchEvent) -> tuple[str, ...]:
    """The orders an event concerns."""
    kind = event.WhichOneof("kind")
    if kind == "trade":
        return (event.trade.maker_order_id, event.trade.taker_order_id)
    if kind in ("accepted", "rejected", "cancelled", "amended", "triggered"):
        return (getattr(event, kind).order_id,)
    return ()
