"""The single writer of one market: recovery, group commit, snapshots, the event log.

Commands queue up while the previous batch commits; the writer takes everything
queued (up to ``max_batch``), applies it to the engine in order, and writes the
whole batch (each command with its events) to the journal in one transaction.
Only then are the commands answered, their events released to the publisher
and to ReplayEvents followers, and the book shown to GetOrderBook: the lock
held across apply and commit means nobody outside sees a state the journal
does not hold. If the commit fails, the engine may be ahead of the journal, so
the writer rebuilds it from the journal before taking more work and answers
the batch UNAVAILABLE (a retry with the same command ids is safe: if the
commit did land, the retry finds the commands and returns their results).

Time enters as a command: a ticker sends the writer an ``expire`` command (id
``expire:<ns>``) as soon as the book's earliest GTD order is due, so an idle
market expires its orders, and releases their funds, on time, and the expiry
is journaled and replayed like any other change.

Recovery loads the latest snapshot and re-applies every journaled command
after it, checking that each produces exactly the events journaled with it: a
replay that disagrees with the journal stops the market rather than serve a
book that differs from the one that was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.propagate import inject

from cex.match.v1 import match_pb2
from services.chassis import AlreadyExists, ExchangeError, Market, Unavailable
from services.chassis.tracing import Context

from .engine import Decoded, MarketEngine, decode
from .store import Entry, Journal, Snapshot

__all__ = ["JournalMismatch", "MarketWriter"]

_log = logging.getLogger("cex.match.writer")
_OK = status_pb2.Status()
_RECOVERY_PAGE = 2_000
_READ_PAGE = 500
_TRACED_COMMANDS = 10_000  # trace contexts kept for the publisher (command_seq -> carrier)
_tracer = trace.get_tracer("cex.match")


class JournalMismatch(RuntimeError):
    """Replaying the journal did not reproduce the journaled events."""


@dataclass(slots=True)
class _Pending:
    decoded: Decoded
    body: bytes
    future: asyncio.Future[match_pb2.CommandResult]
    span: trace.Span | None = None


def _pack(events: Sequence[match_pb2.MatchEvent]) -> bytes:
    return match_pb2.ReplayEventsResponse(events=events).SerializeToString()


def _unpack(data: bytes) -> list[match_pb2.MatchEvent]:
    return list(match_pb2.ReplayEventsResponse.FromString(data).events)


def _failed(command: match_pb2.Command, error: ExchangeError) -> match_pb2.CommandResult:
    return match_pb2.CommandResult(
        command_id=command.command_id, market=command.market, status=error.to_status("match")
    )


class MarketWriter:
    def __init__(
        self,
        market: Market,
        journal: Journal,
        *,
        clock: Callable[[], int],
        max_batch: int = 500,
        snapshot_every: int = 5_000,
        recent_events: int = 50_000,
        tick_s: float = 0.1,
    ) -> None:
        self.market = market
        self.engine = MarketEngine(market)
        self._journal = journal
        self._clock = clock
        self._max_batch = max_batch
        self._snapshot_every = snapshot_every
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._committed = asyncio.Condition()
        self._recent: deque[match_pb2.MatchEvent] = deque(maxlen=recent_events)
        self._snapshot_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tick_s = tick_s
        self.committed_seq = 0  # last event seq the journal holds
        # W3C trace context of traced commands, by command_seq, until published.
        self.trace_of: dict[int, dict[str, str]] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._recover()
        self._task = asyncio.create_task(self._run(), name=f"writer-{self.market.symbol}")
        self._ticker = asyncio.create_task(self._tick(), name=f"expiry-{self.market.symbol}")

    async def stop(self) -> None:
        for task in (self._ticker, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            error = Unavailable("MATCH_STOPPING", "the engine is stopping; retry")
            pending.future.set_result(_failed(pending.decoded.wire, error))

    async def _recover(self) -> None:
        symbol = self.market.symbol
        snapshot = await self._journal.latest_snapshot(symbol)
        engine = (
            MarketEngine(self.market)
            if snapshot is None
            else MarketEngine.restore(self.market, snapshot.state)
        )
        replayed = 0
        while entries := await self._journal.after(symbol, engine.command_seq, _RECOVERY_PAGE):
            for entry in entries:
                command = match_pb2.Command.FromString(entry.command)
                events = engine.apply(decode(self.market, command), entry.command_seq, entry.ts)
                if _pack(events) != entry.events:
                    raise JournalMismatch(
                        f"{symbol}: replaying command {entry.command_seq} ({entry.command_id}) "
                        "gave other events than the journal holds"
                    )
            replayed += len(entries)
        self.engine = engine
        self.committed_seq = engine.seq
        self._snapshot_seq = engine.command_seq - replayed
        self._recent.clear()
        _log.info(
            "recovered %s",
            symbol,
            extra={
                "fields": {
                    "market": symbol,
                    "snapshot_command_seq": self._snapshot_seq,
                    "replayed": replayed,
                    "command_seq": engine.command_seq,
                    "seq": engine.seq,
                    "state_hash": engine.state_hash(),
                }
            },
        )

    # ----------------------------------------------------------------- writing

    def submit(
        self, decoded: Decoded, trace_context: Context | None = None
    ) -> asyncio.Future[match_pb2.CommandResult]:
        """Queue a command; `trace_context` (the sender's request) makes it a span,
        from here to its journal commit, which its events carry to JetStream."""
        future: asyncio.Future[match_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        span = None
        if trace_context is not None:
            span = _tracer.start_span(
                "match.command",
                context=trace_context,
                attributes={
                    "cex.market": self.market.symbol,
                    "cex.command_id": decoded.wire.command_id,
                },
            )
            end = span.end
            future.add_done_callback(lambda _: end())
        self._queue.put_nowait(_Pending(decoded, decoded.wire.SerializeToString(), future, span))
        return future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("journal write failed for %s; reloading", self.market.symbol)
                error = Unavailable("MATCH_JOURNAL_UNAVAILABLE", "the journal write failed; retry")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_result(_failed(pending.decoded.wire, error))
                await self._reload()

    async def _tick(self) -> None:
        """Send ``expire`` whenever the earliest GTD order is due (checked every tick)."""
        symbol = self.market.symbol
        while True:
            await asyncio.sleep(self._tick_s)
            due = self.engine.book.next_expiry()
            now = self._clock()
            if due is None or due > now:
                continue
            command = match_pb2.Command(
                command_id=f"expire:{now}", market=symbol, expire=match_pb2.ExpireCommand()
            )
            try:
                result = await self.submit(decode(self.market, command))
            except Exception:  # a bug: keep ticking, the next tick tries again
                _log.exception("expiry in %s failed", symbol)
                continue
            if result.status.code:
                _log.warning("expiry in %s not journaled: %s", symbol, result.status.message)

    async def _reload(self) -> None:
        """Rebuild the engine from the journal, retrying while PostgreSQL is away."""
        for delay in itertools.chain((0.1, 0.2, 0.5), itertools.repeat(1.0)):
            try:
                async with self._lock:
                    await self._recover()
                return
            except JournalMismatch:
                raise
            except Exception as exc:
                _log.warning("reload of %s failed (%s); retrying", self.market.symbol, exc)
                await asyncio.sleep(delay)

    async def _commit(self, batch: list[_Pending]) -> None:
        symbol = self.market.symbol
        known = await self._journal.find(symbol, [p.decoded.wire.command_id for p in batch])
        results: list[match_pb2.CommandResult] = []
        entries: list[Entry] = []
        published: list[match_pb2.MatchEvent] = []
        engine = self.engine
        async with self._lock:
            for pending in batch:
                wire = pending.decoded.wire
                prior = known.get(wire.command_id)
                if prior is not None:
                    results.append(self._repeat(wire, pending.body, prior))
                    continue
                command_seq = engine.command_seq + 1
                ts = max(self._clock(), engine.last_ts)
                first_seq = engine.seq + 1
                events = engine.apply(pending.decoded, command_seq, ts)
                entry = Entry(
                    command_seq, wire.command_id, ts, pending.body, first_seq, engine.seq,
                    _pack(events),
                )  # fmt: skip
                known[wire.command_id] = entry
                entries.append(entry)
                published += events
                if pending.span is not None:
                    self._traced(pending.span, command_seq, len(batch))
                results.append(
                    match_pb2.CommandResult(
                        command_id=wire.command_id,
                        market=symbol,
                        status=_OK,
                        command_seq=command_seq,
                        events=events,
                    )
                )
            if entries:
                await self._journal.append(symbol, entries)
            snapshot = self._snapshot_due()
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
        if published:
            self._recent.extend(published)
            self.committed_seq = engine.seq
            async with self._committed:
                self._committed.notify_all()
        if snapshot is not None:
            await self._journal.save_snapshot(symbol, snapshot)

    def _traced(self, span: trace.Span, command_seq: int, batch: int) -> None:
        span.set_attribute("cex.command_seq", command_seq)
        span.set_attribute("cex.batch_size", batch)
        if not span.get_span_context().is_valid:
            return
        carrier: dict[str, str] = {}
        inject(carrier, trace.set_span_in_context(span))
        if len(self.trace_of) >= _TRACED_COMMANDS:  # the publisher is behind: forget the oldest
            del self.trace_of[next(iter(self.trace_of))]
        self.trace_of[command_seq] = carrier

    def _repeat(
        self, wire: match_pb2.Command, body: bytes, prior: Entry
    ) -> match_pb2.CommandResult:
        if body != prior.command:
            error = AlreadyExists(
                "MATCH_COMMAND_ID_REUSED",
                f"command {wire.command_id} was journaled with another body",
            )
            return _failed(wire, error)
        return match_pb2.CommandResult(
            command_id=wire.command_id,
            market=self.market.symbol,
            status=_OK,
            command_seq=prior.command_seq,
            events=_unpack(prior.events),
            duplicate=True,
        )

    def _snapshot_due(self) -> Snapshot | None:
        engine = self.engine
        if engine.command_seq - self._snapshot_seq < self._snapshot_every:
            return None
        self._snapshot_seq = engine.command_seq
        state = engine.snapshot()
        return Snapshot(engine.command_seq, engine.seq, state, engine.state_hash())

    # ----------------------------------------------------------------- reading

    @contextlib.asynccontextmanager
    async def view(self) -> AsyncIterator[MarketEngine]:
        """The engine as the journal holds it (no batch half applied)."""
        async with self._lock:
            yield self.engine

    async def wait_beyond(self, seq: int) -> None:
        """Return once an event after `seq` is committed."""
        async with self._committed:
            await self._committed.wait_for(lambda: self.committed_seq > seq)

    async def events(self, from_seq: int, to_seq: int) -> list[match_pb2.MatchEvent]:
        """Committed events from_seq..to_seq (at most a page; fewer at the end)."""
        to_seq = min(to_seq, self.committed_seq, from_seq + _READ_PAGE - 1)
        if from_seq > to_seq:
            return []
        recent = self._recent
        first_recent = self.committed_seq - len(recent) + 1
        if recent and from_seq >= first_recent:
            start = from_seq - first_recent
            return list(itertools.islice(recent, start, start + to_seq - from_seq + 1))
        found: list[match_pb2.MatchEvent] = []
        for entry in await self._journal.covering(self.market.symbol, from_seq, to_seq, _READ_PAGE):
            found += (e for e in _unpack(entry.events) if from_seq <= e.seq <= to_seq)
        return found
