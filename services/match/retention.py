"""Journal retention: the group's journal does not grow without bound (issue 20).

Invariants first (ADR 0013, "Retention"):

- A row goes only at or below the **oldest kept snapshot** (every restart and
  standby replays from a snapshot at or after it, so the rows after it are
  whole) and only once **every reader** has passed it: each projection's cursor
  (the last event seq it applied per market, read from its cursor table) is
  beyond the row's events. A market missing from a reader's table holds every
  row of that market back, and a reader whose table does not exist (not
  migrated yet, or not deployed: then take it off the list) holds everything.
- At least the newest ``retain`` rows, and every row younger than ``retain_s``,
  stay: the journal's (market, command_id) and client-key idempotency covers
  that window (past it, retries are answered by the owners' own keys: order's
  read model, the ledger's transfer ids).
- The rows go, and ``journal_retention.compacted_through`` moves, in ONE
  transaction; with an archive directory the rows are first written there
  (gzip'd JSON lines, fsync'd, renamed into place), so a crash between the
  archive and the delete only writes the same file again.
- The ledger's tables are never touched: they are the book of record, and the
  auditor works from its checkpoints (ADR 0005).

Only the serving writer runs it; the standby's task sleeps. Two running at once
(a takeover mid-round) cannot delete more than either may: the delete is refused
unless the recorded horizon is still the one the round started from.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import Counter, Gauge

from .store import Entry, Journal

__all__ = ["Retention"]

_log = logging.getLogger("cex.match.retention")
_TABLE = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
COMPACTED = Counter(
    "match_journal_compacted_rows",
    "Journal rows deleted by retention (archived first when an archive is set)",
)
OLDEST_KEPT = Gauge(
    "match_journal_oldest_kept_group_seq",
    "The group_seq after the journal's compacted horizon: older rows are gone",
)
RETAINED = Gauge(
    "match_journal_retained_rows", "Journal rows of the group kept (last group_seq - horizon)"
)
BOUND = Gauge(
    "match_journal_retention_bound",
    "The highest group_seq each rule lets retention delete (the lowest one holds it)",
    ["by"],
)
FAILURES = Counter("match_journal_retention_failures", "Retention rounds that failed")
LAST_RUN = Gauge(
    "match_journal_retention_last_run_timestamp_seconds", "When a retention round last succeeded"
)


class Retention:
    """Compacts one group's journal behind its oldest kept snapshot and its readers."""

    def __init__(
        self,
        journal: Journal,
        markets: Sequence[str],
        *,
        retain: int,
        retain_s: float,
        readers: Sequence[str] = (),
        archive_dir: str | Path | None = None,
        clock: Callable[[], int] = time.time_ns,
        chunk: int = 10_000,
    ) -> None:
        for table in readers:
            if not _TABLE.match(table):
                raise ValueError(f"a journal reader is schema.table, not {table!r}")
        self._journal = journal
        self._markets = tuple(markets)
        self._retain = max(retain, 0)
        self._retain_ns = int(max(retain_s, 0.0) * 1e9)
        self._readers = tuple(readers)
        self._archive = Path(archive_dir) / journal.group if archive_dir else None
        self._clock = clock
        self._chunk = chunk

    async def run(self, every_s: float, serving: Callable[[], bool]) -> None:
        """A round every `every_s` while `serving()` (the writer holding the lease)."""
        while True:
            await asyncio.sleep(every_s)
            if not serving():
                continue
            try:
                deleted = await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:  # PostgreSQL away, a full disk: the next round tries again
                FAILURES.inc()
                _log.exception("journal retention of %s failed", self._journal.group)
                continue
            if deleted:
                _log.info("journal retention of %s deleted %s rows", self._journal.group, deleted)

    async def bound(self) -> int:
        """The highest group_seq every rule lets go (age aside: `once` applies it)."""
        journal = self._journal
        snapshot, last = await journal.retention_bounds()
        bounds = {"snapshot": snapshot, "entries": last - self._retain}
        for table in self._readers:
            cursors = await journal.reader_cursors(table, self._markets)
            if cursors is None:  # not migrated yet: it will need everything
                _log.warning("journal reader %s has no table: retention holds back", table)
                bounds[f"reader:{table}"] = 0
                continue
            held = last
            for market in self._markets:
                first = await journal.first_needed(market, cursors.get(market, 0))
                if first is not None:
                    held = min(held, first - 1)
            bounds[f"reader:{table}"] = held
        for by, value in bounds.items():
            BOUND.labels(by).set(value)
        through = await journal.compacted_through()
        OLDEST_KEPT.set(through + 1)
        RETAINED.set(max(last - through, 0))
        return max(min(bounds.values()), 0)

    async def once(self) -> int:
        """One round: delete (archiving first) what every rule lets go, in chunks of
        one transaction each. Returns the rows deleted."""
        journal = self._journal
        bound = await self.bound()
        before_ts = self._clock() - self._retain_ns
        through = await journal.compacted_through()
        deleted = 0
        while through < bound:
            limit = min(bound, through + self._chunk)
            rows = await journal.compactable(through, limit, before_ts)
            prefix: list[Entry] = []
            for row in rows:  # old enough and contiguous from the horizon
                if row.group_seq != through + len(prefix) + 1:
                    break
                prefix.append(row)
            if not prefix:
                break
            upper = prefix[-1].group_seq
            if self._archive is not None:
                await asyncio.to_thread(_archive, self._archive, journal.group, prefix)
            count = await journal.compact(through, upper)
            if not count:  # another round moved the horizon first: read it again
                break
            COMPACTED.inc(count)
            deleted += count
            through = upper
            OLDEST_KEPT.set(through + 1)
            if upper < limit:
                break  # the rest is younger than retain_s
        LAST_RUN.set(time.time())
        return deleted


def _archive(folder: Path, group: str, rows: Sequence[Entry]) -> Path:
    """Rows as gzip'd JSON lines, durable before the delete: written aside, fsync'd,
    renamed into place (the same range again overwrites the same file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"journal-{rows[0].group_seq:020d}-{rows[-1].group_seq:020d}.jsonl.gz"
    part = path.with_suffix(".part")
    with part.open("wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb") as out:
            for row in rows:
                line = {
                    "writer_group": group,
                    "group_seq": row.group_seq,
                    "market": row.market,
                    "command_seq": row.command_seq,
                    "command_id": row.command_id,
                    "ts": row.ts,
                    "command": base64.b64encode(row.command).decode(),
                    "first_seq": row.first_seq,
                    "last_seq": row.last_seq,
                    "events": base64.b64encode(row.events).decode(),
                    "client_key": row.client_key,
                }
                out.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    part.replace(path)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path
