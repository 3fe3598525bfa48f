"""The matching engine's pure domain: specs, commands, events and the book contract.

Nothing here does I/O, reads a clock, makes ids or draws random numbers: a book is
a value machine, ``book.submit(command) -> Result(events)``, and the same commands
applied to the same state give the same events, byte for byte.

Units
-----
* Prices are integers in **ticks** and quantities integers in **lots** of the
  market. One tick is ``MarketSpec.tick_size`` quote minor units per lot-price
  unit and one lot is ``MarketSpec.lot_size`` base minor units; the service
  converts the wire's decimal strings at the edge.
* Notional (``min_notional``, ``quote_budget``) is in **tick-lots**, i.e. the sum
  of ``price_ticks * qty_lots``. The service converts a quote amount to tick-lots
  with the market's scale.

Rules (both implementations follow them; the contract tests pin them down)
---------------------------------------------------------------------------
Every command runs in these steps:

1. **Expiry.** GTD orders (resting or pending stop) whose ``expire_time <= ts``
   are cancelled with reason ``EXPIRED``, ordered by ``(expire_time,
   accepted_seq)``. This happens even if the command itself is then rejected.
2. **The command.** Validation failures give one ``Rejected`` event and leave the
   book unchanged. Stateless checks run first (``validate_place`` /
   ``validate_amend``, in the order documented there), then the order-id checks,
   then post-only.
3. **Stops.** After anything that may have traded, every pending stop whose
   trigger holds against the last trade price (buy: ``last >= stop``; sell:
   ``last <= stop``) is taken out of the pending set, the newly triggered ones
   sorted by ``accepted_seq`` and appended to a FIFO queue; each in turn emits
   ``Triggered`` and is executed as a limit (STOP_LIMIT) or market (STOP_MARKET)
   order, after which the trigger is checked again (cascades). A stop whose
   trigger already holds when it is placed is triggered in the same command.
4. **L2.** One ``LevelChanged`` per price level whose total quantity differs from
   before the command, bids before asks, each side best price first.

Matching: the taker meets the best resting order on the other side (price, then
priority) while it has quantity, the maker's price is within its bound (limit or
protection price) and, with a quote budget, ``budget_left // price >= 1``
(otherwise matching stops). Trades are at the maker's price; ``trade_id`` is the
trade event's ``seq``. Self-trade prevention applies when the maker has the
taker's account; the taker's mode decides:

* ``CANCEL_NEWEST``: cancel the taker's remainder, stop.
* ``CANCEL_OLDEST``: cancel the maker, go on.
* ``CANCEL_BOTH``: cancel the maker, then the taker's remainder, stop.
* ``DECREMENT_AND_CANCEL``: both lose ``min(taker, maker)`` open quantity with no
  trade; each reduction is a ``Cancelled(reason=STP, qty=d, leaves=...)`` event
  (maker first), and an order at zero is gone (``leaves == 0``).

After matching the remainder of a MARKET/STOP_MARKET order is cancelled with
``MARKET_UNFILLED``, of an IOC limit with ``IOC_REMAINDER``; a GTC/GTD limit rests
with priority = the ``seq`` of the event that put it in the queue (``Accepted``,
``Triggered`` or ``Amended``). FOK is checked before any trade by walking the
book as matching would (own orders count as skipped under ``CANCEL_OLDEST``
and as a stop otherwise); unfillable gives ``Cancelled(FOK_UNFILLED)`` after
``Accepted``. A post-only order whose price would cross the best opposite price
is rejected (``MATCH_POST_ONLY_WOULD_TAKE``), whoever owns that order.

Order quantities: ``qty`` is the order's current total, ``filled + leaves``;
STP decrements lower both ``qty`` and ``leaves``.

Amend (resting orders only; pending stops answer ``MATCH_ORDER_NOT_AMENDABLE``):
``AmendOrder.qty`` is the new **total** quantity and must exceed what is filled;
``price``/``qty`` left ``None`` stay as they are. Same price and a total not
above the current one keeps queue priority (the open quantity shrinks in place).
A higher total at the same price moves the order to the back of its level. A
new price takes the order out and re-enters it like a new limit order with the
same id (it may trade as taker, then rests); a post-only order whose new price
would cross is rejected and left as it was. An amend that changes nothing is
answered with ``Amended(priority_kept=True)``.

Cancel/amend with an unknown id, or an id of another account, answer
``MATCH_UNKNOWN_ORDER``. Order ids must be unique among live orders (resting or
pending stops); the order service owns uniqueness over time. Mass cancel cancels
the account's resting orders and pending stops (optionally one side) in
``accepted_seq`` order; with nothing to cancel it yields no events.

Status marks (the market's status is the engine's, not the book's): ``MarkStatus``
emits one ``StatusMarked`` event (after the expiry of rule 1), so the status
change has its place in the market's sequence; with ``cancel_all`` (a delisting)
every live order, resting or pending, is then cancelled with reason ``CLOSED``
in ``accepted_seq`` order.

Every event carries ``seq``: the market's sequence number, +1 per event, no gaps.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeAlias, TypeVar, cast

_T = TypeVar("_T")

__all__ = [
    "Accepted",
    "AmendOrder",
    "Amended",
    "BookState",
    "CancelOrder",
    "CancelReason",
    "Cancelled",
    "Command",
    "Event",
    "Expire",
    "LevelChanged",
    "MarkStatus",
    "MarketSpec",
    "MassCancel",
    "OrderBook",
    "OrderType",
    "OrderView",
    "PlaceOrder",
    "RejectReason",
    "Rejected",
    "Result",
    "Side",
    "StatusMarked",
    "StpMode",
    "TimeInForce",
    "Trade",
    "Triggered",
    "book_document",
    "decode_state",
    "encode_state",
    "state_document",
    "validate_amend",
    "validate_place",
]


# --------------------------------------------------------------------------- enums


class Side(enum.Enum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(enum.Enum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"
    STOP_LIMIT = "STOP_LIMIT"
    STOP_MARKET = "STOP_MARKET"


class TimeInForce(enum.Enum):
    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"
    GTD = "GTD"


class StpMode(enum.Enum):
    CANCEL_NEWEST = "CANCEL_NEWEST"
    CANCEL_OLDEST = "CANCEL_OLDEST"
    CANCEL_BOTH = "CANCEL_BOTH"
    DECREMENT_AND_CANCEL = "DECREMENT_AND_CANCEL"


class CancelReason(enum.Enum):
    USER = "USER"
    IOC_REMAINDER = "IOC_REMAINDER"
    FOK_UNFILLED = "FOK_UNFILLED"
    MARKET_UNFILLED = "MARKET_UNFILLED"
    STP = "STP"
    EXPIRED = "EXPIRED"
    MASS_CANCEL = "MASS_CANCEL"
    CLOSED = "CLOSED"  # the market was delisted


class RejectReason(enum.StrEnum):
    """Why a command was refused (the value is the ErrorInfo reason)."""

    INVALID_QUANTITY = "MATCH_INVALID_QUANTITY"
    INVALID_PRICE = "MATCH_INVALID_PRICE"
    INVALID_STOP_PRICE = "MATCH_INVALID_STOP_PRICE"
    INVALID_QUOTE_BUDGET = "MATCH_INVALID_QUOTE_BUDGET"
    MARKET_ORDER_UNBOUNDED = "MATCH_MARKET_ORDER_UNBOUNDED"
    INVALID_TIME_IN_FORCE = "MATCH_INVALID_TIME_IN_FORCE"
    INVALID_EXPIRE_TIME = "MATCH_INVALID_EXPIRE_TIME"
    INVALID_POST_ONLY = "MATCH_INVALID_POST_ONLY"
    QUANTITY_BELOW_MIN = "MATCH_QUANTITY_BELOW_MIN"
    QUANTITY_ABOVE_MAX = "MATCH_QUANTITY_ABOVE_MAX"
    NOTIONAL_BELOW_MIN = "MATCH_NOTIONAL_BELOW_MIN"
    DUPLICATE_ORDER_ID = "MATCH_DUPLICATE_ORDER_ID"
    POST_ONLY_WOULD_TAKE = "MATCH_POST_ONLY_WOULD_TAKE"
    UNKNOWN_ORDER = "MATCH_UNKNOWN_ORDER"
    INVALID_AMEND = "MATCH_INVALID_AMEND"
    ORDER_NOT_AMENDABLE = "MATCH_ORDER_NOT_AMENDABLE"
    AMEND_QTY_TOO_LOW = "MATCH_AMEND_QTY_TOO_LOW"


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True, slots=True)
class MarketSpec:
    """A market. ``tick_size``/``lot_size`` are minor units of quote/base per tick/lot;
    ``min_qty``/``max_qty`` are lots; ``min_notional`` is tick-lots (price * qty)."""

    symbol: str
    tick_size: int
    lot_size: int
    min_qty: int = 1
    max_qty: int = 1_000_000_000_000
    min_notional: int = 0

    def __post_init__(self) -> None:
        if not self.symbol:
            raise ValueError("symbol must not be empty")
        if self.tick_size <= 0 or self.lot_size <= 0:
            raise ValueError("tick_size and lot_size must be positive")
        if not 1 <= self.min_qty <= self.max_qty:
            raise ValueError("need 1 <= min_qty <= max_qty")
        if self.min_notional < 0:
            raise ValueError("min_notional must not be negative")


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    """A new order. ``price`` is the limit price (LIMIT, STOP_LIMIT) or the
    protection price, the worst acceptable (MARKET, STOP_MARKET); market orders need
    a protection price or a ``quote_budget`` (tick-lots), and IOC or FOK."""

    ts: int
    order_id: int
    account_id: int
    side: Side
    qty: int
    price: int | None = None
    order_type: OrderType = OrderType.LIMIT
    tif: TimeInForce = TimeInForce.GTC
    stop_price: int | None = None
    expire_time: int | None = None
    post_only: bool = False
    stp: StpMode = StpMode.CANCEL_NEWEST
    quote_budget: int | None = None


@dataclass(frozen=True, slots=True)
class CancelOrder:
    ts: int
    order_id: int
    account_id: int


@dataclass(frozen=True, slots=True)
class AmendOrder:
    """Change a resting order's price and/or total quantity (``None``: unchanged)."""

    ts: int
    order_id: int
    account_id: int
    price: int | None = None
    qty: int | None = None


