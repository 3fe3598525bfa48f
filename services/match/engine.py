"""One market's engine: the book plus what the wire needs, still pure.

The book (``domain``/``book``) speaks integers: order and account numbers, ticks
and lots. The wire speaks strings: order ids chosen by the order service,
account ids from auth, decimal prices and quantities. ``decode`` turns a wire
command into a book command (refusing malformed input before anything is
journaled); ``MarketEngine.apply`` numbers it, runs it through the book and
turns the book's events into ``MatchEvent`` messages, adding what the book does
not keep: client order ids, account ids, prices as decimals, fees.

Everything here is a function of the journal: the engine's registries (wire
order id -> book number, account id -> number, each live order's wire
details) are rebuilt by replaying the same commands, and are part of the
snapshot, so a restored engine gives the same events, byte for byte.

Numbering: a new order's book number is the ``command_seq`` of the command
that placed it (unique, never reused); accounts are numbered from 1 in order
of first appearance. Number 0 is never assigned, so a cancel or amend naming an
unknown order or account reaches the book as 0 and is rejected there
(``MATCH_UNKNOWN_ORDER``), journaled like any other outcome.

Fees are computed here so that every consumer of a trade sees the same
amounts: each side pays its rate (maker or taker) on what it receives (the
buyer base, the seller quote), in minor units of that asset, rounded towards
positive infinity: a fee rounds up and a rebate (negative rate) rounds towards
zero, never in the trader's favour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis import (
    ExchangeError,
    FailedPrecondition,
    InvalidArgument,
    Market,
    MoneyError,
    Violations,
)
from services.chassis.money import parse_decimal

from .book import FastOrderBook
from .domain import (
    Accepted,
    Amended,
    AmendOrder,
    Cancelled,
    CancelOrder,
    CancelReason,
    Command,
    Event,
    Expire,
    LevelChanged,
    MarketSpec,
    MarkStatus,
    MassCancel,
    OrderBook,
    OrderType,
    PlaceOrder,
    Rejected,
    Side,
    StatusMarked,
    StpMode,
    TimeInForce,
    Trade,
    Triggered,
)

__all__ = ["MarketEngine", "check_reason", "decode", "market_spec", "status_name"]

_SIDES = {types_pb2.SIDE_BUY: Side.BUY, types_pb2.SIDE_SELL: Side.SELL}
_SIDES_PB = {v: k for k, v in _SIDES.items()}
_TYPES = {
    types_pb2.ORDER_TYPE_LIMIT: OrderType.LIMIT,
    types_pb2.ORDER_TYPE_MARKET: OrderType.MARKET,
    types_pb2.ORDER_TYPE_STOP_LIMIT: OrderType.STOP_LIMIT,
    types_pb2.ORDER_TYPE_STOP_MARKET: OrderType.STOP_MARKET,
}
_TIFS = {
    types_pb2.TIME_IN_FORCE_UNSPECIFIED: TimeInForce.GTC,
    types_pb2.TIME_IN_FORCE_GTC: TimeInForce.GTC,
    types_pb2.TIME_IN_FORCE_IOC: TimeInForce.IOC,
    types_pb2.TIME_IN_FORCE_FOK: TimeInForce.FOK,
    types_pb2.TIME_IN_FORCE_GTD: TimeInForce.GTD,
}
_STPS = {
    types_pb2.SELF_TRADE_PREVENTION_UNSPECIFIED: StpMode.CANCEL_NEWEST,
    types_pb2.SELF_TRADE_PREVENTION_CANCEL_NEWEST: StpMode.CANCEL_NEWEST,
    types_pb2.SELF_TRADE_PREVENTION_CANCEL_OLDEST: StpMode.CANCEL_OLDEST,
    types_pb2.SELF_TRADE_PREVENTION_CANCEL_BOTH: StpMode.CANCEL_BOTH,
    types_pb2.SELF_TRADE_PREVENTION_DECREMENT_AND_CANCEL: StpMode.DECREMENT_AND_CANCEL,
}
# Book reasons that always mean the same wire reason; USER and MASS_CANCEL
# carry the reason the command gave (user request, cancel-on-disconnect, ...).
_CANCEL_REASONS = {
    CancelReason.IOC_REMAINDER: types_pb2.CANCEL_REASON_IMMEDIATE_OR_CANCEL,
    CancelReason.FOK_UNFILLED: types_pb2.CANCEL_REASON_FILL_OR_KILL,
    CancelReason.MARKET_UNFILLED: types_pb2.CANCEL_REASON_NO_LIQUIDITY,
    CancelReason.STP: types_pb2.CANCEL_REASON_SELF_TRADE_PREVENTION,
    CancelReason.EXPIRED: types_pb2.CANCEL_REASON_EXPIRED,
    CancelReason.CLOSED: types_pb2.CANCEL_REASON_MARKET_HALTED,  # "halted or delisted"
}
TRADING = types_pb2.MARKET_STATUS_TRADING
POST_ONLY = types_pb2.MARKET_STATUS_POST_ONLY
CANCEL_ONLY = types_pb2.MARKET_STATUS_CANCEL_ONLY
HALTED = types_pb2.MARKET_STATUS_HALTED
DELISTED = types_pb2.MARKET_STATUS_DELISTED
_STATUSES: dict[int, str] = {
    TRADING: "TRADING",
    POST_ONLY: "POST_ONLY",
    CANCEL_ONLY: "CANCEL_ONLY",
    HALTED: "HALTED",
    DELISTED: "DELISTED",
}
_REASON_MAX = 256
_REJECT_MESSAGES = {
    "MATCH_DUPLICATE_ORDER_ID": "an order with this id is live in the book",
    "MATCH_UNKNOWN_ORDER": "no live order with this id for this account",
    "MATCH_POST_ONLY_WOULD_TAKE": "a post-only order would take liquidity",
}
_MAX_FEE_RATE = Decimal("0.1")
_MAX_REBATE_RATE = Decimal("-0.01")
_ID_MAX = 128
_SNAPSHOT_VERSION = 1


def market_spec(market: Market) -> MarketSpec:
    """The book's view of a market: grids as minor units, sizes in lots and tick-lots."""
    return MarketSpec(
        symbol=market.symbol,
        tick_size=int(market.tick_size / market.quote.unit),
        lot_size=int(market.lot_size / market.base.unit),
        min_qty=market.lots(str(market.min_quantity)),
        max_qty=market.lots(str(market.max_quantity)),
        min_notional=market.tick_lots(str(market.min_notional)),
    )


