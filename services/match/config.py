"""The match service's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_float, env_int, env_str

__all__ = ["MatchSettings"]

_READERS = "order.market_cursors,marketdata.cursors"


@dataclass(frozen=True, slots=True)
class MatchSettings:
    """`group` names the writer group this replica writes, `markets` its markets
    (empty: every market in the catalog); markets are spread across replicas by
    giving each group its own name and list (ADR 0013: one writer per group).
    `events_max_age_s`: how long the MATCH_EVENTS stream keeps events (0: forever);
    the journal keeps them until retention (below), and ReplayEvents serves what
    the stream dropped.
    `ownership_wait_s`: how long a starting writer waits for the balances' lock held
    by another group before refusing to start (a second writer of its own group
    does not wait: it stands by, following the journal, until the lease lapses).
    Journal retention (ADR 0013, "Retention"; services/match/retention.py): every
    `journal_retention_every_s` (0: never) the serving writer deletes the group's
    rows at or below the oldest kept snapshot and behind every reader in
    `journal_readers` (projections' cursor tables, schema.table with (market,
    seq); a missing table holds everything back), keeping at least the newest
    `journal_retain` rows and every row younger than `journal_retain_s`; with
    `journal_archive_dir` it first writes them there as gzip'd JSON lines."""

    group: str = "main"
    markets: tuple[str, ...] = ()
    max_batch: int = 500
    snapshot_every: int = 5_000
    max_commands_per_request: int = 1_000
    events_max_age_s: float = 86_400.0
    ownership_wait_s: float = 15.0
    journal_retain: int = 1_000_000
    journal_retain_s: float = 7 * 86_400.0
    journal_retention_every_s: float = 300.0
    journal_readers: tuple[str, ...] = tuple(_READERS.split(","))
    journal_archive_dir: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MatchSettings:
        env = os.environ if env is None else env
        markets = env_str(env, "CEX_MATCH_MARKETS", "") or ""
        readers = env_str(env, "CEX_MATCH_JOURNAL_READERS", _READERS) or _READERS
        readers = "" if readers == "none" else readers  # no projection reads the journal
        return cls(
            group=env_str(env, "CEX_MATCH_GROUP", "main") or "main",
            markets=tuple(m.strip() for m in markets.split(",") if m.strip()),
            max_batch=env_int(env, "CEX_MATCH_MAX_BATCH", 500),
            snapshot_every=env_int(env, "CEX_MATCH_SNAPSHOT_EVERY", 5_000),
            max_commands_per_request=env_int(env, "CEX_MATCH_MAX_COMMANDS", 1_000),
            events_max_age_s=env_float(env, "CEX_MATCH_EVENTS_MAX_AGE_S", 86_400.0),
            ownership_wait_s=env_float(env, "CEX_MATCH_OWNERSHIP_WAIT_S", 15.0),
            journal_retain=env_int(env, "CEX_MATCH_JOURNAL_RETAIN", 1_000_000),
            journal_retain_s=env_float(env, "CEX_MATCH_JOURNAL_RETAIN_S", 7 * 86_400.0),
            journal_retention_every_s=env_float(env, "CEX_MATCH_JOURNAL_RETENTION_EVERY_S", 300.0),
            journal_readers=tuple(r.strip() for r in readers.split(",") if r.strip()),
            journal_archive_dir=env_str(env, "CEX_MATCH_JOURNAL_ARCHIVE_DIR", "") or "",
        )