@dataclass(frozen=True, slots=True)
class MassCancel:
    """Cancel every live order of an account in this market, optionally one side."""

    ts: int
    account_id: int
    side: Side | None = None


@dataclass(frozen=True, slots=True)
class Expire:
    """Only advance the clock to ``ts``: what is due expires (rule 1), nothing else."""

    ts: int


@dataclass(frozen=True, slots=True)
class MarkStatus:
    """The market's status changed: a ``StatusMarked`` event; ``cancel_all`` (a
    delisting) then cancels every live order (reason ``CLOSED``)."""

    ts: int
    cancel_all: bool = False


Command: TypeAlias = PlaceOrder | CancelOrder | AmendOrder | MassCancel | Expire | MarkStatus


# --------------------------------------------------------------------------- events


def _fast_init(cls: type[_T]) -> type[_T]:
    """Give a frozen slotted dataclass a positional-friendly ``__init__`` that sets
    slots through their descriptors: same semantics, about twice as fast as the
    generated one (which calls ``object.__setattr__`` per field). Events are made
    on the hot path, several per command."""
    names = [f.name for f in fields(cast(Any, cls))]
    setters = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    body = "\n".join(f"        _set_{n}(self, {n})" for n in names)
    src = (
        f"def _make({', '.join(setters)}):\n"
        f"    def __init__(self, {', '.join(names)}):\n{body}\n"
        f"    return __init__\n"
    )
    namespace: dict[str, Any] = {}
    exec(src, namespace)
    init = namespace["_make"](**setters)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@_fast_init
