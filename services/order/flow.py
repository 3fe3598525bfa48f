"""How an order moves: validate -> risk -> record -> match (reserve, match, settle) -> ack.

- Validation and risk refusals move nothing and record nothing (a retry is
  checked again).
- The order is recorded (PENDING_NEW, phase `recorded`) before it is sent;
  (account, client_order_id) is unique, so a retry finds it.
- The match command `place:<order_id>` carries the hold the order needs
  (`hold_for`); match's writer, which owns balances (ADR 0013), reserves it,
  matches and settles in one decision and one commit, or refuses the command
  (LEDGER_INSUFFICIENT_FUNDS) without journaling it. The command is
  idempotent by id; `drive` sends it and is safe to repeat. The reconciler
  repeats it for orders left `recorded` (a crash, a timeout), so every
  recorded order ends placed or rejected.
- Once match journaled the order, its outcome is match's events: the answer is
  computed from the command's own events, and the consumer stores them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
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

from .config import OrderConfig
from .consumer import EventConsumer
from .domain import (
    TERMINAL,
    OrderRecord,
    apply_event,
    check_amend,
    hold_for,
    new_record,
    protection_price,
    validate_place,
)
from .downstream import Batcher, MatchClient, StatusError
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


_STEPS = {
    step: STEP_SECONDS.labels(step) for step in ("validate", "lookup", "risk", "record", "match")
}


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


def _d(value: Decimal | None) -> str:
    if value is None:
        return ""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


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
        consumer: EventConsumer | None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.config = config
        self.risk = risk
        self.match = match
        self.consumer = consumer
        self.clock = clock
        self.inserts: Batcher[OrderRecord, bool] = Batcher(
            self.store.insert_many, name="inserts", max_batch=500
        )
        self.phases: Batcher[str, None] = Batcher(self._mark_placed, name="phases", max_batch=2000)
        self.lookups: Batcher[tuple[str, str, str], tuple[OrderRecord | None, int, int]] = Batcher(
            self.store.lookup_many, name="lookups", max_batch=500
        )
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
        self._background: set[asyncio.Task[None]] = set()
        # The latest event seq per market seen in match's answers to this process:
        # a read of an order placed here waits (bounded) for the consumer to store it.
        self._seen: dict[str, int] = {}

    async def _mark_placed(self, order_ids: list[str]) -> list[None]:
        await self.store.set_phase(order_ids, "placed")
        return [None] * len(order_ids)

    async def run(self) -> None:
        """The batchers' loops (until cancelled)."""
        await asyncio.gather(
            *(
                batcher.run()
                for batcher in (
                    self.inserts,
                    self.phases,
                    self.lookups,
                    self.gets,
                    self.by_client,
                    self.requests,
                    self.remembers,
                )
            )
        )

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
        order = validate_place(request, self.catalog, now, prefix)
        step("validate")
        existing, open_orders, market_open = await self.lookups.submit(
            (account_id, order.client_order_id, order.market.symbol)
        )
        if existing is not None:
            return await self._repeat(existing, order.fingerprint)
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
                open_orders=open_orders,
                market_open_orders=market_open,
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
        record = new_record(
            order,
            order_id=order_id,
            account_id=account_id,
            now=now,
            protection=protection,
            hold=hold_for(order, protection),
            session_id=session_id,
        )
        if not await self.inserts.submit(record):
            existing = await self.by_client.submit((account_id, order.client_order_id))
            assert existing is not None
            return await self._repeat(existing, order.fingerprint)
        step("record")
        return await self.drive(record, step)

    async def _repeat(self, existing: OrderRecord, fingerprint: str) -> OrderRecord:
        if existing.fingerprint != fingerprint:
            raise AlreadyExists(
                "ORDER_DUPLICATE_CLIENT_ORDER_ID",
                "this client_order_id was used for another order",
                metadata={"order_id": existing.order_id},
            )
        if existing.phase == "failed":
            raise _stored_error(existing)
        if existing.phase == "recorded":
            return await self.drive(existing)
        return existing

    def _place_command(self, order: OrderRecord) -> match_pb2.Command:
        place = match_pb2.PlaceCommand(
            order_id=order.order_id,
            client_order_id=order.client_order_id,
            account_id=order.account_id,
            side=order.side,  # type: ignore[arg-type]
            type=order.type,  # type: ignore[arg-type]
            time_in_force=order.time_in_force,  # type: ignore[arg-type]
            self_trade_prevention=order.self_trade_prevention,  # type: ignore[arg-type]
            price=_d(order.protection_price if order.protection_price else order.price),
            stop_price=_d(order.stop_price),
            quantity=_d(order.quantity),
            quote_quantity=_d(order.quote_quantity),
            post_only=order.post_only,
            maker_fee_rate=self.config.maker_fee_rate,
            taker_fee_rate=self.config.taker_fee_rate,
            hold_asset=order.hold_asset,
            hold_amount=self.catalog.assets[order.hold_asset].format(order.hold_amount),
        )
        if order.expire_time is not None:
            place.expire_time.FromDatetime(order.expire_time)
        return match_pb2.Command(
            command_id=f"place:{order.order_id}", market=order.market, place=place
        )

    async def drive(self, order: OrderRecord, step: _Steps | None = None) -> OrderRecord:
        """Place in match (idempotent: reserve, match, settle); the order as of its answer."""
        step = step or _Steps()
        result = await self.match.submit(self._place_command(order))
        step("match")
        if result.status.code:
            reason = ErrorDetails.from_status(result.status).reason
            if result.status.code in _TRANSIENT_CODES or reason in _MATCH_TRANSIENT:
                raise StatusError(result.status, "ORDER_MATCH_UNAVAILABLE")
            await self._fail(order, result.status)
            raise StatusError(result.status, "ORDER_MATCH_REFUSED")
        # Bookkeeping off the answer's path: if it is lost the reconciler drives
        # the order again, which finds the hold and match's first answer.
        if result.events:
            self._saw(order.market, result.events[-1].seq)
        task = asyncio.create_task(self.phases.submit(order.order_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        view = order.copy()
        view.phase = "placed"
        for event in result.events:
            apply_event(view, event)
        return view

    async def _fail(self, order: OrderRecord, status: status_pb2.Status) -> None:
        details = ErrorDetails.from_status(status)
        await self.store.fail(
            order.order_id,
            code=status.code,
            reason=details.reason or "ORDER_REJECTED",
            message=details.message,
            domain=details.domain,
            now=self.clock(),
        )

    async def recover(self) -> int:
        """Drive every order recorded but not placed for a while; returns how many."""
        older = self.clock() - timedelta(seconds=self.config.recover_after_s)
        stuck = await self.store.unplaced(older)
        done = 0
        for order in stuck:
            try:
                await self.drive(order)
                done += 1
            except ExchangeError as error:
                _log.info("recovering %s: %s", order.order_id, error.reason)
        return done

    # -- lookups ---------------------------------------------------------------

    async def find(self, account_id: str, order_id: str, client_order_id: str) -> OrderRecord:
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
        if order.state == t.ORDER_STATE_PENDING_NEW:
            # Acknowledged from match's answer, not stored by the consumer yet:
            # read your own writes (waits only in that window).
            seen = self._seen.get(order.market, 0)
            if self.consumer is not None and seen:
                await self.consumer.wait(order.market, seen, self.config.wait_for_consumer_s)
                order = await self.gets.submit(order.order_id) or order
        return order

    def _saw(self, market: str, seq: int) -> None:
        if seq > self._seen.get(market, 0):
            self._seen[market] = seq

    async def _settled(self, market: str, events: Sequence[match_pb2.MatchEvent]) -> None:
        """Wait (bounded) until the consumer stored these events."""
        if self.consumer is not None and events:
            await self.consumer.wait(market, events[-1].seq, self.config.wait_for_consumer_s)

    async def _placed(self, order: OrderRecord) -> OrderRecord:
        """An order match knows about (a recorded one is driven first)."""
        if order.phase == "recorded":
            return await self.drive(order)
        if order.phase == "failed":
            raise _stored_error(order)
        return order

    async def _command(self, command: match_pb2.Command) -> match_pb2.CommandResult:
        for attempt in range(3):
            try:
                result = await self.match.submit(command)
            except StatusError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if result.status.code:
                if result.status.code in _TRANSIENT_CODES and attempt < 2:
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
        order = await self._placed(order)
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
        await self._settled(order.market, result.events)
        latest = await self.gets.submit(order.order_id)
        assert latest is not None
        if latest.state not in TERMINAL:
            # The consumer is behind: answer from the command's own events.
            for event in result.events:
                apply_event(latest, event)
        return latest

    async def cancel_all(
        self,
        account_id: str,
        market: str = "",
        side: int = 0,
        reason: int = t.CANCEL_REASON_USER_REQUESTED,
        session_id: str = "",
        tag: str = "",
    ) -> list[OrderRecord]:
        working = await self.store.working(account_id, market, side, session_id)
        for order in working:
            if order.phase == "recorded":
                # rejected or still unreachable: nothing to cancel in the book
                with contextlib.suppress(ExchangeError):
                    await self.drive(order)
        if session_id:  # only this session's orders: one cancel each
            cancelled = []
            for order in working:
                fresh = await self.store.get(order.order_id)
                if fresh is not None and fresh.state not in TERMINAL:
                    try:
                        cancelled.append(await self.cancel(fresh, reason))
                    except ExchangeError as error:
                        _log.warning("cancel-on-disconnect of %s: %s", order.order_id, error)
            return cancelled
        markets = sorted({o.market for o in working})
        tag = tag or uuid.uuid4().hex
        ids: list[str] = []
        for symbol in markets:
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
            ids += [e.cancelled.order_id for e in result.events if e.HasField("cancelled")]
            await self._settled(symbol, result.events)
        if not ids:
            return []
        return [found for found in await self.store.get_many(ids) if found is not None]

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
        order = await self._placed(order)
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
                price=_d(price if price is not None else order.price),
                stop_price=_d(order.stop_price),
                quantity=_d(new_qty - order.filled_quantity),
            )
        )
        result = await self._command(
            match_pb2.Command(
                command_id=f"amend:{order.order_id}:{tag}",
                market=order.market,
                amend=match_pb2.AmendCommand(
                    order_id=order.order_id,
                    account_id=order.account_id,
                    price=_d(price),
                    quantity=_d(quantity),
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
        await self._settled(order.market, result.events)
        latest = await self.gets.submit(order.order_id)
        assert latest is not None
        for event in result.events:
            apply_event(latest, event)  # no-op where the consumer already did
        return latest


_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.ABORTED.value[0],
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.CANCELLED.value[0],
        grpc.StatusCode.UNKNOWN.value[0],
        grpc.StatusCode.INTERNAL.value[0],
    }
)
