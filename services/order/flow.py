"""How an order moves: validate -> risk -> the writer (reserve, match, settle) -> ack.

- Validation and risk refusals move nothing and record nothing (a retry is
  checked again).
- The place command carries the hold the order needs, its stream session and
  the fingerprint of the client's request. Match's writer, which owns balances
  (ADR 0013), reserves, matches and settles in one decision and one commit, or
  refuses the command (LEDGER_INSUFFICIENT_FUNDS) without journaling it. Order
  writes nothing on this path: the answer is computed from the command's own
  events, and the consumer builds the order's record from the same events (the
  journaled place travels in them), so a crash anywhere loses no record.
- A retry (same account and client_order_id) finds the stored order, or, while
  the consumer has not stored it yet, reaches the writer under a new order id
  and gets the first outcome: the writer keys places by client order id. Other
  fields are ALREADY_EXISTS ORDER_DUPLICATE_CLIENT_ORDER_ID either way.
- Cancel and amend are answered from the writer's result. An order this
  process answered is read as answered until the consumer stored it, and a
  read of many orders first waits (bounded) for that (`Acknowledged`).
  Open-order limits are the writer's to enforce: it counts exactly, where the
  read model lags behind the answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import grpc
from google.rpc import status_pb2
from prometheus_client import Histogram

from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from cex.risk.v1 import risk_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import (
    AlreadyExists,
    Catalog,
    ErrorDetails,
    ExchangeError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from services.chassis.fee_tiers import FeeTiers
from services.chassis.listings import Listings
from services.chassis.money import decimal_text

from .acknowledged import Acknowledged
from .config import OrderConfig
from .consumer import EventConsumer
from .domain import (
    TERMINAL,
    OrderRecord,
    answered_order,
    apply_event,
    check_amend,
    place_command,
    protection_price,
    validate_place,
)
from .downstream import TRANSIENT, Batcher, MatchClient, StatusError
from .risk_checks import RiskChecks
from .store import Store

__all__ = ["Flow", "new_order_id"]

_log = logging.getLogger("cex.order.flow")
STEP_SECONDS = Histogram(
    "order_place_step_seconds",
    "Time spent in each step of placing an order",
    ["step"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


_STEPS = {step: STEP_SECONDS.labels(step) for step in ("validate", "lookup", "risk", "match")}


class _Steps:
    """Times the steps of one order into STEP_SECONDS (where the time goes)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        _STEPS[step].observe(now - self.last)
        self.last = now


_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A match refusal that may pass (ownership moving between replicas).
_MATCH_TRANSIENT = {"MATCH_NOT_MARKET_OWNER"}


def new_order_id() -> str:
    """Time-ordered and unique: 12 hex digits of milliseconds, 10 random."""
    return f"o{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


class StoredRejection(ExchangeError):
    """The failure an order was rejected with, answered again to a retry."""


def _stored_error(order: OrderRecord) -> ExchangeError:
    code = _CODES.get(order.reject_code, grpc.StatusCode.FAILED_PRECONDITION)
    reason = order.reject_reason or "ORDER_REJECTED"
    try:
        return StoredRejection(
            reason, order.reject_message or reason, code=code, metadata={"order_id": order.order_id}
        )
    except ValueError:
        return StoredRejection(
            "ORDER_REJECTED", order.reject_message, code=code, metadata={"order_id": order.order_id}
        )