@dataclass(frozen=True, slots=True)
class Accepted:
    seq: int
    ts: int
    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    price: int | None
    stop_price: int | None
    qty: int


@_fast_init
@dataclass(frozen=True, slots=True)
class Rejected:
    seq: int
    ts: int
    order_id: int
    account_id: int
    reason: RejectReason


@_fast_init
@dataclass(frozen=True, slots=True)
class Trade:
    seq: int
    ts: int
    trade_id: int
    price: int
    qty: int
    aggressor: Side
    maker_order_id: int
    taker_order_id: int
    maker_account_id: int
    taker_account_id: int
    maker_leaves: int
    taker_leaves: int


@_fast_init
@dataclass(frozen=True, slots=True)
class Cancelled:
    """``qty`` left the order now; ``leaves`` is what stays open (0: the order is done)."""

    seq: int
    ts: int
    order_id: int
    account_id: int
    reason: CancelReason
    qty: int
    leaves: int


@_fast_init
@dataclass(frozen=True, slots=True)
class Amended:
    seq: int
    ts: int
    order_id: int
    account_id: int
    price: int
    qty: int
    leaves: int
    priority_kept: bool


@_fast_init
@dataclass(frozen=True, slots=True)
class Triggered:
    seq: int
    ts: int
    order_id: int
    account_id: int
    stop_price: int
    last_price: int


