"""Trade settlement and hold release, as pure logic over a `Book`.

The balance owner (match's writer, ADR 0013) applies each command's events,
in seq order, right after the book made them. For each one:
- it settles a Trade once (unique (market, trade_id)) as one linked chain: the
  buyer's quote hold and the seller's base hold are consumed (partial post that
  keeps the rest pending), the escrow account the holds credit pays the seller
  the quote amount and the buyer the base quantity, and each fee moves between
  the party and the asset's fee account (negative = rebate);
- it releases (voids) the rest of `hold:<order_id>` when the event says the
  order is done.

A hold that is missing or too small never wedges the writer: what it lacks
is taken from the party's available balance if there is enough, else left
unbacked in the escrow account (which goes negative), and an `Anomaly` is
recorded either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis import Catalog, MoneyError
from services.chassis.money import parse_decimal

from .domain import Anomaly, Book, Kind, Op, State, Transfer, TransferInput

__all__ = [
    "ESCROW_ACCOUNT",
    "FEE_ACCOUNT",
    "MarketEvent",
    "Release",
    "TradeSettlement",
    "Unreadable",
    "apply_events",
    "hold_id",
    "to_market_event",
]

ESCROW_ACCOUNT = "sys:orders"
FEE_ACCOUNT = "sys:fees"


def hold_id(order_id: str) -> str:
    return f"hold:{order_id}"


@dataclass(frozen=True, slots=True)
class Party:
    account_id: str
    order_id: str
    fee: int  # minor units of fee_asset; negative = rebate
    fee_asset: str
    done: bool  # nothing of the order remains after this trade


@dataclass(frozen=True, slots=True)
class TradeSettlement:
    trade_id: str
    base: str
    quote: str
    quantity: int  # base minor units
    quote_quantity: int  # quote minor units
    buyer: Party
    seller: Party


@dataclass(frozen=True, slots=True)
class Release:
    order_id: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An event the ledger could not read (unknown market or asset, bad amount)."""

    detail: str


@dataclass(frozen=True, slots=True)
class MarketEvent:
    """One match event as the ledger needs it (body None: nothing to move)."""

    market: str
    seq: int
    body: TradeSettlement | Release | Unreadable | None


def apply_events(book: Book, events: Sequence[MarketEvent]) -> int:
    """Apply one command's events (ascending seq); how many trades it settled."""
    trades = 0
    for event in events:
        if isinstance(event.body, TradeSettlement):
            trades += _settle(book, event, event.body)
        elif isinstance(event.body, Release):
            _release(book, event, event.body.order_id)
        elif isinstance(event.body, Unreadable):
            _anomaly(book, event, "EVENT_UNREADABLE", "", "", 0, event.body.detail)
    return trades


def _anomaly(
    book: Book, event: MarketEvent, kind: str, order_id: str, asset: str, amount: int, detail: str
) -> None:
    book.anomalies.append(Anomaly(event.market, event.seq, kind, order_id, asset, amount, detail))


def _release(book: Book, event: MarketEvent, order_id: str) -> None:
    hold = book.transfer(hold_id(order_id))
    if hold is None or hold.op != Op.PENDING:
        _anomaly(book, event, "HOLD_MISSING", order_id, "", 0, "release of an unknown hold")
        return
    if hold.state != State.PENDING or book.expire_due(hold):
        return  # already used up, voided or expired: nothing left to release
    outcome = book.apply_chain(
        [
            TransferInput(
                id=f"release:{order_id}",
                op=Op.VOID,
                pending_id=hold.id,
                kind=Kind.ORDER_HOLD,
                reference=order_id,
            )
        ]
    )[0]
    if not isinstance(outcome, Transfer):
        _anomaly(book, event, "RELEASE_FAILED", order_id, hold.asset, 0, str(outcome))