class Flow:
    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        config: OrderConfig,
        risk: RiskChecks,
        match: MatchClient,
        consumer: EventConsumer,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        fee_tiers: FeeTiers | None = None,
        listings: Listings | None = None,
    ) -> None:
        self.store = store
        # Markets listed at runtime (ADR 0018): an unknown market is asked for once.
        self.listings = listings
        # Each account's rates, followed from auth (ADR 0016); None: the config's.
        self.fee_tiers = fee_tiers
        self.catalog = catalog
        self.config = config
        self.risk = risk
        self.match = match
        self.consumer = consumer
        self.clock = clock
        # Point reads and the request log, coalesced across concurrent calls.
        self.gets: Batcher[str, OrderRecord | None] = Batcher(
            self.store.get_many, name="gets", max_batch=500
        )
        self.by_client: Batcher[tuple[str, str], OrderRecord | None] = Batcher(
            self.store.by_client_id_many, name="by_client", max_batch=500
        )
        self.requests: Batcher[tuple[str, str], tuple[str, str, bytes] | None] = Batcher(
            self.store.request_many, name="requests", max_batch=500
        )
        self.remembers: Batcher[tuple[str, str, str, str, bytes], None] = Batcher(
            self.store.remember_many, name="remembers", max_batch=500
        )
        self.acknowledged = Acknowledged(consumer.cursor)

    async def run(self) -> None:
        """The batchers' loops (until cancelled)."""
        await asyncio.gather(
            *(
                batcher.run()
                for batcher in (
                    self.gets,
                    self.by_client,
                    self.requests,
                    self.remembers,
                )
            )
        )

    async def caught_up(self, account_id: str | None) -> None:
        """Wait (bounded) until the consumer stored what this process answered the
        account (every account, with None): a read after an answer shows it."""
        wanted = self.acknowledged.awaited(account_id)
        await asyncio.gather(
            *(
                self.consumer.wait(market, seq, self.config.wait_for_consumer_s)
                for market, seq in wanted.items()
            )
        )

    def _answered(self, order: OrderRecord, result: match_pb2.CommandResult) -> None:
        if result.events:
            self.acknowledged.add(order, result.events[-1].seq)

    # -- place ---------------------------------------------------------------

    async def place(
        self,
        account_id: str,
        request: order_pb2.PlaceOrderRequest,
        *,
        session_id: str = "",
        prefix: str = "",
    ) -> OrderRecord:
        now = self.clock()
        step = _Steps()
        if self.listings is not None and request.market not in self.catalog.markets:
            await self.listings.refresh()  # listed a moment ago? (rate-limited)
        order = validate_place(request, self.catalog, now, prefix)
        step("validate")
        existing = await self.by_client.submit((account_id, order.client_order_id))
        if existing is not None:
            return _repeat(existing, order.fingerprint)
        order_id = new_order_id()
        step("lookup")
        reference = await self.risk.check(
            risk_pb2.CheckOrderRequest(
                account_id=account_id,
                market=order.market.symbol,
                action=risk_pb2.ORDER_ACTION_PLACE,
                order_id=order_id,
                client_order_id=order.client_order_id,
                side=order.side,  # type: ignore[arg-type]
                type=order.type,  # type: ignore[arg-type]
                price=request.price,
                stop_price=request.stop_price,
                quantity=request.quantity,
                quote_quantity=request.quote_quantity,
            )
        )
        step("risk")
        protection = None
        if order.is_market and order.quote_quantity is None:
            if order.type == t.ORDER_TYPE_STOP_MARKET:
                reference = order.stop_price
            elif reference is None:
                reference = await self.match.best_price(order.market.symbol, order.side)
            if reference is None:
                raise FailedPrecondition(
                    "ORDER_NO_REFERENCE_PRICE",
                    "a market order needs a reference price to bound it; the book is empty: "
                    "place a limit order, or a market buy with quote_quantity",
                )
            protection = protection_price(
                order.market, order.side, reference, self.config.market_protection
            )
        command = place_command(
            order,
            order_id=order_id,
            account_id=account_id,
            protection=protection,
            session_id=session_id,
            fees=self.fees(account_id),
            limits=self.risk.open_order_limits(account_id, order.market.symbol),
        )
        result = await self.match.submit(command)
        step("match")
        if result.status.code:
            raise _refused(result.status)
        placed = answered_order(order.market, result.events)
        if placed is None:  # every place is accepted or rejected by the book
            raise Unavailable("ORDER_MATCH_UNAVAILABLE", "matching answered the order without it")
        self._answered(placed, result)
        return placed

    def fees(self, account_id: str) -> tuple[str, str]:
        """The account's (maker, taker) rates, from this process's copy: no call."""
        if self.fee_tiers is None:
            return self.config.maker_fee_rate, self.config.taker_fee_rate
        return self.fee_tiers.rates(account_id)

    # -- lookups ---------------------------------------------------------------

    async def find(self, account_id: str, order_id: str, client_order_id: str) -> OrderRecord:
        answered = self.acknowledged.order(account_id, order_id, client_order_id)
        if answered is not None:  # newer than the store, which may not have it yet
            return answered
        if order_id:
            order = await self.gets.submit(order_id)
            if order is not None and order.account_id != account_id:
                order = None  # another account's order does not exist for this caller
        else:
            order = await self.by_client.submit((account_id, client_order_id))
        if order is None:
            raise NotFound(
                "ORDER_NOT_FOUND",
                f"no order {order_id or client_order_id!r} for this account",
            )
        return order

    async def _command(self, command: match_pb2.Command) -> match_pb2.CommandResult:
        for attempt in range(3):
            try:
                result = await self.match.submit(command)
            except Unavailable:  # the stream broke or the writer did not answer in time
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if result.status.code:
                if result.status.code in TRANSIENT and attempt < 2:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                raise StatusError(result.status, "ORDER_MATCH_REFUSED")
            return result
        raise Unavailable("ORDER_MATCH_UNAVAILABLE", "matching did not answer")

    # -- cancel ------------------------------------------------------------------

    async def cancel(
        self, order: OrderRecord, reason: int = t.CANCEL_REASON_USER_REQUESTED
    ) -> OrderRecord:
        if order.state in TERMINAL:
            if order.state == t.ORDER_STATE_CANCELLED:
                return order
            raise FailedPrecondition(
                "ORDER_ALREADY_CLOSED",
                f"the order is {t.OrderState.Name(order.state).removeprefix('ORDER_STATE_')}",  # type: ignore[arg-type]
                metadata={"order_id": order.order_id},
            )
        result = await self._command(
            match_pb2.Command(
                command_id=f"cancel:{order.order_id}",
                market=order.market,
                cancel=match_pb2.CancelCommand(
                    order_id=order.order_id,
                    account_id=order.account_id,
                    reason=reason,  # type: ignore[arg-type]
                ),
            )
        )
        answered = order.copy()
        for event in result.events:
            apply_event(answered, event)
        self._answered(answered, result)
        if answered.state in TERMINAL:
            return answered
        # Not in the book any more (filled or closed by events this answer does not
        # carry): the order as stored once the consumer passed this answer.
        await self.caught_up(order.account_id)
        return await self.gets.submit(order.order_id) or answered

    async def cancel_all(
        self,
        account_id: str,
        market: str = "",
        side: int = 0,
        reason: int = t.CANCEL_REASON_USER_REQUESTED,
        session_id: str = "",
        tag: str = "",
    ) -> list[OrderRecord]:
        await self.caught_up(account_id)
        working = await self.store.working(account_id, market, side, session_id)
        if session_id:  # only this session's orders: one cancel each
            cancelled = []
            for order in working:
                try:
                    cancelled.append(await self.cancel(order, reason))
                except ExchangeError as error:
                    _log.warning("cancel-on-disconnect of %s: %s", order.order_id, error)
            return cancelled
        answered = {order.order_id: order for order in working}
        tag = tag or uuid.uuid4().hex
        ids: list[str] = []
        for symbol in sorted({o.market for o in working}):
            result = await self._command(
                match_pb2.Command(
                    command_id=f"mass:{account_id}:{tag}",
                    market=symbol,
                    mass_cancel=match_pb2.MassCancelCommand(
                        account_id=account_id,
                        side=side,  # type: ignore[arg-type]
                        reason=reason,  # type: ignore[arg-type]
                    ),
                )
            )
            for event in result.events:
                if event.HasField("cancelled"):
                    ids.append(event.cancelled.order_id)
                    if (mine := answered.get(event.cancelled.order_id)) is not None:
                        apply_event(mine, event)
                        self._answered(mine, result)
        unknown = [i for i in ids if i not in answered]  # stored while this ran
        for stored in await self.store.get_many(unknown) if unknown else []:
            if stored is not None:
                answered[stored.order_id] = stored
        return [answered[i] for i in ids if i in answered]

    # -- amend -------------------------------------------------------------------

    async def amend(
        self, order: OrderRecord, price: Decimal | None, quantity: Decimal | None, tag: str
    ) -> OrderRecord:
        if order.state in TERMINAL:
            raise FailedPrecondition(
                "ORDER_ALREADY_CLOSED", "the order is closed", metadata={"order_id": order.order_id}
            )
        market = self.catalog.markets[order.market]
        check_amend(order, market, price, quantity)
        new_qty = quantity if quantity is not None else order.quantity
        assert new_qty is not None
        await self.risk.check(
            risk_pb2.CheckOrderRequest(
                account_id=order.account_id,
                market=order.market,
                action=risk_pb2.ORDER_ACTION_AMEND,
                order_id=order.order_id,
                client_order_id=order.client_order_id,
                side=order.side,  # type: ignore[arg-type]
                type=order.type,  # type: ignore[arg-type]
                price=decimal_text(price if price is not None else order.price),
                stop_price=decimal_text(order.stop_price),
                quantity=decimal_text(new_qty - order.filled_quantity),
            )
        )
        result = await self._command(
            match_pb2.Command(
                command_id=f"amend:{order.order_id}:{tag}",
                market=order.market,
                amend=match_pb2.AmendCommand(
                    order_id=order.order_id,
                    account_id=order.account_id,
                    price=decimal_text(price),
                    quantity=decimal_text(quantity),
                ),
            )
        )
        for event in result.events:
            if event.HasField("rejected"):
                r = event.rejected
                raise FailedPrecondition(
                    r.reason if r.reason.startswith("MATCH_") else "ORDER_AMEND_REJECTED",
                    r.message or "matching refused the amend",
                    metadata={"order_id": order.order_id},
                )
        answered = order.copy()
        for event in result.events:
            apply_event(answered, event)
        self._answered(answered, result)
        return answered


def _repeat(existing: OrderRecord, fingerprint: str) -> OrderRecord:
    """A place whose (account, client_order_id) is stored: the same order, or refused."""
    if existing.fingerprint != fingerprint:
        raise AlreadyExists(
            "ORDER_DUPLICATE_CLIENT_ORDER_ID",
            "this client_order_id was used for another order",
            metadata={"order_id": existing.order_id},
        )
    if existing.phase == "failed":  # refused before the writer answered places (ADR 0013)
        raise _stored_error(existing)
    return existing


def _refused(status: status_pb2.Status) -> ExchangeError:
    """A place the writer did not accept: transient, another order's key, or refused."""
    details = ErrorDetails.from_status(status)
    if status.code in TRANSIENT or details.reason in _MATCH_TRANSIENT:
        return StatusError(status, "ORDER_MATCH_UNAVAILABLE")
    if details.reason == "MATCH_DUPLICATE_CLIENT_ORDER_ID":
        return AlreadyExists(
            "ORDER_DUPLICATE_CLIENT_ORDER_ID",
            "this client_order_id was used for another order",
            metadata=details.metadata,
        )
    return StatusError(status, "ORDER_MATCH_REFUSED")