@_fast_init
@dataclass(frozen=True, slots=True)
class LevelChanged:
    """The new total open quantity at a price level (0: the level is gone)."""

    seq: int
    ts: int
    side: Side
    price: int
    qty: int


@_fast_init
@dataclass(frozen=True, slots=True)
class StatusMarked:
    """The place of a status change in the market's sequence (the engine says which)."""

    seq: int
    ts: int


Event: TypeAlias = (
    Accepted | Rejected | Trade | Cancelled | Amended | Triggered | LevelChanged | StatusMarked
)


@_fast_init
@dataclass(frozen=True, slots=True)
class Result:
    events: list[Event]

    @property
    def rejected(self) -> RejectReason | None:
        """The reason if the command itself was rejected, else None."""
        for event in self.events:
            if type(event) is Rejected:
                return event.reason
        return None


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class OrderView:
    """One live order as the book holds it (L3 entries, snapshots)."""

    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    price: int | None
    stop_price: int | None
    qty: int
    leaves: int
    tif: TimeInForce
    expire_time: int | None
    post_only: bool
    stp: StpMode
    quote_budget: int | None
    accepted_seq: int
    priority: int

    @property
    def filled(self) -> int:
        return self.qty - self.leaves


@dataclass(frozen=True, slots=True)
class BookState:
    """The full state of a book. ``resting`` is in priority order (bids best first,
    then asks best first, FIFO within a level); ``stops`` by ``accepted_seq``."""

    spec: MarketSpec
    seq: int
    last_price: int | None
    resting: tuple[OrderView, ...]
    stops: tuple[OrderView, ...]


_SNAPSHOT_VERSION = 1


def _encode_order(o: OrderView) -> list[Any]:
    return [
        o.order_id,
        o.account_id,
        o.side.value,
        o.order_type.value,
        o.price,
        o.stop_price,
        o.qty,
        o.leaves,
        o.tif.value,
        o.expire_time,
        o.post_only,
        o.stp.value,
        o.quote_budget,
        o.accepted_seq,
        o.priority,
    ]


def _decode_order(row: list[Any]) -> OrderView:
    return OrderView(
        order_id=int(row[0]),
        account_id=int(row[1]),
        side=Side(row[2]),
        order_type=OrderType(row[3]),
        price=None if row[4] is None else int(row[4]),
        stop_price=None if row[5] is None else int(row[5]),
        qty=int(row[6]),
        leaves=int(row[7]),
        tif=TimeInForce(row[8]),
        expire_time=None if row[9] is None else int(row[9]),
        post_only=bool(row[10]),
        stp=StpMode(row[11]),
        quote_budget=None if row[12] is None else int(row[12]),
        accepted_seq=int(row[13]),
        priority=int(row[14]),
    )


def encode_state(state: BookState) -> bytes:
    """The canonical serialization (compact JSON, sorted keys): equal states give
    equal bytes whichever implementation produced them."""
    return json.dumps(state_document(state), sort_keys=True, separators=(",", ":")).encode()