# Over ruff's complexity limit on purpose: one trade's linked chain: each branch is a settlement
# rule of ADR 0005.
def _settle(book: Book, event: MarketEvent, trade: TradeSettlement) -> int:  # noqa: C901
    key = (event.market, trade.trade_id)
    if key in book.settled_trades:
        return 0
    prefix = f"trade:{event.market}:{trade.trade_id}"
    reference = f"{event.market}:{trade.trade_id}"
    legs: list[TransferInput] = []
    shortfalls: list[Anomaly] = []

    def consume(party: Party, role: str, asset: str, amount: int) -> str:
        hold = book.transfer(hold_id(party.order_id))
        escrow = ESCROW_ACCOUNT
        take = 0
        if hold is not None and hold.op == Op.PENDING and hold.asset == asset:
            escrow = hold.credit_account_id
            book.expire_due(hold)
            if hold.state == State.PENDING:
                take = min(amount, hold.remaining)
        if take:
            legs.append(
                TransferInput(
                    id=f"{prefix}:{role}-hold",
                    op=Op.CONSUME,
                    pending_id=hold_id(party.order_id),
                    amount=take,
                    kind=Kind.TRADE,
                    reference=party.order_id,
                )
            )
        short = amount - take
        if short:
            direct = short <= book.available(party.account_id, asset)
            kind = "HOLD_MISSING" if hold is None else "HOLD_SHORT"
            shortfalls.append(
                Anomaly(
                    event.market,
                    event.seq,
                    kind,
                    party.order_id,
                    asset,
                    short,
                    "taken from the available balance" if direct else "left unbacked in escrow",
                )
            )
            if direct:
                legs.append(
                    TransferInput(
                        id=f"{prefix}:{role}-direct",
                        op=Op.SINGLE,
                        debit_account_id=party.account_id,
                        credit_account_id=escrow,
                        asset=asset,
                        amount=short,
                        kind=Kind.TRADE,
                        reference=party.order_id,
                    )
                )
        return escrow

    quote_escrow = consume(trade.buyer, "buyer", trade.quote, trade.quote_quantity)
    base_escrow = consume(trade.seller, "seller", trade.base, trade.quantity)
    payouts = [
        (trade.seller, "seller", quote_escrow, trade.quote, trade.quote_quantity),
        (trade.buyer, "buyer", base_escrow, trade.base, trade.quantity),
    ]
    for party, role, escrow, asset, amount in payouts:
        if amount:
            legs.append(
                TransferInput(
                    id=f"{prefix}:{role}-receive",
                    op=Op.SINGLE,
                    debit_account_id=escrow,
                    credit_account_id=party.account_id,
                    asset=asset,
                    amount=amount,
                    kind=Kind.TRADE,
                    reference=reference,
                )
            )
    fees: list[TransferInput] = []
    for party, role in ((trade.seller, "seller"), (trade.buyer, "buyer")):
        if party.fee:
            payer, payee = (party.account_id, FEE_ACCOUNT)
            if party.fee < 0:
                payer, payee = payee, payer
            fees.append(
                TransferInput(
                    id=f"{prefix}:{role}-fee",
                    op=Op.SINGLE,
                    debit_account_id=payer,
                    credit_account_id=payee,
                    asset=party.fee_asset,
                    amount=abs(party.fee),
                    kind=Kind.FEE,
                    reference=reference,
                )
            )
    chain = _linked([*legs, *fees])
    outcomes = book.apply_chain(chain) if chain else []
    failed = [o for o in outcomes if not isinstance(o, Transfer)]
    if failed and fees:
        # A fee its payer cannot cover must not block the trade: settle without fees.
        _anomaly(book, event, "FEE_NOT_CHARGED", "", "", 0, str(failed[0]))
        chain = _linked(legs)
        outcomes = book.apply_chain(chain) if chain else []
        failed = [o for o in outcomes if not isinstance(o, Transfer)]
    if failed:
        _anomaly(book, event, "SETTLEMENT_FAILED", "", "", 0, str(failed[0]))
    else:
        book.anomalies.extend(shortfalls)
    book.settled_trades.add(key)
    book.new_trades.append((event.market, trade.trade_id, event.seq))
    for party in (trade.buyer, trade.seller):
        if party.done:
            _release(book, event, party.order_id)
    return 1


def _linked(items: list[TransferInput]) -> list[TransferInput]:
    return [replace(item, linked=index < len(items) - 1) for index, item in enumerate(items)]


def _zero(text: str) -> bool:
    try:
        return parse_decimal(text) == Decimal(0)
    except MoneyError:
        return False


def _ends_order(event: match_pb2.MatchEvent) -> bool:
    """Whether a rejection ends its order: a refused place of a new order (the
    order service's command id `place:<order_id>`). A refused cancel or amend
    leaves a working order, and its hold, as they were; a duplicate order id
    names an order that exists."""
    r = event.rejected
    return event.command_id == f"place:{r.order_id}" and r.reason != "MATCH_DUPLICATE_ORDER_ID"


def to_market_event(catalog: Catalog, event: match_pb2.MatchEvent) -> MarketEvent:
    """What the ledger must do for one event (MoneyError/KeyError if it cannot read it)."""
    kind = event.WhichOneof("kind")
    if kind == "trade":
        t = event.trade
        market = catalog.markets[event.market]
        assets = catalog.assets

        def party(account: str, order: str, fee: str, fee_asset: str, remaining: str) -> Party:
            asset = assets[fee_asset] if fee_asset else market.quote
            amount = asset.to_minor(fee) if fee else 0
            return Party(account, order, amount, asset.symbol, _zero(remaining))

        maker = party(
            t.maker_account_id,
            t.maker_order_id,
            t.maker_fee,
            t.maker_fee_asset,
            t.maker_remaining_quantity,
        )
        taker = party(
            t.taker_account_id,
            t.taker_order_id,
            t.taker_fee,
            t.taker_fee_asset,
            t.taker_remaining_quantity,
        )
        taker_buys = t.taker_side == types_pb2.SIDE_BUY
        body: TradeSettlement | Release | None = TradeSettlement(
            trade_id=t.trade_id,
            base=market.base.symbol,
            quote=market.quote.symbol,
            quantity=market.base.to_minor(t.quantity),
            quote_quantity=market.quote.to_minor(t.quote_quantity),
            buyer=taker if taker_buys else maker,
            seller=maker if taker_buys else taker,
        )
    elif kind == "cancelled" and _zero(event.cancelled.remaining_quantity):
        body = Release(event.cancelled.order_id)
    elif kind == "rejected" and _ends_order(event):
        body = Release(event.rejected.order_id)
    else:
        body = None
    return MarketEvent(event.market, event.seq, body)
