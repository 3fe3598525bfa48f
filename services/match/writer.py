"""The single writer of a group of markets: recovery, group commit, snapshots, event logs.

One writer decides every command of its group (by default every market), in
one order, numbered by the group's ``group_seq`` (ADR 0013). Commands queue up
while the previous batch commits; the writer takes everything queued (up to
``max_batch``, whatever the market), applies it to the markets' engines in
order, and writes the whole batch (each command with its events) to the
journal in ONE transaction. Only then are the commands answered, their events
released to the publishers and to ReplayEvents followers (each market's
``MarketLog``), and the books shown to GetOrderBook: the lock held across
apply and commit means nobody outside sees a state the journal does not hold.
If the commit fails, the engines may be ahead of the journal, so the writer
rebuilds them from the journal before taking more work and answers the batch
UNAVAILABLE (a retry with the same command ids is safe: if the commit did
land, the retry finds the commands and returns their results).

Time enters as a command: a ticker sends a market an ``expire`` command (id
``expire:<ns>``) as soon as its book's earliest GTD order is due, so an idle
market expires its orders, and releases their funds, on time, and the expiry
is journaled and replayed like any other change.

Every ``snapshot_every`` commands the batch takes the group's state as a
document (inside the lock, so consistent); a task serializes and writes it
after the batch is answered, one at a time.

Recovery loads the group's latest snapshot and re-applies every journaled
command after it in ``group_seq`` order, checking that each produces exactly
the events journaled with it: a replay that disagrees with the journal stops
the group rather than serve a book that differs from the one acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.propagate import inject
from prometheus_client import Counter, Gauge, Histogram

from cex.match.v1 import match_pb2
from services.chassis import (
    AlreadyExists,
    ExchangeError,
    FailedPrecondition,
    InvalidArgument,
    Market,
    Unavailable,
)
from services.chassis.db import Statement
from services.chassis.listings import listed_market
from services.chassis.tracing import Context

from .engine import Decoded, MarketEngine, decode
from .funds import Funds
from .store import Entry, Journal, Lease, Listing, Listings, Snapshot

__all__ = ["JournalMismatch", "MarketLog", "Sequencer"]

_log = logging.getLogger("cex.match.writer")
_OK = status_pb2.Status()
_RECOVERY_PAGE = 2_000
_READ_PAGE = 500
_TRACED_COMMANDS = 10_000  # trace contexts kept for a publisher (command_seq -> carrier)
_SNAPSHOT_VERSION = 2  # 2: with the balances (1: the books only, still read)
_tracer = trace.get_tracer("cex.match")
COMMITS = Counter(
    "match_writer_commits", "Writer transactions: one per batch (journal and the ledger's tables)"
)
COMMANDS = Counter("match_writer_commands", "Commands the writer decided (answered in a batch)")
STAGE_SECONDS = Histogram(
    "match_writer_stage_seconds",
    "Where a batch's time goes: find (the journal's idempotency read), decide (reserve, "
    "match, settle in memory), commit (the one statement), answer (results and logs)",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
SERVING = Gauge(
    "match_writer_serving", "1 while this process writes its group (holds the lease), 0 standing by"
)
_STAGES = {stage: STAGE_SECONDS.labels(stage) for stage in ("find", "decide", "commit", "answer")}


class JournalMismatch(RuntimeError):
    """Replaying the journal did not reproduce the journaled events."""


@dataclass(slots=True)
class _Pending:
    wire: match_pb2.Command
    decoded: Decoded | None  # None: a funds command (no market)
    body: bytes
    future: asyncio.Future[match_pb2.CommandResult]
    span: trace.Span | None = None


def _pack(events: Sequence[match_pb2.MatchEvent]) -> bytes:
    return match_pb2.ReplayEventsResponse(events=events).SerializeToString()


def _unpack(data: bytes) -> list[match_pb2.MatchEvent]:
    return list(match_pb2.ReplayEventsResponse.FromString(data).events)


def _replayed_as_journaled(events: list[match_pb2.MatchEvent], journaled: bytes) -> bool:
    if _pack(events) == journaled:
        return True
    # Journaled before accepted and rejected events carried their place command.
    for event in events:
        if (kind := event.WhichOneof("kind")) in ("accepted", "rejected"):
            getattr(event, kind).ClearField("place")
    return _pack(events) == journaled


def _failed(command: match_pb2.Command, error: ExchangeError) -> match_pb2.CommandResult:
    return match_pb2.CommandResult(
        command_id=command.command_id, market=command.market, status=error.to_status("match")
    )


class MarketLog:
    """One market's committed events: what its publisher and ReplayEvents read."""

    def __init__(self, market: Market, journal: Journal, recent_events: int) -> None:
        self.market = market
        self._journal = journal
        self._recent: deque[match_pb2.MatchEvent] = deque(maxlen=recent_events)
        # Set (and replaced) whenever committed_seq moves. An Event, not a Condition:
        # a waiter cancelled while a Condition re-acquires its lock could hang the
        # server's stop (seen as a publisher stuck "cancelling" in wait_beyond).
        self._moved = asyncio.Event()
        self.committed_seq = 0  # last event seq the journal holds
        # W3C trace context of traced commands, by command_seq, until published.
        self.trace_of: dict[int, dict[str, str]] = {}

    def reset(self, seq: int) -> None:
        self._recent.clear()
        self._advance(seq)

    def extend(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        self._recent.extend(events)
        self._advance(events[-1].seq)

    def _advance(self, seq: int) -> None:
        self.committed_seq = seq
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def traced(self, span: trace.Span, command_seq: int) -> None:
        carrier: dict[str, str] = {}
        inject(carrier, trace.set_span_in_context(span))
        if len(self.trace_of) >= _TRACED_COMMANDS:  # the publisher is behind: forget the oldest
            del self.trace_of[next(iter(self.trace_of))]
        self.trace_of[command_seq] = carrier

    async def wait_beyond(self, seq: int) -> None:
        """Return once an event after `seq` is committed."""
        while self.committed_seq <= seq:
            await self._moved.wait()

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
        symbol = self.market.symbol
        for entry in await self._journal.covering(symbol, from_seq, to_seq, _READ_PAGE):
            found += (e for e in _unpack(entry.events) if from_seq <= e.seq <= to_seq)
        if not found or found[0].seq != from_seq:  # retention deleted its row (ADR 0013)
            first = await self._journal.first_event_seq(symbol)
            raise FailedPrecondition(
                "MATCH_EVENTS_COMPACTED",
                f"{symbol}'s events before {first} are no longer journaled (retention)",
                metadata={"market": symbol, "first_seq": str(first)},
            )
        return found


async def _nothing(serving: bool) -> None:
    return None


@dataclass(slots=True)
class _Replay:
    """A group rebuilt from a snapshot and the journal after it: the books, and, given
    `funds`, the balances too (else the ledger's tables give them, as of the end)."""

    group: str
    markets: dict[str, Market]  # its own copy: a listing in the journal adds to it
    engines: dict[str, MarketEngine]
    funds: Funds | None
    group_seq: int = 0
    last_ts: int = 0
    funds_seq: int = 0
    snapshot_seq: int = 0
    replayed: int = 0

    @classmethod
    async def latest(
        cls, journal: Journal, markets: Mapping[str, Market], funds: Funds | None
    ) -> _Replay:
        """From the group's latest snapshot (or from nothing)."""
        engines = {s: MarketEngine(m) for s, m in markets.items()}
        replay = cls(journal.group, dict(markets), engines, funds)
        snapshot = await journal.latest_snapshot()
        if snapshot is None:
            return replay
        doc = json.loads(snapshot.state)
        if doc.get("version") not in (1, _SNAPSHOT_VERSION):
            raise ValueError(f"not a version {_SNAPSHOT_VERSION} snapshot of {journal.group}")
        for symbol, state in doc["markets"].items():
            market = markets.get(symbol)
            if market is None:
                raise JournalMismatch(f"{journal.group}'s snapshot holds {symbol}, not its market")
            engines[symbol] = MarketEngine.restore(market, _canonical(state))
        if funds is not None:
            if "balances" not in doc:
                raise JournalMismatch(f"{journal.group}'s latest snapshot has no balances")
            funds.restore(doc["balances"])
        replay.group_seq = replay.snapshot_seq = int(doc["group_seq"])
        replay.last_ts, replay.funds_seq = int(doc["last_ts"]), int(doc.get("funds_seq", 0))
        return replay

    async def advance(self, journal: Journal) -> None:
        """Apply every entry the journal holds after `group_seq`, checking that each
        command gives the events journaled with it."""
        while entries := await journal.after(self.group_seq, _RECOVERY_PAGE):
            if entries[0].group_seq > self.group_seq + 1 and await self._compacted(journal):
                continue  # behind retention's horizon: reloaded from the latest snapshot
            for entry in entries:
                self._apply(entry)
            self.replayed += len(entries)

    async def _compacted(self, journal: Journal) -> bool:
        """Retention deleted the rows after our position (a standby that fell behind
        the oldest kept snapshot): start again from the latest snapshot. False for
        any other gap (JournalMismatch follows)."""
        through = await journal.compacted_through()
        if through <= self.group_seq:
            return False
        fresh = await _Replay.latest(journal, self.markets, self.funds)
        if fresh.group_seq < through:
            raise JournalMismatch(f"{self.group} is compacted past its latest snapshot")
        _log.warning(
            "%s: the journal is compacted through %s, past %s; reloading from the snapshot at %s",
            self.group, through, self.group_seq, fresh.group_seq,
        )  # fmt: skip
        self.engines, self.group_seq, self.last_ts = fresh.engines, fresh.group_seq, fresh.last_ts
        self.funds_seq, self.snapshot_seq = fresh.funds_seq, fresh.snapshot_seq
        return True

    def _apply(self, entry: Entry) -> None:
        if entry.group_seq != self.group_seq + 1:
            raise JournalMismatch(f"the journal skips from {self.group_seq} to {entry.group_seq}")
        self.group_seq, self.last_ts = entry.group_seq, max(self.last_ts, entry.ts)
        funds = self.funds
        if entry.market == f"${self.group}":  # the group's funds entries
            self.funds_seq = entry.command_seq
            if funds is not None:
                funds.replay(match_pb2.FundsEffects.FromString(entry.command), entry.ts)
            return
        command = match_pb2.Command.FromString(entry.command)
        engine = self.engines.get(entry.market)
        if engine is None and command.HasField("list_market"):  # listed (ADR 0018)
            market = self.markets[entry.market] = listed_market(command.list_market.market)
            engine = self.engines[entry.market] = MarketEngine(market)
            if funds is not None:
                funds.listed(market)
        if engine is None:
            raise JournalMismatch(f"command {entry.group_seq} is for {entry.market}, not ours")
        place = command.place if command.HasField("place") else None
        if funds is not None and place is not None and (refused := funds.reserve(place, entry.ts)):
            raise JournalMismatch(f"replay: the hold of {command.command_id} failed: {refused}")
        events = engine.apply(decode(engine.market, command), entry.command_seq, entry.ts)
        if not _replayed_as_journaled(events, entry.events):
            raise JournalMismatch(
                f"{entry.market}: replaying command {entry.command_seq} "
                f"({entry.command_id}) gave other events than the journal holds"
            )
        if funds is not None:
            funds.settle(events, entry.ts)


class Sequencer:
    """The writer of one group of markets."""

    def __init__(
        self,
        markets: Sequence[Market],
        journal: Journal,
        funds: Funds,
        *,
        clock: Callable[[], int],
        max_batch: int = 500,
        snapshot_every: int = 5_000,
        recent_events: int = 50_000,
        tick_s: float = 0.1,
        follow_s: float = 0.05,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
        on_listed: Callable[[Market], None] | None = None,
    ) -> None:
        self.markets = {m.symbol: m for m in markets}
        self.engines = {m.symbol: MarketEngine(m) for m in markets}
        self.logs = {m.symbol: MarketLog(m, journal, recent_events) for m in markets}
        self._journal = journal
        self.funds = funds
        self._clock = clock
        self._max_batch = max_batch
        self._snapshot_every = snapshot_every
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._snapshot_seq = 0
        self._saving: asyncio.Task[None] | None = None  # the snapshot being written
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tick_s = tick_s
        self._follow_s = follow_s  # how often a standby reads what the writer committed
        self._lease = Lease(journal.pool, journal.group)
        self.serving = False  # holds the lease, recovered: decides (else the standby)
        self.following: _Replay | None = None  # the standby's copy of the group
        self._on_serving = on_serving or _nothing
        # A market listed while serving (ADR 0018): its publisher must start.
        self._on_listed = on_listed or (lambda market: None)
        self._recent_events = recent_events
        self.group_seq = 0  # last command the journal holds
        self.funds_seq = 0  # last funds entry the journal holds (market "$<group>")
        self.last_ts = 0

    @property
    def group(self) -> str:
        return self._journal.group

    # ----------------------------------------------------------------- lifecycle

    async def start(self, *, ownership_wait_s: float = 15.0) -> None:
        """Serve as the group's writer if its lease is free (recover, then decide), or
        else follow the journal as the standby of the writer that holds it, taking
        over when its lease lapses (`serving` tells which). Another group owning the
        balances is a misconfiguration: RuntimeError after `ownership_wait_s`."""
        replay = await self._replay()
        deadline = time.monotonic() + ownership_wait_s
        while (holder := await self._lease.take()) == Lease.BALANCES_HELD:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the balances are written by another group than {self.group} "
                    "(one writer group owns every balance: ADR 0013)"
                )
            await asyncio.sleep(0.2)
        if holder is None:
            await self._take_over(replay)
        else:
            _log.info("%s is written by another replica: standing by", self.group)
        self._task = asyncio.create_task(self._run(replay), name=f"writer-{self.group}")
        self._ticker = asyncio.create_task(self._tick(), name=f"expiry-{self.group}")

    async def stop(self) -> None:
        for task in (self._ticker, self._task, self._saving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refuse_queued(Unavailable("MATCH_STOPPING", "the engine is stopping; retry"))
        await self._lease.release()

    def _refuse_queued(self, error: ExchangeError) -> None:
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_result(_failed(pending.wire, error))

    def require_serving(self) -> None:
        """Unavailable on a standby: the call belongs to the writer holding the lease."""
        if not self.serving:
            raise Unavailable(
                "MATCH_STANDBY", f"this replica is the standby writer of {self.group}; retry"
            )

    async def _replay(self, funds: Funds | None = None) -> _Replay:
        return await _Replay.latest(self._journal, self.markets, funds)

    async def _follow(self, replay: _Replay) -> None:
        """The standby: apply what the writer commits, until its lease lapses; then
        take over (the lapsed writer cannot commit any more: the lease is its fence)."""
        self.following = replay
        while True:
            try:
                await replay.advance(self._journal)
                if await self._lease.take() is None:
                    await self._take_over(replay)
                    self.following = None
                    return
            except (JournalMismatch, asyncio.CancelledError):
                raise
            except Exception as exc:  # PostgreSQL away: keep standing by
                _log.warning("standby of %s: %s; retrying", self.group, exc)
            await asyncio.sleep(self._follow_s)

    async def _take_over(self, replay: _Replay) -> None:
        """Serve from `replay` once it holds the whole journal, with the balances as
        the ledger's tables hold them (committed with the journal, so as of its end)."""
        began = time.monotonic()
        async with self._lock:
            await replay.advance(self._journal)
            await self.funds.load()
            self.engines, self.group_seq = replay.engines, replay.group_seq
            self.last_ts, self.funds_seq = replay.last_ts, replay.funds_seq
            self._snapshot_seq = replay.snapshot_seq
            listed = [replay.markets[s] for s in self.engines if s not in self.markets]
            for market in listed:  # listed in the journal since this replica started
                self.markets[market.symbol] = market
                self.funds.listed(market)
                self.logs.setdefault(
                    market.symbol, MarketLog(market, self._journal, self._recent_events)
                )
            for symbol, engine in self.engines.items():
                self.logs[symbol].reset(engine.seq)
        if self.serving:  # else on_serving starts every market's publisher
            for market in listed:
                self._on_listed(market)
        _log.info(
            "serving %s",
            self.group,
            extra={
                "fields": {
                    "group": self.group,
                    "snapshot_group_seq": replay.snapshot_seq,
                    "replayed": replay.replayed,
                    "group_seq": self.group_seq,
                    "state_hash": self.state_hash(),
                    "accounts": len(self.funds.book.accounts),
                    "open_holds": len(self.funds.book.transfers),
                    "catch_up_s": round(time.monotonic() - began, 4),
                }
            },
        )
        await self._serve(True)

    async def _serve(self, serving: bool) -> None:
        """Become the writer (publishing, taking calls) or its standby (neither)."""
        if serving != self.serving:
            self.serving = serving
            SERVING.set(int(serving))
            await self._on_serving(serving)

    async def _recover(self) -> None:
        """Rebuild from the latest snapshot, the journal and the ledger's tables."""
        await self._take_over(await self._replay())

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
                    "cex.market": decoded.wire.market,
                    "cex.command_id": decoded.wire.command_id,
                },
            )
            end = span.end
            future.add_done_callback(lambda _: end())
        wire = decoded.wire
        self._queue.put_nowait(_Pending(wire, decoded, wire.SerializeToString(), future, span))
        return future

    def submit_funds(self, command: match_pb2.Command) -> asyncio.Future[match_pb2.CommandResult]:
        """Queue a funds command (no market: transfers, or the expiry of holds)."""
        future: asyncio.Future[match_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(command, None, b"", future))
        return future

    async def _run(self, replay: _Replay) -> None:
        while True:
            if not self.serving:
                await self._follow(replay)
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("journal write failed for %s; reloading", self.group)
                error = Unavailable("MATCH_JOURNAL_UNAVAILABLE", "the journal write failed; retry")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_result(_failed(pending.wire, error))
                replay = await self._reload()

    async def _tick(self) -> None:
        """Send ``expire`` to each market whose earliest GTD order is due, and to the
        funds when a hold's timeout has passed (checked every tick)."""
        while True:
            await asyncio.sleep(self._tick_s)
            if not self.serving:
                continue
            now = self._clock()
            due = [
                symbol
                for symbol, engine in self.engines.items()
                if (at := engine.book.next_expiry()) is not None and at <= now
            ]
            if (at := self.funds.next_expiry()) is not None and at <= now:
                due.append("")
            for symbol in due:
                command = match_pb2.Command(
                    command_id=f"expire:{now}", market=symbol, expire=match_pb2.ExpireCommand()
                )
                try:
                    result = await (
                        self.submit(decode(self.engines[symbol].market, command))
                        if symbol
                        else self.submit_funds(command)
                    )
                except Exception:  # a bug: keep ticking, the next tick tries again
                    _log.exception("expiry in %r failed", symbol)
                    continue
                if result.status.code:
                    _log.warning("expiry in %r not applied: %s", symbol, result.status.message)

    async def _reload(self) -> _Replay:
        """After a failed commit the engines may be ahead of the journal: rebuild them
        from it, retrying while PostgreSQL is away. Still (or again) the lease holder,
        serve; if another writer took the lease meanwhile, stand by (what it returns)."""
        for delay in itertools.chain((0.1, 0.2, 0.5), itertools.repeat(1.0)):
            try:
                replay = await self._replay()
                if await self._lease.take() is None:
                    await self._take_over(replay)
                else:
                    _log.warning("%s: another writer holds the lease; standing by", self.group)
                    await self._serve(False)
                    self._refuse_queued(Unavailable("MATCH_STANDBY", "the writer changed; retry"))
                return replay
            except JournalMismatch:
                raise
            except Exception as exc:
                _log.warning("reload of %s failed (%s); retrying", self.group, exc)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        market_keys = [(p.wire.market, p.wire.command_id) for p in batch if p.decoded is not None]
        client_keys = [k for p in batch if (k := _client_key(p.wire))]
        known, by_client = (
            await self._journal.find(market_keys, client_keys) if market_keys else ({}, {})
        )
        transfer_ids = [
            i
            for p in batch
            if p.wire.HasField("transfers")
            for t in p.wire.transfers.transfers
            for i in (t.id, t.pending_id)
            if i
        ]
        results: list[match_pb2.CommandResult] = []
        entries: list[Entry] = []
        listed: list[Market] = []  # markets listed by this batch (ADR 0018)
        published: dict[str, list[match_pb2.MatchEvent]] = {}
        started = _stage("find", started)
        async with self._lock:
            if transfer_ids:
                await self.funds.fetch(transfer_ids)
            for pending in batch:
                ts = self.last_ts = max(self._clock(), self.last_ts)
                if pending.decoded is None:
                    result, effects = self._funds_command(pending.wire, ts)
                    results.append(result)
                    if effects.expired or effects.created:
                        entries.append(self._funds_entry(effects, ts))
                    continue
                wire = pending.decoded.wire
                key = (wire.market, wire.command_id)
                prior = known.get(key)
                if prior is not None:
                    results.append(_repeat(wire, pending.body, prior))
                    continue
                client_key = _client_key(wire)
                first = by_client.get(client_key) if client_key else None
                if first is not None:  # the same client order under another command
                    results.append(_client_repeat(wire, first))
                    continue
                # A listing whose symbol is a market, else what the status or funds refuse.
                if refused := self._list(wire, listed) or self._refusal(
                    self.engines[wire.market], pending.decoded, ts
                ):
                    results.append(_failed(wire, refused))
                    continue
                engine = self.engines[wire.market]
                command_seq = engine.command_seq + 1
                first_seq = engine.seq + 1
                events = engine.apply(pending.decoded, command_seq, ts)
                self.funds.settle(events, ts)
                self.group_seq += 1
                entry = Entry(
                    self.group_seq, wire.market, command_seq, wire.command_id, ts, pending.body,
                    first_seq, engine.seq, _pack(events), client_key,
                )  # fmt: skip
                known[key] = entry
                if client_key:
                    by_client[client_key] = entry
                entries.append(entry)
                if events:
                    published.setdefault(wire.market, []).extend(events)
                if pending.span is not None:
                    self._traced(pending.span, wire.market, command_seq, len(batch))
                results.append(
                    match_pb2.CommandResult(
                        command_id=wire.command_id,
                        market=wire.market,
                        status=_OK,
                        command_seq=command_seq,
                        events=events,
                    )
                )
            started = _stage("decide", started)
            statement = Statement()  # the batch's one commit: journal and balances
            self._journal.append(statement, entries)
            Listings.append(statement, self._listings(entries, listed))
            self.funds.save(statement)
            await statement.execute(self._lease.conn)  # only the lease holder commits
            self.funds.saved()
            started = _stage("commit", started)
            state = self._snapshot_due()
        COMMITS.inc()
        COMMANDS.inc(len(batch))
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():  # cancelled: its caller went away; it is committed
                pending.future.set_result(result)
        for symbol, events in published.items():
            self.logs[symbol].extend(events)
        self._adopt(listed)
        if state is not None and (self._saving is None or self._saving.done()):
            self._saving = asyncio.create_task(self._save_snapshot(state))
        _stage("answer", started)

    def _list(self, wire: match_pb2.Command, listed: list[Market]) -> ExchangeError | None:
        """A listing's new engine (ADR 0018), or why not: the symbol is a market.
        Its log now, its market (what calls see) once the batch is committed."""
        if not wire.HasField("list_market"):
            return None
        if wire.market in self.engines:
            return _exists(wire.market)
        market = listed_market(wire.list_market.market)
        self.engines[wire.market] = MarketEngine(market)
        self.funds.listed(market)
        self.logs.setdefault(market.symbol, MarketLog(market, self._journal, self._recent_events))
        listed.append(market)
        return None

    def _adopt(self, listed: list[Market]) -> None:
        """Serve the markets a batch listed: the journal holds their listings."""
        for market in listed:
            self.markets[market.symbol] = market
            self._on_listed(market)

    def _listings(self, entries: list[Entry], listed: list[Market]) -> list[Listing]:
        """The markets table's rows of a batch's listings (each its market's first entry)."""
        symbols = {m.symbol for m in listed}
        return [
            Listing(e.market, self.group, e.group_seq, _listed_event(e), e.ts)
            for e in entries
            if e.market in symbols and e.command_seq == 1
        ]

    def _refusal(self, engine: MarketEngine, decoded: Decoded, ts: int) -> ExchangeError | None:
        """Why a command is refused before the journal: its market's status (ADR 0015),
        then a place's open-order limits and its funds (R1). Nothing refused is journaled."""
        wire = decoded.wire
        closed = engine.refusal(decoded)
        if closed is not None or not wire.HasField("place"):
            return closed
        return self._over_limit(wire) or self.funds.reserve(wire.place, ts)

    def _over_limit(self, wire: match_pb2.Command) -> ExchangeError | None:
        """A place beyond the open-order limits it carries (R1, with the funds)."""
        place, market = wire.place, wire.market
        if place.max_open_orders:
            working = sum(e.working_orders(place.account_id) for e in self.engines.values())
            if working >= place.max_open_orders:
                return FailedPrecondition(
                    "RISK_OPEN_ORDERS_LIMIT_EXCEEDED",
                    f"{working} working orders: the limit is {place.max_open_orders}",
                    metadata={"limit": str(place.max_open_orders)},
                )
        if place.max_market_open_orders:
            working = self.engines[market].working_orders(place.account_id)
            if working >= place.max_market_open_orders:
                return FailedPrecondition(
                    "RISK_OPEN_ORDERS_LIMIT_EXCEEDED",
                    f"{working} working orders in {market}: "
                    f"the limit is {place.max_market_open_orders}",
                    metadata={"limit": str(place.max_market_open_orders), "market": market},
                )
        return None

    def _funds_command(
        self, wire: match_pb2.Command, ts: int
    ) -> tuple[match_pb2.CommandResult, match_pb2.FundsEffects]:
        result = match_pb2.CommandResult(command_id=wire.command_id, status=_OK)
        if wire.HasField("transfers"):
            outcomes, effects = self.funds.transfers(wire.transfers, ts)
            for outcome in outcomes:
                status = outcome.to_status("ledger") if isinstance(outcome, ExchangeError) else _OK
                result.transfer_statuses.append(status)
        elif wire.HasField("expire"):
            effects = self.funds.expire(ts)
        else:
            error = InvalidArgument(
                "MATCH_FIELD_REQUIRED", "a command without a market is transfers or expire"
            )
            return _failed(wire, error), match_pb2.FundsEffects()
        return result, effects

    def _funds_entry(self, effects: match_pb2.FundsEffects, ts: int) -> Entry:
        """What a funds command changed, journaled for a replay from a snapshot."""
        self.group_seq += 1
        self.funds_seq += 1
        return Entry(
            self.group_seq, self.funds_market, self.funds_seq, f"funds:{self.group_seq}", ts,
            effects.SerializeToString(), 0, 0, b"",
        )  # fmt: skip

    @property
    def funds_market(self) -> str:
        """The journal's "market" of the group's funds entries."""
        return f"${self.group}"

    def _traced(self, span: trace.Span, market: str, command_seq: int, batch: int) -> None:
        span.set_attribute("cex.command_seq", command_seq)
        span.set_attribute("cex.batch_size", batch)
        if span.get_span_context().is_valid:
            self.logs[market].traced(span, command_seq)

    def _snapshot_due(self) -> dict[str, Any] | None:
        """The group's state as a document, when a snapshot is due. Taken inside the
        batch (consistent); serialized and written after the answers, by a task."""
        if self.group_seq - self._snapshot_seq < self._snapshot_every:
            return None
        self._snapshot_seq = self.group_seq
        return self.document()

    async def _save_snapshot(self, state: dict[str, Any]) -> None:
        """A snapshot's write, off the batch's way (one at a time: a snapshot that
        falls due while one is written is skipped; recovery replays a little more)."""
        data = _canonical(state)
        snapshot = Snapshot(state["group_seq"], data, hashlib.sha256(data).hexdigest())
        try:
            await self._journal.save_snapshot(snapshot)
        except Exception:  # the journal is whole without it
            _log.exception(
                "writing the snapshot of %s at %s failed", self.group, snapshot.group_seq
            )

    # ----------------------------------------------------------------- state

    def document(self) -> dict[str, Any]:
        """The whole group as the JSON document of its snapshot."""
        return _document(self, self.funds)

    async def replayed(self) -> dict[str, Any]:
        """The group rebuilt from its latest snapshot (or from nothing) and the journal
        after it, books AND balances, without the ledger's tables: a market command
        holds, matches and settles again; a funds entry re-applies its effects. Equal
        to `document()` at the same point, or the journal does not hold what the
        writer decided (`verify()`'s check; recovery itself reads the balances back
        from the tables, which commit with the journal)."""
        funds = self.funds.like()
        replay = await self._replay(funds)
        await replay.advance(self._journal)
        return _document(replay, funds)

    async def verify(self) -> None:
        """Recover as a restart does (the books from the snapshot and the journal, the
        balances from the ledger's tables), then replay from the snapshot alone:
        JournalMismatch unless both give the same group. Read-only: for a writer
        group that is quiet (no commands in flight), e.g. after a test's burst."""
        await self._recover()
        async with self._lock:
            recovered = self.document()
        replayed = await self.replayed()
        differ = sorted(k for k in recovered if recovered[k] != replayed.get(k))
        if differ:
            raise JournalMismatch(f"{self.group}: the replay differs in {differ}")

    def snapshot(self) -> bytes:
        """Canonical bytes of the whole group: equal states give equal bytes."""
        return _canonical(self.document())

    def state_hash(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    # ----------------------------------------------------------------- reading

    @contextlib.asynccontextmanager
    async def view(self, market: str) -> AsyncIterator[MarketEngine]:
        """A market's engine as the journal holds it (no batch half applied)."""
        async with self._lock:
            yield self.engines[market]


class _Group(Protocol):
    @property
    def group(self) -> str: ...

    group_seq: int
    last_ts: int
    funds_seq: int
    engines: dict[str, MarketEngine]


def _document(state: _Group, funds: Funds) -> dict[str, Any]:
    """A group's books and balances as the JSON document of its snapshot."""
    return {
        "version": _SNAPSHOT_VERSION,
        "group": state.group,
        "group_seq": state.group_seq,
        "last_ts": state.last_ts,
        "funds_seq": state.funds_seq,
        "markets": {s: e.document() for s, e in state.engines.items()},
        "balances": funds.document(),
    }


def _stage(stage: str, started: float) -> float:
    now = time.perf_counter()
    _STAGES[stage].observe(now - started)
    return now


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _client_key(wire: match_pb2.Command) -> str | None:
    """A place's (account, client_order_id), unique in the group's journal."""
    if not wire.HasField("place") or not wire.place.client_order_id:
        return None
    return f"{wire.place.account_id}\x1f{wire.place.client_order_id}"


def _client_repeat(wire: match_pb2.Command, first: Entry) -> match_pb2.CommandResult:
    """A place whose client key was journaled under another command: the first
    outcome if it asks for the same order (its own order id aside), else refused."""
    journaled = match_pb2.Command.FromString(first.command)
    first_order_id = journaled.place.order_id
    if journaled.place.request_fingerprint and wire.place.request_fingerprint:
        same = journaled.place.request_fingerprint == wire.place.request_fingerprint
    else:
        again = match_pb2.Command()
        again.CopyFrom(wire)
        for command in (journaled, again):
            command.command_id = command.place.order_id = ""
        same = journaled.SerializeToString(deterministic=True) == again.SerializeToString(
            deterministic=True
        )
    if not same:
        error = AlreadyExists(
            "MATCH_DUPLICATE_CLIENT_ORDER_ID",
            f"client_order_id {wire.place.client_order_id!r} was placed with other fields",
            metadata={"order_id": first_order_id},
        )
        return _failed(wire, error)
    return _journaled(wire, first)


def _listed_event(entry: Entry) -> bytes:
    return _unpack(entry.events)[0].market_listed.SerializeToString()


def _exists(symbol: str) -> AlreadyExists:
    return AlreadyExists(
        "MATCH_MARKET_EXISTS", f"{symbol} is already a market", metadata={"market": symbol}
    )


def _repeat(wire: match_pb2.Command, body: bytes, prior: Entry) -> match_pb2.CommandResult:
    if body != prior.command:
        error = AlreadyExists(
            "MATCH_COMMAND_ID_REUSED",
            f"command {wire.command_id} was journaled with another body",
        )
        return _failed(wire, error)
    return _journaled(wire, prior)


def _journaled(wire: match_pb2.Command, entry: Entry) -> match_pb2.CommandResult:
    """A repeated command answered with the outcome its first copy journaled."""
    return match_pb2.CommandResult(
        command_id=wire.command_id,
        market=wire.market,
        status=_OK,
        command_seq=entry.command_seq,
        events=_unpack(entry.events),
        duplicate=True,
    )