def state_document(state: BookState) -> dict[str, Any]:
    """The state as the JSON document `encode_state` writes (for embedding in a larger
    document without a serialize-and-parse round trip)."""
    return book_document(
        state.spec,
        state.seq,
        state.last_price,
        [_encode_order(o) for o in state.resting],
        [_encode_order(o) for o in state.stops],
    )


def book_document(
    spec: MarketSpec,
    seq: int,
    last_price: int | None,
    resting: list[list[Any]],
    stops: list[list[Any]],
) -> dict[str, Any]:
    """A book's snapshot document from its orders already encoded as rows (the
    field order of `OrderView`, enums by value)."""
    return {
        "version": _SNAPSHOT_VERSION,
        "spec": {
            "symbol": spec.symbol,
            "tick_size": spec.tick_size,
            "lot_size": spec.lot_size,
            "min_qty": spec.min_qty,
            "max_qty": spec.max_qty,
            "min_notional": spec.min_notional,
        },
        "seq": seq,
        "last_price": last_price,
        "resting": resting,
        "stops": stops,
    }


def decode_state(data: bytes) -> BookState:
    doc = json.loads(data)
    if doc.get("version") != _SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {doc.get('version')!r}")
    spec = MarketSpec(**doc["spec"])
    return BookState(
        spec=spec,
        seq=int(doc["seq"]),
        last_price=None if doc["last_price"] is None else int(doc["last_price"]),
        resting=tuple(_decode_order(r) for r in doc["resting"]),
        stops=tuple(_decode_order(r) for r in doc["stops"]),
    )


# --------------------------------------------------------------------------- validation

_MARKET_TYPES = (OrderType.MARKET, OrderType.STOP_MARKET)
_STOP_TYPES = (OrderType.STOP_LIMIT, OrderType.STOP_MARKET)


# Over ruff's complexity limit on purpose: a flat list of independent checks, one reason each.
def validate_place(spec: MarketSpec, cmd: PlaceOrder) -> RejectReason | None:  # noqa: C901
    """The stateless checks of a new order, first failure wins, in this order:
    quantity > 0; price (limit types need one > 0, market types need a protection
    price > 0 and/or a budget > 0, budgets only on market types); stop price
    (stop types need one > 0, others none); TIF (market types IOC/FOK); expire
    time (GTD needs one > ts, others none); post-only (LIMIT with GTC/GTD only);
    min/max quantity; min notional (price * qty for limit types, the budget for
    market types that have one)."""
    if cmd.qty <= 0:
        return RejectReason.INVALID_QUANTITY
    otype = cmd.order_type
    is_market = otype in _MARKET_TYPES
    if is_market:
        if cmd.price is not None and cmd.price <= 0:
            return RejectReason.INVALID_PRICE
        if cmd.quote_budget is not None and cmd.quote_budget <= 0:
            return RejectReason.INVALID_QUOTE_BUDGET
        if cmd.price is None and cmd.quote_budget is None:
            return RejectReason.MARKET_ORDER_UNBOUNDED
    else:
        if cmd.price is None or cmd.price <= 0:
            return RejectReason.INVALID_PRICE
        if cmd.quote_budget is not None:
            return RejectReason.INVALID_QUOTE_BUDGET
    if otype in _STOP_TYPES:
        if cmd.stop_price is None or cmd.stop_price <= 0:
            return RejectReason.INVALID_STOP_PRICE
    elif cmd.stop_price is not None:
        return RejectReason.INVALID_STOP_PRICE
    tif = cmd.tif
    if is_market and tif is not TimeInForce.IOC and tif is not TimeInForce.FOK:
        return RejectReason.INVALID_TIME_IN_FORCE
    if tif is TimeInForce.GTD:
        if cmd.expire_time is None or cmd.expire_time <= cmd.ts:
            return RejectReason.INVALID_EXPIRE_TIME
    elif cmd.expire_time is not None:
        return RejectReason.INVALID_EXPIRE_TIME
    if cmd.post_only and (
        otype is not OrderType.LIMIT or (tif is not TimeInForce.GTC and tif is not TimeInForce.GTD)
    ):
        return RejectReason.INVALID_POST_ONLY
    if cmd.qty < spec.min_qty:
        return RejectReason.QUANTITY_BELOW_MIN
    if cmd.qty > spec.max_qty:
        return RejectReason.QUANTITY_ABOVE_MAX
    if is_market:
        if cmd.quote_budget is not None and cmd.quote_budget < spec.min_notional:
            return RejectReason.NOTIONAL_BELOW_MIN
    elif cmd.price is not None and cmd.price * cmd.qty < spec.min_notional:
        return RejectReason.NOTIONAL_BELOW_MIN
    return None