# --------------------------------------------------------------------------- decode


class _Violations(Violations):
    def ident(self, name: str, value: str) -> None:
        if not value:
            self.add(name, "required", "MATCH_FIELD_REQUIRED")
        elif len(value) > _ID_MAX:
            self.add(name, f"longer than {_ID_MAX} characters", "MATCH_FIELD_TOO_LONG")

    def units(self, name: str, text: str, parse: Any, *, grid: str) -> int | None:
        if not text:
            return None
        try:
            value: int = parse(text)
        except MoneyError as err:
            reason = "MATCH_INVALID_DECIMAL" if err.reason == "MALFORMED" else grid
            self.add(name, str(err), reason)
            return None
        return value

    def enum(self, name: str, value: int, table: Mapping[Any, Any]) -> Any:
        found = table.get(value)
        if found is None:
            self.add(name, f"{value} is not allowed here", "MATCH_INVALID_ENUM")
        return found

    def fee_rate(self, name: str, text: str, *, rebate: bool) -> Decimal:
        if not text:
            return Decimal(0)
        try:
            rate: Decimal | None = parse_decimal(text)
        except MoneyError:
            rate = None
        low = _MAX_REBATE_RATE if rebate else Decimal(0)
        if rate is None or not low <= rate <= _MAX_FEE_RATE:
            self.add(name, f"a decimal rate in [{low}, {_MAX_FEE_RATE}]", "MATCH_INVALID_FEE_RATE")
            return Decimal(0)
        return rate


def check_reason(v: Violations, text: str, why: str) -> None:
    """An operator's `reason` (kept in the journal and shown): required, saying
    `why`, and at most _REASON_MAX characters."""
    if not text.strip():
        v.add("reason", f"required: {why}", "MATCH_FIELD_REQUIRED")
    elif len(text) > _REASON_MAX:
        v.add("reason", f"longer than {_REASON_MAX} characters", "MATCH_FIELD_TOO_LONG")


