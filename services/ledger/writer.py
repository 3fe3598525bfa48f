"""Group commit: one asyncio task drains a queue of jobs into one transaction.

Every change to the ledger (client transfers, settlement of match events, hold
expiry) is a `Job`: it says what it reads (`needs`) and applies itself to the
loaded `Book`. The writer takes whatever jobs are waiting (up to `max_items`
transfers), runs them in one transaction in arrival order, commits
(synchronous_commit stays on: one fsync for the whole group) and only then
answers each job. If the group fails for a reason other than the database
being unreachable, each job is retried alone so one bad job cannot fail others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from services.chassis import ExchangeError, InvalidArgument, Unavailable
from services.chassis.interceptors import lost_dependency

from .domain import Book, Outcome, TransferInput, split_chains
from .settlement import (
    ESCROW_ACCOUNT,
    FEE_ACCOUNT,
    Applied,
    Gap,
    MarketEvent,
    Release,
    TradeSettlement,
    apply_events,
    hold_id,
)
from .store import Needs, Store

__all__ = ["ExpireJob", "Job", "SettleJob", "TransfersJob", "Writer"]

_log = logging.getLogger("cex.ledger.writer")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Job(Protocol[T_co]):
    @property
    def size(self) -> int: ...

    def needs(self) -> Needs: ...

    def apply(self, book: Book) -> T_co: ...


@dataclass(frozen=True, slots=True)
class TransfersJob:
    """One CreateTransfers request: items already parsed (or failed parsing)."""

    items: Sequence[TransferInput | ExchangeError]
    linked: Sequence[bool]  # the request's flags.linked, failed items included

    @property
    def size(self) -> int:
        return len(self.items)

    def needs(self) -> Needs:
        needs = Needs()
        for item in self.items:
            if isinstance(item, ExchangeError):
                continue
            needs.transfer_ids.add(item.id)
            if item.pending_id:
                needs.transfer_ids.add(item.pending_id)
            if item.asset:
                needs.accounts.add((item.debit_account_id, item.asset))
                needs.accounts.add((item.credit_account_id, item.asset))
        return needs

    def apply(self, book: Book) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for indices, closed in split_chains(self.linked):
            chain = [self.items[i] for i in indices]
            if not closed:
                outcomes.extend(
                    InvalidArgument(
                        "LEDGER_LINKED_EVENT_CHAIN_OPEN",
                        "the last transfer of the request is flagged linked",
                    )
                    for _ in chain
                )
                continue
            outcomes.extend(book.apply_chain(chain))
        return outcomes


@dataclass(frozen=True, slots=True)
class SettleJob:
    """Consecutive match events of one market."""

    market: str
    events: Sequence[MarketEvent]

    @property
    def size(self) -> int:
        return 8 * len(self.events)

    def needs(self) -> Needs:
        needs = Needs(markets={self.market})
        for event in self.events:
            body = event.body
            if isinstance(body, Release):
                needs.transfer_ids |= {hold_id(body.order_id), f"release:{body.order_id}"}
            elif isinstance(body, TradeSettlement):
                needs.trades.add((event.market, body.trade_id))
                prefix = f"trade:{event.market}:{body.trade_id}"
                for role in ("buyer", "seller"):
                    for leg in ("hold", "direct", "receive", "fee"):
                        needs.transfer_ids.add(f"{prefix}:{role}-{leg}")
                for party in (body.buyer, body.seller):
                    needs.transfer_ids |= {
                        hold_id(party.order_id),
                        f"release:{party.order_id}",
                    }
                    for asset in (body.base, body.quote, party.fee_asset):
                        needs.accounts.add((party.account_id, asset))
                    needs.accounts.add((FEE_ACCOUNT, party.fee_asset))
                for asset in (body.base, body.quote):
                    needs.accounts.add((ESCROW_ACCOUNT, asset))
        return needs

    def apply(self, book: Book) -> tuple[Applied | Gap, list[str]]:
        """The outcome and the kinds of the anomalies it recorded."""
        before = len(book.anomalies)
        result = apply_events(book, self.market, self.events)
        return result, [a.kind for a in book.anomalies[before:]]


@dataclass(frozen=True, slots=True)
class ExpireJob:
    """Holds whose timeout passed (found by the sweeper)."""

    ids: Sequence[str]

    @property
    def size(self) -> int:
        return len(self.ids)

    def needs(self) -> Needs:
        return Needs(transfer_ids=set(self.ids))

    def apply(self, book: Book) -> int:
        expired = 0
        for transfer_id in self.ids:
            found = book.transfer(transfer_id)
            if found is not None and book.expire_due(found):
                expired += 1
        return expired


@dataclass(slots=True)
class _Waiting(Generic[T]):
    job: Job[T]
    future: asyncio.Future[T]


class Writer:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], int],
        *,
        max_items: int = 4000,
        on_group: Callable[[int, int], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_items = max_items
        self._on_group = on_group
        self._queue: asyncio.Queue[_Waiting[Any]] = asyncio.Queue()

    async def submit(self, job: Job[T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(job, future))
        return await future

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            group = [first]
            items = first.job.size
            while items < self._max_items and not self._queue.empty():
                waiting = self._queue.get_nowait()
                group.append(waiting)
                items += waiting.job.size
            await self._commit_group(group)
            if self._on_group is not None:
                self._on_group(len(group), items)

    async def _commit_group(self, group: list[_Waiting[Any]]) -> None:
        try:
            results = await self._transaction([w.job for w in group])
        except Exception as error:
            if lost_dependency(error, "LEDGER") is not None:
                _log.warning("group commit failed: database unreachable: %r", error)
                for waiting in group:
                    _fail(waiting.future, Unavailable("LEDGER_UNAVAILABLE", "database unreachable"))
                return
            if len(group) == 1:
                _log.exception("ledger job failed")
                _fail(group[0].future, RuntimeError("ledger job failed"))
                return
            for waiting in group:  # isolate the job that fails
                await self._commit_group([waiting])
            return
        for waiting, result in zip(group, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)

    async def _transaction(self, jobs: list[Job[Any]]) -> list[Any]:
        needs = Needs()
        for job in jobs:
            needs.merge(job.needs())
        async with self._store.pool.acquire() as conn, conn.transaction():
            now_ns = self._clock() // 1000 * 1000  # PostgreSQL keeps microseconds
            book = await self._store.load(conn, needs, now_ns)
            results = [job.apply(book) for job in jobs]
            await self._store.save(conn, book)
        return results


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