def validate_amend(cmd: AmendOrder) -> RejectReason | None:
    """The stateless checks of an amend: something to change, qty > 0, price > 0.
    The book then checks, in order: the order (``MATCH_UNKNOWN_ORDER``,
    ``MATCH_ORDER_NOT_AMENDABLE``), min/max quantity and min notional of the new
    price and total, the total above what is filled (``MATCH_AMEND_QTY_TOO_LOW``),
    and post-only for a new price."""
    if cmd.price is None and cmd.qty is None:
        return RejectReason.INVALID_AMEND
    if cmd.qty is not None and cmd.qty <= 0:
        return RejectReason.INVALID_QUANTITY
    if cmd.price is not None and cmd.price <= 0:
        return RejectReason.INVALID_PRICE
    return None


def check_amend_size(spec: MarketSpec, price: int, qty: int) -> RejectReason | None:
    """Min/max quantity and min notional for an amended order's price and total."""
    if qty < spec.min_qty:
        return RejectReason.QUANTITY_BELOW_MIN
    if qty > spec.max_qty:
        return RejectReason.QUANTITY_ABOVE_MAX
    if price * qty < spec.min_notional:
        return RejectReason.NOTIONAL_BELOW_MIN
    return None


# --------------------------------------------------------------------------- contract


class OrderBook(abc.ABC):
    """One market's order book: a deterministic value machine."""

    __slots__ = ()

    name: ClassVar[str] = "abstract"

    @abc.abstractmethod
    def __init__(self, spec: MarketSpec) -> None:
        """An empty book for the market ``spec``."""

    @property
    @abc.abstractmethod
    def spec(self) -> MarketSpec: ...

    @property
    @abc.abstractmethod
    def seq(self) -> int:
        """The seq of the last event emitted (0 for a new book)."""

    @property
    @abc.abstractmethod
    def last_price(self) -> int | None:
        """The price of the last trade, None before the first."""

    @abc.abstractmethod
    def submit(self, command: Command) -> Result:
        """Apply one command; return its events."""

    @abc.abstractmethod
    def next_expiry(self) -> int | None:
        """The earliest expire_time of a live GTD order (resting or a pending stop);
        None if there is none. An ``Expire`` at or after it cancels that order."""

    @abc.abstractmethod
    def l2(self, depth: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Aggregated levels ``(bids, asks)``, each best first, as (price, qty)."""

    @abc.abstractmethod
    def level_size(self, side: Side, price: int) -> int:
        """How many orders rest at one price level (0 if there is no such level)."""

    @abc.abstractmethod
    def l3(self) -> list[OrderView]:
        """Resting orders in priority order: bids best first, then asks best first."""

    @abc.abstractmethod
    def stops(self) -> list[OrderView]:
        """Pending stop orders by ``accepted_seq``."""

    @abc.abstractmethod
    def order(self, order_id: int) -> OrderView | None:
        """A live order (resting or pending stop) by id."""

    @abc.abstractmethod
    def export_state(self) -> BookState: ...

    @classmethod
    @abc.abstractmethod
    def from_state(cls, state: BookState) -> Self: ...

    def document(self) -> dict[str, Any]:
        """The canonical snapshot as a JSON document (`snapshot` is its compact JSON)."""
        return state_document(self.export_state())

    def snapshot(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def restore(cls, data: bytes) -> Self:
        return cls.from_state(decode_state(data))

    def state_hash(self) -> str:
        """sha256 (hex) of the canonical snapshot: equal for equal books."""
        return hashlib.sha256(self.snapshot()).hexdigest()
