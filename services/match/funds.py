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
from typing import Any

from prometheus_client import Counter

from cex.match.v1 import match_pb2
from services.chassis import Catalog, ExchangeError, InvalidArgument, Market, MoneyError
from services.chassis.db import Statement
from services.ledger.domain import (
    Account,
    Book,
    Kind,
    Op,
    Outcome,
    State,
    Transfer,
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

    def listed(self, market: Market) -> None:
        """A market listed at runtime (ADR 0018): its trades settle from now on (its
        definition replaces one whose listing failed to commit)."""
        self._catalog.add(market, replace=True)

    def like(self) -> Funds:
        """Funds on the same tables and catalog, holding nothing yet (for a replay)."""
        return Funds(self._store, self._catalog)

    async def load(self) -> None:
        """The ledger's tables as the last commit left them."""
        async with self._store.pool.acquire() as conn, conn.transaction():
            await _ledger_schema(conn)
            self.book = await self._store.load_book(conn)
        self._index_expiring()

    def _index_expiring(self) -> None:
        """The heap of holds with a timeout, from the book's open holds."""
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

    def transfers(
        self, command: match_pb2.TransfersCommand, ts: int
    ) -> tuple[list[Outcome], match_pb2.FundsEffects]:
        """The ledger's transfers, a linked run all or none; and what they changed."""
        self.book.now_ns = _microseconds(ts)
        marks = len(self.book.new_transfers), len(self.book.expired)
        items = [_input(t) for t in command.transfers]
        outcomes = apply_transfers(self.book, items, [t.linked for t in command.transfers])
        self._expiring_from(marks[0])
        return outcomes, self._effects(marks, command.transfers)

    def _expiring_from(self, mark: int) -> None:
        for record in self.book.new_transfers[mark:]:
            if record.expires_at_ns is not None and record.state == State.PENDING:
                heapq.heappush(self._expiring, (record.expires_at_ns, record.id))

    def _effects(
        self, marks: tuple[int, int], asked: Sequence[match_pb2.FundsTransfer] = ()
    ) -> match_pb2.FundsEffects:
        created = {t.id for t in self.book.new_transfers[marks[0] :]}
        effects = match_pb2.FundsEffects(expired=self.book.expired[marks[1] :])
        for transfer in asked:
            if transfer.id in created:  # once: a repeat of an id in one command changed nothing
                created.discard(transfer.id)
                effects.created.append(transfer)
                effects.created[-1].linked = False
        return effects

    def replay(self, effects: match_pb2.FundsEffects, ts: int) -> None:
        """Re-apply what a journaled funds command changed (a replay from a snapshot)."""
        self.book.now_ns = _microseconds(ts)
        for transfer_id in effects.expired:
            if not self.book.expire_due(self.book.transfers[transfer_id]):
                raise ValueError(f"replay: hold {transfer_id} did not expire as journaled")
        mark = len(self.book.new_transfers)
        outcomes = self.book.apply_chain([_input(t) for t in effects.created])
        for transfer, outcome in zip(effects.created, outcomes, strict=True):
            if isinstance(outcome, ExchangeError):
                raise ValueError(f"replay: transfer {transfer.id} failed: {outcome.reason}")
        self._expiring_from(mark)

    def next_expiry(self) -> int | None:
        """When the earliest hold with a timeout expires (None: none has one)."""
        while self._expiring:
            at, transfer_id = self._expiring[0]
            found = self.book.transfers.get(transfer_id)
            if found is not None and found.state == State.PENDING:
                return at
            heapq.heappop(self._expiring)
        return None

    def expire(self, ts: int) -> match_pb2.FundsEffects:
        """Expire every hold whose timeout has passed by `ts`."""
        self.book.now_ns = _microseconds(ts)
        marks = len(self.book.new_transfers), len(self.book.expired)
        while self._expiring and self._expiring[0][0] <= self.book.now_ns:
            _, transfer_id = heapq.heappop(self._expiring)
            found = self.book.transfers.get(transfer_id)
            if found is not None:
                self.book.expire_due(found)
        return self._effects(marks)

    # ------------------------------------------------------------------ state

    def document(self) -> dict[str, Any]:
        """Every balance and open hold, as rows of plain values (a snapshot's part).

        An account at zero in every column (nothing ever posted, nothing pending) is
        left out: it is the same as no account, and whether the ledger's tables hold
        its row depends on batching (an escrow account whose holds were all voided is
        stored only if a batch ended while one was open), which a replay cannot know."""
        book = self.book
        return {
            "last_sequence": book.last_sequence,
            "accounts": sorted(
                [a.account_id, a.asset, *a.values]
                for a in book.accounts.values()
                if (a.stored or a.changed) and any(a.values)
            ),
            "holds": sorted(
                [getattr(t, name) for name in _HOLD_FIELDS]
                for t in book.transfers.values()
                if t.op == Op.PENDING and t.state == State.PENDING
            ),
        }

    def restore(self, document: dict[str, Any]) -> None:
        """The balances of a snapshot's `document()` (a replay starts from them)."""
        book = Book(
            now_ns=0, last_sequence=document["last_sequence"], halted=False, assets=self.book.assets
        )
        for account_id, asset, dp, cp, dpe, cpe in document["accounts"]:
            book.accounts[(account_id, asset)] = Account(
                account_id, asset, dp, cp, dpe, cpe, stored=(dp, cp, dpe, cpe)
            )
        for row in document["holds"]:
            hold = Transfer(**dict(zip(_HOLD_FIELDS, row, strict=True)))
            hold.op, hold.kind, hold.state = Op(hold.op), Kind(hold.kind), State(hold.state)
            hold.stored = (hold.state, hold.remaining)
            book.transfers[hold.id] = hold
        self.book = book
        self._index_expiring()

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


_HOLD_FIELDS = tuple(f for f in Transfer.__dataclass_fields__ if f != "stored")


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
