"""Match events -> order states, fills and execution reports.

A durable JetStream pull consumer on `match.events.*` (stream MATCH_EVENTS).
Each market's events are applied in one transaction that locks the market's
cursor row: events at or below the cursor are skipped (redeliveries), a gap
is filled from match's ReplayEvents before going on, and the cursor advances
in the same commit as the orders and fills it changed. Messages are acked
after the commit, so a crash only redelivers. A message that does not decode
is skipped by the chassis' `PullConsumer` and made up for by that same gap
fill. The orders' state is therefore always the fold of match's journal:
after a crash it is rebuilt, not lost.

An order's record is built here too, from the place command its accepted (or
refused) event carries: the gateway writes nothing when it places (ADR 0013),
so the journal is the only source of the read model.

Every replica runs one of these, under a durable name of its own, and each
sees every event: whichever replica takes a market's cursor lock first stores
the events, the others find them at or below the cursor and skip them. The
storing transaction also numbers each execution for every open stream session
of its account and keeps the report (`number_reports`), so the sessions'
reports do not depend on which replica stored the events or holds the session.

After each batch, stored or skipped, `sink` is told (the sessions' delivery
reads what is new for the sessions this replica holds) and callers waiting for
their own command's events (`wait`) are woken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC

from nats.js import JetStreamContext

from cex.match.v1 import match_pb2
from services.chassis import Catalog, match_event_consumer
from services.chassis.listings import learn

from .domain import (
    Execution,
    OrderRecord,
    apply_event,
    event_order_ids,
    journaled_place,
    placed_record,
)
from .store import Store
from .views import execution_report

__all__ = ["EventConsumer"]

_log = logging.getLogger("cex.order.consumer")

Replay = Callable[[str, int, int], Awaitable[Sequence[match_pb2.MatchEvent]]]
Sink = Callable[[Sequence[Execution]], None]


class EventConsumer:
    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        js: JetStreamContext,
        replay: Replay,
        sink: Sink,
        durable: str,
        inactive_threshold_s: float | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._js = js
        self._replay = replay
        self._sink = sink
        self._durable = durable
        self._inactive_threshold_s = inactive_threshold_s
        self._cursors: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self.applied = 0
        self.replayed = 0

    async def run(self) -> None:
        """Consume until cancelled (the chassis' PullConsumer: NATS being away is
        retried, an undecodable message skipped, a failed batch redelivered)."""
        await match_event_consumer(
            self._js,
            self._durable,
            self.handle,
            # Short: what a killed process had fetched but not committed comes
            # again soon (applying it twice is harmless: the cursor skips it).
            ack_wait_s=5.0,
            fetch_timeout_s=0.5,
            span="order.executions",
            retry_after_s=0.5,
            log=_log,
            inactive_threshold_s=self._inactive_threshold_s,
        ).run()

    async def handle(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        """Apply events (any markets, any order, duplicates allowed); fills gaps."""
        learn(self._catalog, events)  # a market listed (ADR 0018) before its orders
        by_market: dict[str, dict[int, match_pb2.MatchEvent]] = {}
        for event in events:
            by_market.setdefault(event.market, {})[event.seq] = event
        for market, found in by_market.items():
            await self._apply_market(market, [found[s] for s in sorted(found)])

    async def _apply_market(self, market: str, events: list[match_pb2.MatchEvent]) -> None:
        executions: list[Execution] = []
        async with self._store.market_batch(market) as batch:
            cursor = batch.cursor
            todo = [e for e in events if e.seq > cursor]
            if not todo:  # stored already (by another replica, or before a redelivery)
                self._advance(market, cursor)
                self._deliver([])
                return
            expected = range(cursor + 1, todo[-1].seq + 1)
            if [e.seq for e in todo] != list(expected):
                _log.warning(
                    "gap in %s after seq %s (got %s..%s); replaying",
                    market,
                    cursor,
                    todo[0].seq,
                    todo[-1].seq,
                )
                todo = [
                    e
                    for e in await self._replay(market, cursor + 1, todo[-1].seq)
                    if e.seq > cursor
                ]
                self.replayed += 1
                if [e.seq for e in todo] != list(expected):
                    raise RuntimeError(f"ReplayEvents({market}, {cursor + 1}) left a gap")
            ids = {oid for e in todo for oid in event_order_ids(e)}
            orders = await batch.orders(sorted(ids)) if ids else {}
            changed: dict[str, OrderRecord] = {}
            new: set[str] = set()
            for event in todo:
                for order_id in event_order_ids(event):
                    order = orders.get(order_id)
                    if order is None:
                        place = journaled_place(event)
                        if place is None:
                            continue  # placed before events carried their place
                        when = event.event_time.ToDatetime(tzinfo=UTC)
                        spec = self._catalog.markets[market]
                        order = orders[order_id] = placed_record(spec, place, when)
                        new.add(order_id)
                    execution = apply_event(order, event)
                    if execution is not None:
                        executions.append(execution)
                        changed[order_id] = order
            await batch.save(list(changed.values()), executions, todo[-1].seq, new)
            if executions:
                await batch.number_reports(executions, self._render)
            last = todo[-1].seq
        self.applied += len(todo)
        self._advance(market, last)
        self._deliver(executions)

    def _render(self, execution: Execution, sequence: int) -> bytes:
        return execution_report(execution, self._catalog, sequence).SerializeToString()

    def _deliver(self, executions: Sequence[Execution]) -> None:
        try:
            self._sink(executions)
        except Exception:
            _log.exception("delivering execution reports failed")

    def _advance(self, market: str, seq: int) -> None:
        self._cursors[market] = max(seq, self._cursors.get(market, 0))
        waiters = self._waiters.get(market)
        if not waiters:
            return
        keep = []
        for wanted, future in waiters:
            if wanted <= seq:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((wanted, future))
        self._waiters[market] = keep

    def cursor(self, market: str) -> int:
        """The market's last event seq committed here (0 before this process saw one)."""
        return self._cursors.get(market, 0)

    async def wait(self, market: str, seq: int, within_s: float) -> bool:
        """Wait until the market's events up to `seq` are applied; False on timeout."""
        if self._cursors.get(market, 0) >= seq:
            return True
        if self._cursors.get(market) is None:
            self._cursors[market] = await self._store.cursor(market)
            if self._cursors[market] >= seq:
                return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(market, []).append((seq, future))
        try:
            await asyncio.wait_for(future, within_s)
            return True
        except TimeoutError:
            return False
