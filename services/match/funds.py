"""The group's balances: the ledger's rules, run by the writer that owns them (ADR 0013).

The writer keeps every account and every open hold of the ledger in memory,
as one long-lived `Book` (services/ledger/domain.py), and decides with it, in
the order it decides everything else:
- R1, before an order reaches the book: the hold `hold:<order_id>` of what the
  order can spend (PlaceCommand.hold_asset/hold_amount), refused with
  LEDGER_INSUFFICIENT_FUNDS when the account has too little available;
- R2, after the book: each trade settled and each finished order's hold
  released, by the ledger's settlement rules (services/ledger/settlement.py)
  on the command's own events;
- the ledger's transfers (TransfersCommand: deposits, withdrawals' holds,
  posts and voids) and the expiry of holds whose timeout passed.
What a batch changed is written to the ledger's tables in the writer's own
transaction, the one that commits its journal: a batch's orders, trades and
balances are durable together or not at all. The tables are therefore the
balances as of the journal's last commit, and a restarted writer reads them
back (`load`) rather than replaying the journal into them.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from prometheus_client import Counter

from cex.match.v1 import match_pb2
from services.chassis import Catalog, ExchangeError, InvalidArgument, MoneyError
from services.chassis.db import Statement
from services.ledger.domain import (
    Book,
    Kind,
    Op,
    Outcome,
    State,
    TransferInput,
    apply_transfers,
)
from services.ledger.settlement import (
    ESCROW_ACCOUNT,
    MarketEvent,
    Unreadable,
    apply_events,
    hold_id,
    to_market_event,
)
from services.ledger.store import Connection, Store

__all__ = ["Funds"]

SETTLED = Counter("ledger_settled_trades", "Trades settled by the balance owner (match's writer)")
ANOMALIES = Counter(
    "ledger_settlement_anomalies",
    "Settlement anomalies (missing or short holds, fees not charged)",
    ["kind"],
)

_OPS = {
    match_pb2.FundsTransfer.OP_SINGLE: Op.SINGLE,
    match_pb2.FundsTransfer.OP_PENDING: Op.PENDING,
    match_pb2.FundsTransfer.OP_POST: Op.POST,
    match_pb2.FundsTransfer.OP_VOID: Op.VOID,
}


def _microseconds(ts: int) -> int:
    return ts // 1000 * 1000  # PostgreSQL keeps microseconds


class Funds:
    """Balances and open holds of the group, and the batch's changes to them."""

    def __init__(self, store: Store, catalog: Catalog) -> None:
        self._store = store
        self._catalog = catalog
        self.book = Book(now_ns=0, last_sequence=0, halted=False, assets=store.assets)
        self._expiring: list[tuple[int, str]] = []  # (expires_at_ns, hold id), a heap
        self._fetched: set[str] = set()

    async def load(self) -> None:
        """The ledger's tables as the last commit left them."""
        async with self._store.pool.acquire() as conn, conn.transaction():
            await _ledger_schema(conn)
            self.book = await self._store.load_book(conn)
        self._expiring = [
            (t.expires_at_ns, t.id)
            for t in self.book.transfers.values()
            if t.expires_at_ns is not None
        ]
        heapq.heapify(self._expiring)

    async def fetch(self, ids: Sequence[str]) -> None:
        """Bring the named transfers and failures into memory (before a batch that
        names them: a transfer id is idempotent for as long as the ledger exists)."""
        async with self._store.pool.acquire() as conn, conn.transaction():
            await _ledger_schema(conn)
            await self._store.load_transfers(conn, self.book, ids)
        self._fetched.update(ids)

    # ------------------------------------------------------------------ decide

    def reserve(self, place: match_pb2.PlaceCommand, ts: int) -> ExchangeError | None:
        """R1: hold what the order can spend; the refusal, if the account cannot."""
        if not place.hold_asset:
            return None
        asset = self._catalog.assets.get(place.hold_asset)
        if asset is None:
            return InvalidArgument(
                "MATCH_INVALID_HOLD", f"command.place.hold_asset: no asset {place.hold_asset!r}"
            )
        try:
            amount = asset.to_minor(place.hold_amount)
        except MoneyError as error:
            return InvalidArgument("MATCH_INVALID_HOLD", f"command.place.hold_amount: {error}")
        self.book.now_ns = _microseconds(ts)
        (outcome,) = self.book.apply_chain(
            [
                TransferInput(
                    id=hold_id(place.order_id),
                    op=Op.PENDING,
                    debit_account_id=place.account_id,
                    credit_account_id=ESCROW_ACCOUNT,
                    asset=asset.symbol,
                    amount=amount,
                    kind=Kind.ORDER_HOLD,
                    reference=place.order_id,
                )
            ]
        )
        return outcome if isinstance(outcome, ExchangeError) else None

    def settle(self, events: Sequence[match_pb2.MatchEvent], ts: int) -> None:
        """R2: settle the command's trades and release what finished orders still hold."""
        if not events:
            return
        self.book.now_ns = _microseconds(ts)
        before = len(self.book.anomalies)
        SETTLED.inc(apply_events(self.book, [self._market_event(e) for e in events]))
        for anomaly in self.book.anomalies[before:]:
            ANOMALIES.labels(anomaly.kind).inc()

    def _market_event(self, event: match_pb2.MatchEvent) -> MarketEvent:
        try:
            return to_market_event(self._catalog, event)
        except (MoneyError, KeyError) as error:
            return MarketEvent(event.market, event.seq, Unreadable(repr(error)[:500]))

    def transfers(self, command: match_pb2.TransfersCommand, ts: int) -> list[Outcome]:
        """The ledger's transfers, a linked run all or none."""
        self.book.now_ns = _microseconds(ts)
        items = [_input(t) for t in command.transfers]
        outcomes = apply_transfers(self.book, items, [t.linked for t in command.transfers])
        for record in self.book.new_transfers:
            if record.expires_at_ns is not None and record.state == State.PENDING:
                heapq.heappush(self._expiring, (record.expires_at_ns, record.id))
        return outcomes

    def next_expiry(self) -> int | None:
        """When the earliest hold with a timeout expires (None: none has one)."""
        while self._expiring:
            at, transfer_id = self._expiring[0]
            found = self.book.transfers.get(transfer_id)
            if found is not None and found.state == State.PENDING:
                return at
            heapq.heappop(self._expiring)
        return None

    def expire(self, ts: int) -> int:
        """Expire every hold whose timeout has passed by `ts`; how many."""
        self.book.now_ns = _microseconds(ts)
        expired = 0
        while self._expiring and self._expiring[0][0] <= self.book.now_ns:
            _, transfer_id = heapq.heappop(self._expiring)
            found = self.book.transfers.get(transfer_id)
            if found is not None and self.book.expire_due(found):
                expired += 1
        return expired

    # ------------------------------------------------------------------ store

    def save(self, statement: Statement) -> None:
        """The batch's changes, if any, as writes of the writer's one-statement commit."""
        book = self.book
        if book.touched_accounts or book.touched_transfers or book.new_failures or book.anomalies:
            self._store.save(statement, book)

    def saved(self) -> None:
        """After the commit: keep balances and open holds, forget the rest."""
        book = self.book
        seen = {t.id for t in book.new_transfers} | set(book.touched_transfers) | self._fetched
        book.saved()
        for transfer_id in seen:
            found = book.transfers.get(transfer_id)
            if found is not None and (found.op != Op.PENDING or found.state != State.PENDING):
                del book.transfers[transfer_id]
        self._fetched.clear()
        book.failures.clear()
        book.settled_trades.clear()


def _input(t: match_pb2.FundsTransfer) -> TransferInput | ExchangeError:
    op = _OPS.get(t.op)
    if op is None:
        return InvalidArgument("LEDGER_FLAGS_INVALID", f"{t.id}: no operation")
    return TransferInput(
        id=t.id,
        op=op,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        asset=t.asset,
        amount=t.amount or (0 if op in (Op.SINGLE, Op.PENDING) else None),
        pending_id=t.pending_id,
        linked=t.linked,
        timeout_ns=t.timeout_ns,
        kind=Kind(t.kind) if t.kind in Kind._value2member_map_ else Kind.UNSPECIFIED,
        reference=t.reference,
    )


async def _ledger_schema(conn: Connection) -> None:
    """The ledger's tables first for the rest of this transaction."""
    await conn.execute("SET LOCAL search_path TO ledger")