def _ns(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


@dataclass(frozen=True, slots=True)
class Decoded:
    """A checked wire command and its book command (ids and ts still to be filled in)."""

    wire: match_pb2.Command
    book: Command
    fees: tuple[Decimal, Decimal] = (Decimal(0), Decimal(0))  # maker, taker rates


def _listing(market: Market, command: match_pb2.Command, v: _Violations) -> Command:
    """A listing, the market's first command (ADR 0018): a place in its sequence
    (seq 1), taken in the book as a status mark that changes nothing."""
    lm, v.prefix = command.list_market, "command.list_market."
    v.ident("request_id", lm.request_id)
    if lm.market.symbol != market.symbol or command.market != market.symbol:
        v.add("market", f"lists {lm.market.symbol!r}, not {market.symbol}", "MATCH_CONFLICT")
    check_reason(v, lm.reason, "why the market is listed")
    return MarkStatus(ts=0, cancel_all=False)


def decode(market: Market, command: match_pb2.Command) -> Decoded:
    """Check a wire command for ``market``; InvalidArgument (with every field
    violation) if it is malformed. Business rules (sizes, post-only, known
    orders) are the book's and come back as Rejected events instead."""
    v = _Violations("command.")
    v.ident("command_id", command.command_id)
    kind = command.WhichOneof("kind")
    book: Command | None = None
    fees = (Decimal(0), Decimal(0))
    if kind == "place":
        p, v.prefix = command.place, "command.place."
        v.ident("order_id", p.order_id)
        v.ident("account_id", p.account_id)
        if len(p.client_order_id) > _ID_MAX:
            v.add("client_order_id", f"longer than {_ID_MAX}", "MATCH_FIELD_TOO_LONG")
        side = v.enum("side", p.side, _SIDES)
        otype = v.enum("type", p.type, _TYPES)
        tif = v.enum("time_in_force", p.time_in_force, _TIFS)
        stp = v.enum("self_trade_prevention", p.self_trade_prevention, _STPS)
        price = v.units("price", p.price, market.ticks, grid="MATCH_INVALID_TICK")
        stop = v.units("stop_price", p.stop_price, market.ticks, grid="MATCH_INVALID_TICK")
        qty = v.units("quantity", p.quantity, market.lots, grid="MATCH_INVALID_LOT")
        budget = v.units(
            "quote_quantity", p.quote_quantity, market.tick_lots, grid="MATCH_INVALID_NOTIONAL"
        )
        if not p.quantity and not p.quote_quantity:
            v.add("quantity", "quantity or quote_quantity is required", "MATCH_FIELD_REQUIRED")
        if p.quote_quantity and p.quantity:
            v.add("quote_quantity", "give quantity or quote_quantity, not both", "MATCH_CONFLICT")
        fees = (
            v.fee_rate("maker_fee_rate", p.maker_fee_rate, rebate=True),
            v.fee_rate("taker_fee_rate", p.taker_fee_rate, rebate=False),
        )
        if not v.items:
            # A budget-bounded market buy has no base quantity of its own: the book
            # bounds it by the budget, and by the market's maximum.
            book = PlaceOrder(
                ts=0,
                order_id=0,
                account_id=0,
                side=side,
                qty=market.lots(str(market.max_quantity)) if qty is None else qty,
                price=price,
                order_type=otype,
                tif=tif,
                stop_price=stop,
                expire_time=_ns(p.expire_time) if p.HasField("expire_time") else None,
                post_only=p.post_only,
                stp=stp,
                quote_budget=budget,
            )
    elif kind == "cancel":
        c, v.prefix = command.cancel, "command.cancel."
        v.ident("order_id", c.order_id)
        v.ident("account_id", c.account_id)
        book = CancelOrder(ts=0, order_id=0, account_id=0)
    elif kind == "amend":
        a, v.prefix = command.amend, "command.amend."
        v.ident("order_id", a.order_id)
        v.ident("account_id", a.account_id)
        price = v.units("price", a.price, market.ticks, grid="MATCH_INVALID_TICK")
        qty = v.units("quantity", a.quantity, market.lots, grid="MATCH_INVALID_LOT")
        book = AmendOrder(ts=0, order_id=0, account_id=0, price=price, qty=qty)
    elif kind == "mass_cancel":
        m, v.prefix = command.mass_cancel, "command.mass_cancel."
        v.ident("account_id", m.account_id)
        side = _SIDES.get(m.side)
        if m.side != types_pb2.SIDE_UNSPECIFIED and side is None:
            v.add("side", f"{m.side} is not a side", "MATCH_INVALID_ENUM")
        book = MassCancel(ts=0, account_id=0, side=side)
    elif kind == "expire":
        book = Expire(ts=0)
    elif kind == "set_status":
        st, v.prefix = command.set_status, "command.set_status."
        v.enum("status", st.status, _STATUSES)
        v.ident("request_id", st.request_id)
        check_reason(v, st.reason, "why the market changes status")
        book = MarkStatus(ts=0, cancel_all=st.status == DELISTED)
    elif kind == "list_market":
        book = _listing(market, command, v)
    else:
        v.add(
            "kind",
            "one of place, cancel, amend, mass_cancel, expire, set_status, list_market is required",
            "MATCH_FIELD_REQUIRED",
        )
    v.raise_if_any()  # under the first violation's reason
    if book is None:
        raise InvalidArgument("MATCH_FIELD_REQUIRED", "malformed command")
    return Decoded(command, book, fees)


# --------------------------------------------------------------------------- engine


@dataclass(slots=True)
class _Live:
    """What the wire knows of a live order that the book does not."""

    order_id: str
    client_order_id: str
    account_id: str
    side: types_pb2.Side.ValueType
    order_type: types_pb2.OrderType.ValueType
    price: str
    stop_price: str
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal

    def encode(self) -> list[Any]:
        return [
            self.order_id, self.client_order_id, self.account_id, str(self.side),
            str(self.order_type), self.price, self.stop_price, str(self.maker_fee_rate),
            str(self.taker_fee_rate),
        ]  # fmt: skip

    @classmethod
    def decode(cls, row: list[str]) -> _Live:
        return cls(
            row[0], row[1], row[2],
            types_pb2.Side.ValueType(int(row[3])), types_pb2.OrderType.ValueType(int(row[4])),
            row[5], row[6],
            Decimal(row[7]), Decimal(row[8]),
        )  # fmt: skip


class MarketEngine:
    """A market's book and registries; ``apply`` is its only mutator."""

    def __init__(self, market: Market, book: OrderBook | None = None) -> None:
        self.market = market
        self.book: OrderBook = book if book is not None else FastOrderBook(market_spec(market))
        self.command_seq = 0
        self.last_ts = 0
        self._numbers: dict[str, int] = {}  # live wire order id -> book number
        self._live: dict[int, _Live] = {}  # book number -> wire details
        self._accounts: dict[str, int] = {}
        self._working: Counter[str] = Counter()  # wire account id -> its live orders
        # The market's status (ADR 0015), set only by journaled set_status commands.
        self.status: types_pb2.MarketStatus.ValueType = TRADING
        self.status_reason = ""

    @property
    def seq(self) -> int:
        return self.book.seq

    def working_orders(self, account_id: str) -> int:
        """The account's orders in this market's book, resting or waiting for their trigger."""
        return self._working[account_id]

    def wire_ids(self, number: int) -> tuple[str, str]:
        """A live order's wire order id and account id."""
        live = self._live[number]
        return live.order_id, live.account_id

    # ----------------------------------------------------------------- status

    def refusal(self, decoded: Decoded) -> ExchangeError | None:
        """What the market's status refuses of a command, before the journal (so a
        replay sees only what was admitted); None if the status lets it through.

        TRADING: everything. POST_ONLY: post-only limit orders, amends whose price
        would not cross, cancels. CANCEL_ONLY and HALTED: cancels only (a halt is
        the operator's stop for an incident; cancels stay open so that owners can
        take their funds out of a book that does not trade). DELISTED: nothing
        (its orders were cancelled by the delisting); a mass cancel finds nothing
        and passes, so sweeps across markets (kill switches, cancel-on-disconnect)
        keep working. Expiry (the writer's own clock) always passes."""
        wire, status = decoded.wire, self.status
        kind = wire.WhichOneof("kind")
        if status == TRADING or kind == "expire":
            return None
        if status == DELISTED:
            if kind == "mass_cancel":
                return None
            return self._refused("MATCH_MARKET_DELISTED", "is delisted: nothing is accepted")
        if kind in ("cancel", "mass_cancel", "set_status"):
            return None
        if status == POST_ONLY:
            if kind == "place":
                p = wire.place
                if p.post_only and p.type == types_pb2.ORDER_TYPE_LIMIT:
                    return None
                return self._refused(
                    "MATCH_MARKET_POST_ONLY", "accepts only post-only limit orders"
                )
            cmd = decoded.book
            assert isinstance(cmd, AmendOrder)
            if cmd.price is not None and self._amend_crosses(wire.amend.order_id, cmd.price):
                return self._refused(
                    "MATCH_MARKET_POST_ONLY", "accepts no amend that would take liquidity"
                )
            return None
        if status == CANCEL_ONLY:
            return self._refused("MATCH_MARKET_CANCEL_ONLY", "accepts only cancels")
        return self._refused("MATCH_MARKET_HALTED", "is halted: only cancels are accepted")

    def _refused(self, reason: str, what: str) -> FailedPrecondition:
        status = status_name(self.status)
        detail = f" ({self.status_reason})" if self.status_reason else ""
        return FailedPrecondition(
            reason,
            f"{self.market.symbol} {what}{detail}",
            metadata={"market": self.market.symbol, "status": status},
        )

    def _amend_crosses(self, order_id: str, price: int) -> bool:
        live = self._live.get(self._numbers.get(order_id, 0))
        if live is None:  # unknown: the book answers MATCH_UNKNOWN_ORDER
            return False
        bids, asks = self.book.l2(1)
        if live.side == types_pb2.SIDE_BUY:
            return bool(asks) and asks[0][0] <= price
        return bool(bids) and bids[0][0] >= price

    # ----------------------------------------------------------------- apply

    def apply(self, decoded: Decoded, command_seq: int, ts: int) -> list[match_pb2.MatchEvent]:
        """Run one decoded command as journal entry ``command_seq`` at ``ts`` (ns)."""
        if command_seq != self.command_seq + 1:
            raise ValueError(f"command_seq {command_seq} after {self.command_seq}")
        wire = decoded.wire
        cmd = decoded.book
        touched: list[int] = []
        if type(cmd) is PlaceOrder:
            p = wire.place
            number = self._numbers.get(p.order_id)
            if number is None:
                number = command_seq
                self._numbers[p.order_id] = number
                self._live[number] = _Live(
                    p.order_id, p.client_order_id, p.account_id, p.side, p.type,
                    self._price(cmd.price), self._price(cmd.stop_price), *decoded.fees,
                )  # fmt: skip
                self._working[p.account_id] += 1
                touched.append(number)
            cmd = dataclasses.replace(
                cmd, ts=ts, order_id=number, account_id=self._account(p.account_id, create=True)
            )
        elif type(cmd) is MassCancel:
            cmd = dataclasses.replace(
                cmd, ts=ts, account_id=self._account(wire.mass_cancel.account_id)
            )
        elif type(cmd) is Expire:
            cmd = Expire(ts)
        elif type(cmd) is MarkStatus:
            cmd = MarkStatus(ts, cmd.cancel_all)
        else:
            assert isinstance(cmd, CancelOrder | AmendOrder)
            target = wire.cancel if type(cmd) is CancelOrder else wire.amend
            cmd = dataclasses.replace(
                cmd,
                ts=ts,
                order_id=self._numbers.get(target.order_id, 0),
                account_id=self._account(target.account_id),
            )
        result = self.book.submit(cmd)
        self.command_seq = command_seq
        self.last_ts = ts
        stamp = Timestamp(seconds=ts // 1_000_000_000, nanos=ts % 1_000_000_000)
        events = []
        for event in result.events:
            out = match_pb2.MatchEvent(
                market=self.market.symbol,
                seq=event.seq,
                command_seq=command_seq,
                command_id=wire.command_id,
                event_time=stamp,
            )
            self._fill(out, event, wire, touched)
            events.append(out)
        for number in touched:
            if self.book.order(number) is None:
                live = self._live.pop(number, None)
                if live is not None:
                    self._working[live.account_id] -= 1
                    if not self._working[live.account_id]:
                        del self._working[live.account_id]
                    if self._numbers.get(live.order_id) == number:
                        del self._numbers[live.order_id]
        return events

    def _account(self, account_id: str, *, create: bool = False) -> int:
        number = self._accounts.get(account_id)
        if number is None:
            if not create:
                return 0
            number = self._accounts[account_id] = len(self._accounts) + 1
        return number

    def _price(self, ticks: int | None) -> str:
        return "" if ticks is None else self.market.price(ticks)

    def _fill(
        self,
        out: match_pb2.MatchEvent,
        event: Event,
        wire: match_pb2.Command,
        touched: list[int],
    ) -> None:
        m = self.market
        match event:
            case LevelChanged():
                lc = out.level_changed
                lc.side, lc.price = _SIDES_PB[event.side], m.price(event.price)
                lc.quantity = m.quantity(event.qty)
                lc.order_count = self.book.level_size(event.side, event.price)
            case Trade():
                self._trade(out.trade, event)
                touched += (event.maker_order_id, event.taker_order_id)
            case Accepted():
                p, a = wire.place, out.accepted
                live = self._identify(a, event.order_id)
                a.side, a.type = live.side, live.order_type
                a.time_in_force = p.time_in_force or types_pb2.TIME_IN_FORCE_GTC
                a.price, a.stop_price = live.price, live.stop_price
                a.quantity = p.quantity and m.quantity(event.qty)
                a.quote_quantity = p.quote_quantity and m.quote_amount(
                    m.tick_lots(p.quote_quantity)
                )
                a.post_only = p.post_only
                a.untriggered = event.order_type in (OrderType.STOP_LIMIT, OrderType.STOP_MARKET)
                a.place.CopyFrom(p)
            case Cancelled():
                c = out.cancelled
                live = self._identify(c, event.order_id)
                c.side, c.price = live.side, live.price
                c.cancelled_quantity = m.quantity(event.qty)
                c.remaining_quantity = m.quantity(event.leaves)
                c.reason = _CANCEL_REASONS.get(event.reason) or _asked_reason(wire)
                touched.append(event.order_id)
            case Amended():
                am = out.amended
                live = self._identify(am, event.order_id)
                am.side, am.old_price = live.side, live.price
                live.price = am.price = m.price(event.price)
                am.quantity = m.quantity(event.qty)
                am.remaining_quantity = m.quantity(event.leaves)
                am.priority_kept = event.priority_kept
                touched.append(event.order_id)
            case Triggered():
                t = out.triggered
                live = self._identify(t, event.order_id)
                t.side, t.stop_price = live.side, live.stop_price
                t.trigger_price = m.price(event.last_price)
                stop_limit = live.order_type == types_pb2.ORDER_TYPE_STOP_LIMIT
                t.type = types_pb2.ORDER_TYPE_LIMIT if stop_limit else types_pb2.ORDER_TYPE_MARKET
            case Rejected():
                self._reject(out.rejected, event, wire)
            case StatusMarked() if wire.HasField("list_market"):
                lm, listed = wire.list_market, out.market_listed
                listed.market.CopyFrom(lm.market)
                listed.reason, listed.request_id = lm.reason, lm.request_id
                listed.listed_by = lm.listed_by
            case StatusMarked():
                st, changed = wire.set_status, out.status_changed
                changed.previous_status = self.status
                changed.status, changed.reason = st.status, st.reason
                changed.request_id, changed.updated_by = st.request_id, st.updated_by
                self.status, self.status_reason = st.status, st.reason

    def _identify(self, message: Any, number: int) -> _Live:
        """Set an order event's wire ids; returns the order's wire details."""
        live = self._live[number]
        message.order_id = live.order_id
        message.client_order_id = live.client_order_id
        message.account_id = live.account_id
        return live

    def _reject(self, r: match_pb2.OrderRejected, event: Rejected, wire: match_pb2.Command) -> None:
        """A refused command: the ids are the command's (the order may not exist)."""
        kind = wire.WhichOneof("kind")
        target = getattr(wire, kind or "place")
        r.order_id = getattr(target, "order_id", "")
        r.account_id = target.account_id
        if kind == "place":
            r.client_order_id = wire.place.client_order_id
            r.place.CopyFrom(wire.place)
        else:
            live = self._live.get(self._numbers.get(r.order_id, 0))
            r.client_order_id = live.client_order_id if live is not None else ""
        r.reason = event.reason.value
        r.message = _REJECT_MESSAGES.get(event.reason.value, event.reason.name.lower())

    def _trade(self, t: match_pb2.Trade, e: Trade) -> None:
        m = self.market
        maker, taker = self._live[e.maker_order_id], self._live[e.taker_order_id]
        tick_lots = e.price * e.qty
        base, quote = m.base_minor(e.qty), m.quote_minor(tick_lots)
        taker_buys = e.aggressor is Side.BUY
        t.trade_id = str(e.trade_id)
        t.price = m.price(e.price)
        t.quantity = m.quantity(e.qty)
        t.quote_quantity = m.quote_amount(tick_lots)
        t.taker_side = _SIDES_PB[e.aggressor]
        t.maker_order_id, t.maker_client_order_id, t.maker_account_id = (
            maker.order_id,
            maker.client_order_id,
            maker.account_id,
        )
        t.taker_order_id, t.taker_client_order_id, t.taker_account_id = (
            taker.order_id,
            taker.client_order_id,
            taker.account_id,
        )
        t.maker_remaining_quantity = m.quantity(e.maker_leaves)
        t.taker_remaining_quantity = m.quantity(e.taker_leaves)
        # Each side pays on what it receives: the buyer base, the seller quote.
        maker_gets, taker_gets = (m.quote, m.base) if taker_buys else (m.base, m.quote)
        maker_amount, taker_amount = (quote, base) if taker_buys else (base, quote)
        t.maker_fee = maker_gets.format(_fee(maker_amount, maker.maker_fee_rate))
        t.maker_fee_asset = maker_gets.symbol
        t.taker_fee = taker_gets.format(_fee(taker_amount, taker.taker_fee_rate))
        t.taker_fee_asset = taker_gets.symbol

    # ----------------------------------------------------------------- state

    def snapshot(self) -> bytes:
        """Canonical bytes of the whole engine: equal engines give equal bytes."""
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":")).encode()

    def document(self) -> dict[str, Any]:
        """The engine as the JSON document `snapshot` writes (the status only once it
        was ever set: a market that never changed status has the bytes it had before
        statuses existed)."""
        doc = {
            "version": _SNAPSHOT_VERSION,
            "market": self.market.symbol,
            "command_seq": self.command_seq,
            "last_ts": self.last_ts,
            "book": self.book.document(),
            "accounts": sorted(self._accounts.items(), key=lambda kv: kv[1]),
            "live": [[n, *self._live[n].encode()] for n in sorted(self._live)],
        }
        if self.status != TRADING or self.status_reason:
            doc["status"] = [int(self.status), self.status_reason]
        return doc

    def state_hash(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    @classmethod
    def restore(cls, market: Market, data: bytes) -> MarketEngine:
        doc = json.loads(data)
        if doc.get("version") != _SNAPSHOT_VERSION or doc.get("market") != market.symbol:
            raise ValueError(f"not a version {_SNAPSHOT_VERSION} snapshot of {market.symbol}")
        book_bytes = json.dumps(doc["book"], sort_keys=True, separators=(",", ":")).encode()
        engine = cls(market, FastOrderBook.restore(book_bytes))
        if engine.book.spec != market_spec(market):
            raise ValueError(f"{market.symbol}: the snapshot's grid differs from the market's")
        engine.command_seq = int(doc["command_seq"])
        engine.last_ts = int(doc["last_ts"])
        engine._accounts = {name: int(number) for name, number in doc["accounts"]}
        status, engine.status_reason = doc.get("status", [TRADING, ""])
        engine.status = types_pb2.MarketStatus.ValueType(int(status))
        for row in doc["live"]:
            live = _Live.decode(row[1:])
            engine._live[int(row[0])] = live
            engine._numbers[live.order_id] = int(row[0])
            engine._working[live.account_id] += 1
        return engine


def status_name(status: int) -> str:
    """A market status as people write it ("HALTED")."""
    return _STATUSES.get(status, str(status))


def _asked_reason(wire: match_pb2.Command) -> types_pb2.CancelReason.ValueType:
    """The reason a cancel or mass cancel command gave (a user request if none)."""
    kind = wire.WhichOneof("kind")
    if kind == "cancel" and wire.cancel.reason:
        return wire.cancel.reason
    if kind == "mass_cancel" and wire.mass_cancel.reason:
        return wire.mass_cancel.reason
    return types_pb2.CANCEL_REASON_USER_REQUESTED


def _fee(amount: int, rate: Decimal) -> int:
    return int((amount * rate).to_integral_value(rounding=ROUND_CEILING))
