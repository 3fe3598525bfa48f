"""The auditor: the ledger's invariants, checked on one consistent snapshot.

Per asset: posted debits equal posted credits and pending debits equal pending
credits over all accounts (the sum of all balances is zero); no user account is
negative; every account's posted columns equal its checkpoint plus the replay
of the transfers after the checkpoint; the pending columns equal the open
holds. A violation is exported as a gauge, logged loudly, and sets the
persisted halt flag (table `halt`), which makes the ledger refuse new
WITHDRAWAL transfers until an operator clears it.

Checkpoints keep an audit's cost flat over history (issue 17). A checkpoint
is every account's posted columns as of a transfer sequence (`audit_balances`,
one copy moved forward), written by an audit of every asset that passed, in
its own transaction; the next audit replays only the transfers after it. The
checkpoints form a hash chain: each one's hash covers the previous hash and a
digest of the immutable fields of the transfers it replayed. Since a
transfer older than the checkpoint is never replayed again, each audit also
hashes again a bounded slice of older checkpoints' transfers (a cursor that
wraps around), so a changed, inserted or deleted old row is found within one
cycle. What this cannot catch (ADR 0005): a rewrite of old rows together
with every later digest and hash (the hash is not keyed; the logged hashes
are the outside copy to compare with), nor a balance moved in both
`accounts` and `audit_balances` by the same amount.

Audit work per run: the accounts and open holds (today's state), the
transfers after the checkpoint and the re-verification budget; never every
transfer. The first audit after the checkpoints' migration replays the whole
history once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

from services.chassis import poll_until_cancelled

__all__ = [
    "REVERIFY_BUDGET",
    "AssetReport",
    "AuditReport",
    "Auditor",
    "LedgerMetrics",
    "chain_hash",
    "run_audit",
]

_log = logging.getLogger("cex.ledger.audit")

# Older transfers each audit hashes again (at least one checkpoint's worth).
REVERIFY_BUDGET = 20_000

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class LedgerMetrics:
    """The ledger's own Prometheus metrics, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.audit_violations = Gauge(
            "ledger_audit_violations",
            "Invariant violations found by the last audit, per asset",
            ["asset"],
            registry=registry,
        )
        self.halted = Gauge(
            "ledger_halted", "1 while the auditor's halt flag is set", registry=registry
        )
        self.audit_transfers = Gauge(
            "ledger_audit_transfers_read",
            "Transfers the last audit read: replayed (newer than its checkpoint) and"
            " reverified (older ones hashed again)",
            ["part"],
            registry=registry,
        )
        self.audit_checkpoint = Gauge(
            "ledger_audit_checkpoint_sequence",
            "The transfer sequence of the checkpoint the last audit started from",
            registry=registry,
        )


@dataclass(slots=True)
class AssetReport:
    asset: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    account_count: int = 0
    negative_account_ids: list[str] = field(default_factory=list)
    pending_transfer_count: int = 0
    open_holds: int = 0
    replay_mismatches: int = 0

    @property
    def violations(self) -> list[str]:
        found = []
        if self.debits_posted != self.credits_posted:
            found.append("posted debits != posted credits")
        if self.debits_pending != self.credits_pending:
            found.append("pending debits != pending credits")
        if self.negative_account_ids:
            found.append(f"{len(self.negative_account_ids)} negative user accounts")
        if self.replay_mismatches:
            found.append(f"{self.replay_mismatches} accounts differ from the transfer replay")
        if self.open_holds != self.debits_pending:
            found.append("pending balances != sum of open holds")
        return found

    @property
    def balanced(self) -> bool:
        return not self.violations


@dataclass(slots=True)
class AuditReport:
    """One audit's verdict and its work.

    sequence: the last transfer sequence it covers (the writer's last commit as
        of its snapshot); checkpoint_sequence: where it started replaying.
    transfers_replayed: transfers after the checkpoint it read; transfers_reverified:
        older transfers it hashed again. Their sum (`transfers_read`) is bounded
        by what is new plus the re-verification budget, not by the history.
    problems: what is wrong beyond one asset (the checkpoints' chain).
    checkpoint_id: the (last) checkpoint it wrote (0: none; it failed, was
        filtered by asset, found nothing new, or another audit wrote first).
    segments: the checkpoints it would write, (id, sequence, transfers, digest)."""

    assets: list[AssetReport]
    sequence: int
    halted: bool
    halt_reason: str
    anomalies: int
    checkpoint_sequence: int = 0
    transfers_replayed: int = 0
    transfers_reverified: int = 0
    problems: list[str] = field(default_factory=list)
    checkpoint_id: int = 0
    checkpoint_hash: str = ""
    segments: list[tuple[int, int, int, bytes]] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return not self.problems and all(a.balanced for a in self.assets)

    @property
    def transfers_read(self) -> int:
        return self.transfers_replayed + self.transfers_reverified


_TOTALS = """
SELECT asset, sum(debits_posted) AS dp, sum(credits_posted) AS cp,
       sum(debits_pending) AS dpe, sum(credits_pending) AS cpe, count(*) AS n
FROM accounts WHERE cardinality($1::text[]) = 0 OR asset = ANY($1::text[])
GROUP BY asset ORDER BY asset"""

_NEGATIVE = """
SELECT asset, account_id FROM accounts
WHERE NOT is_system AND debits_posted + debits_pending > credits_posted
  AND (cardinality($1::text[]) = 0 OR asset = ANY($1::text[]))
ORDER BY asset, account_id"""

_HOLDS = """
SELECT asset, count(*) AS n, coalesce(sum(remaining), 0) AS open FROM transfers
WHERE op = 2 AND state = 1 AND (cardinality($1::text[]) = 0 OR asset = ANY($1::text[]))
GROUP BY asset"""

# Posted effects: single-phase transfers, posts and partial posts (op 1, 3, 5).
# Pending effects: what open holds still hold.
# What every transfer after the checkpoint did, per account: posted effects of
# single-phase transfers, posts and partial posts (op 1, 3, 5); every account a
# transfer names gets a row, even at zero (the accounts table must have it).
_DELTA = """
SELECT account_id, asset, sum(dp)::bigint AS dp, sum(cp)::bigint AS cp FROM (
    SELECT debit_account_id AS account_id, asset,
           CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END AS dp, 0::bigint AS cp
    FROM transfers WHERE sequence > $2 AND sequence <= $3
    UNION ALL
    SELECT credit_account_id, asset, 0, CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END
    FROM transfers WHERE sequence > $2 AND sequence <= $3
) e WHERE cardinality($1::text[]) = 0 OR asset = ANY($1::text[])
GROUP BY account_id, asset"""

# Columns == checkpoint + replay of the newer transfers (posted), and == what
# the open holds hold (pending). Missing on either side is a mismatch.
_REPLAY = (
    """
WITH delta AS ("""
    + _DELTA
    + """), holds AS (
    SELECT debit_account_id AS account_id, asset, remaining AS dpe, 0::bigint AS cpe
    FROM transfers WHERE op = 2 AND state = 1
    UNION ALL
    SELECT credit_account_id, asset, 0, remaining FROM transfers WHERE op = 2 AND state = 1
), replay AS (
    SELECT account_id, asset, sum(dp) AS dp, sum(cp) AS cp, sum(dpe) AS dpe, sum(cpe) AS cpe
    FROM (
        SELECT account_id, asset, debits_posted AS dp, credits_posted AS cp,
               0::bigint AS dpe, 0::bigint AS cpe
        FROM audit_balances
        UNION ALL
        SELECT account_id, asset, dp, cp, 0, 0 FROM delta
        UNION ALL
        SELECT account_id, asset, 0, 0, dpe, cpe FROM holds
    ) x
    WHERE cardinality($1::text[]) = 0 OR asset = ANY($1::text[])
    GROUP BY account_id, asset
)
SELECT coalesce(a.asset, r.asset) AS asset, count(*) AS n
FROM accounts a FULL JOIN replay r USING (account_id, asset)
WHERE (cardinality($1::text[]) = 0 OR coalesce(a.asset, r.asset) = ANY($1::text[]))
  AND (a.account_id IS NULL OR r.account_id IS NULL
       OR (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
          IS DISTINCT FROM (r.dp, r.cp, r.dpe, r.cpe))
GROUP BY 1"""
)

# The next checkpoint's balances: the accounts the newer transfers touched,
# moved by what they did (the audit has just shown that this equals their
# columns).
_ADVANCE = (
    """
INSERT INTO audit_balances AS b (account_id, asset, debits_posted, credits_posted)
SELECT account_id, asset, dp, cp FROM ("""
    + _DELTA
    + """) delta
ON CONFLICT (account_id, asset) DO UPDATE
SET debits_posted = b.debits_posted + excluded.debits_posted,
    credits_posted = b.credits_posted + excluded.credits_posted"""
)

# The transfers of each range (after, upto] as one digest, over the fields
# that never change once written (state and remaining do: holds resolve). The
# record's text form quotes what needs quoting, so fields cannot run into each
# other.
_SEGMENTS = """
SELECT r.id, count(t.sequence) AS n, sha256(convert_to(coalesce(string_agg(
    ROW(t.sequence, t.id, t.op, t.debit_account_id, t.credit_account_id, t.asset, t.amount,
        t.pending_id, t.linked, t.kind, t.reference, t.fingerprint)::text,
    E'\\n' ORDER BY t.sequence) FILTER (WHERE t.sequence IS NOT NULL), ''), 'UTF8')) AS digest
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(id, after, upto)
LEFT JOIN transfers t ON t.sequence > r.after AND t.sequence <= r.upto
GROUP BY r.id ORDER BY r.id"""

_GENESIS = bytes(32)
_REVERIFY_SEGMENTS = 1000
# A checkpoint covers at most this many sequence numbers: an audit that
# replays more (the first one, on a ledger with history) writes several, so no
# re-verification step has to read more than this at once.
SEGMENT_SPAN = 10_000


def _spans(after_id: int, after: int, upto: int) -> list[tuple[int, int, int]]:
    """(checkpoint id, after, upto) for the checkpoints that cover (after, upto]."""
    spans = []
    while after < upto:
        after_id += 1
        spans.append((after_id, after, min(upto, after + SEGMENT_SPAN)))
        after = spans[-1][2]
    return spans


def chain_hash(
    previous: bytes, checkpoint_id: int, sequence: int, count: int, segment: bytes
) -> bytes:
    """A checkpoint's hash: its place in the chain and what its transfers were."""
    return hashlib.sha256(
        b"cex.ledger.checkpoint.v1"
        + previous
        + checkpoint_id.to_bytes(8, "big")
        + sequence.to_bytes(8, "big")
        + count.to_bytes(8, "big")
        + segment
    ).digest()


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    id: int
    sequence: int
    transfers: int
    segment_hash: bytes
    hash: bytes


_ORIGIN = _Checkpoint(0, 0, 0, b"", _GENESIS)


async def _checkpoint(conn: Connection, where: str, *args: object) -> _Checkpoint | None:
    row = await conn.fetchrow(
        "SELECT id, sequence, transfers, segment_hash, hash FROM audit_checkpoints " + where, *args
    )
    if row is None:
        return None
    return _Checkpoint(
        row["id"], row["sequence"], row["transfers"], bytes(row["segment_hash"]), bytes(row["hash"])
    )


async def _reverify(
    conn: Connection, latest: _Checkpoint, budget: int
) -> tuple[int, list[str], int | None]:
    """Hash older checkpoints' transfers again, from where the last audit stopped
    to the latest checkpoint (then from the first again), consecutive
    checkpoints up to `budget` transfers (at least one, at most 1,000
    checkpoints): a row older than the checkpoint that changed shows here
    within a cycle. Returns what was read, what differs, and the new cursor
    (None: leave it)."""
    if latest.id == 0:
        return 0, [], None
    cursor = await conn.fetchval("SELECT reverified_id FROM audit_cursor")
    first = cursor % latest.id + 1
    rows = await conn.fetch(
        "SELECT id, sequence, transfers, segment_hash, hash FROM audit_checkpoints"
        " WHERE id >= $1 AND id <= $2 ORDER BY id",
        first - 1,
        min(latest.id, first + _REVERIFY_SEGMENTS - 1),
    )
    chain = {r["id"]: r for r in rows}
    ranges: list[tuple[int, int, int]] = []  # (id, after, upto)
    problems: list[str] = []
    total = 0
    for at in range(first, min(latest.id, first + _REVERIFY_SEGMENTS - 1) + 1):
        if at not in chain or (at > 1 and at - 1 not in chain):
            problems.append(f"checkpoint {at if at not in chain else at - 1} is missing")
            break
        after = chain[at - 1]["sequence"] if at > 1 else 0
        ranges.append((at, after, chain[at]["sequence"]))
        total += chain[at]["transfers"]
        if total >= budget:
            break
    read = 0
    found = await conn.fetch(
        _SEGMENTS, [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]
    )
    for row in found:
        at, stored = row["id"], chain[row["id"]]
        read += row["n"]
        before_hash = bytes(chain[at - 1]["hash"]) if at > 1 else _GENESIS
        if row["n"] != stored["transfers"] or bytes(row["digest"]) != bytes(stored["segment_hash"]):
            after = chain[at - 1]["sequence"] if at > 1 else 0
            problems.append(
                f"checkpoint {at}: the transfers of sequences {after + 1}..{stored['sequence']}"
                f" changed since it was written ({row['n']} now, {stored['transfers']} then)"
            )
        elif bytes(stored["hash"]) != chain_hash(
            before_hash, at, stored["sequence"], stored["transfers"], bytes(stored["segment_hash"])
        ):
            problems.append(f"checkpoint {at}: its hash does not follow from checkpoint {at - 1}")
    return read, problems, None if problems or not ranges else ranges[-1][0]


async def run_audit(
    pool: asyncpg.Pool,
    assets: Sequence[str] = (),
    *,
    reverify_budget: int = REVERIFY_BUDGET,
) -> AuditReport:
    """One audit on one REPEATABLE READ snapshot (no locks), from the latest
    checkpoint. An audit of every asset that passes writes the next checkpoint
    (when there were new transfers) in the same transaction; one that loses a
    race with another auditor's checkpoint keeps its verdict and writes none."""
    wanted = list(assets)
    report: AuditReport | None = None
    async with pool.acquire() as conn:
        transaction = conn.transaction(isolation="repeatable_read")
        await transaction.start()
        try:
            report, latest, cursor = await _audit(conn, wanted, reverify_budget)
            if not wanted:
                await _advance(conn, report, latest, cursor)
            await transaction.commit()
        except (
            asyncpg.SerializationError,
            asyncpg.UniqueViolationError,
            asyncpg.DeadlockDetectedError,
        ):
            # Another audit moved the checkpoint after this one's snapshot: the
            # verdict stands, the checkpoint is theirs.
            await transaction.rollback()
            if report is None:
                raise
            report.checkpoint_id, report.checkpoint_hash = 0, ""
        except BaseException:
            await transaction.rollback()
            raise
    if report.checkpoint_id:
        _log.info(
            "audit checkpoint %d at sequence %d (%d transfers replayed): %s",
            report.checkpoint_id,
            report.sequence,
            report.transfers_replayed,
            report.checkpoint_hash,
        )
    return report


async def _audit(
    conn: Connection, wanted: list[str], reverify_budget: int
) -> tuple[AuditReport, _Checkpoint, int | None]:
    """The verdict, read on the transaction's snapshot; writes nothing."""
    sequence = await conn.fetchval("SELECT last_sequence FROM meta")
    latest = await _checkpoint(conn, "ORDER BY id DESC LIMIT 1") or _ORIGIN
    reports: dict[str, AssetReport] = {a: AssetReport(a) for a in wanted}
    for row in await conn.fetch(_TOTALS, wanted):
        report = reports.setdefault(row["asset"], AssetReport(row["asset"]))
        report.debits_posted = int(row["dp"])
        report.credits_posted = int(row["cp"])
        report.debits_pending = int(row["dpe"])
        report.credits_pending = int(row["cpe"])
        report.account_count = row["n"]
    for row in await conn.fetch(_NEGATIVE, wanted):
        report = reports.setdefault(row["asset"], AssetReport(row["asset"]))
        if len(report.negative_account_ids) < 100:
            report.negative_account_ids.append(row["account_id"])
    for row in await conn.fetch(_HOLDS, wanted):
        report = reports.setdefault(row["asset"], AssetReport(row["asset"]))
        report.pending_transfer_count = row["n"]
        report.open_holds = int(row["open"])
    for row in await conn.fetch(_REPLAY, wanted, latest.sequence, sequence):
        report = reports.setdefault(row["asset"], AssetReport(row["asset"]))
        report.replay_mismatches = row["n"]
    halt = await conn.fetchrow("SELECT halted, reason FROM halt")
    anomalies = await conn.fetchval("SELECT count(*) FROM settlement_anomalies")
    assert halt is not None
    spans = _spans(latest.id, latest.sequence, sequence)
    segments = await conn.fetch(
        _SEGMENTS, [s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans]
    )
    result = AuditReport(
        assets=[reports[a] for a in sorted(reports)],
        sequence=sequence,
        halted=halt["halted"],
        halt_reason=halt["reason"],
        anomalies=anomalies,
        checkpoint_sequence=latest.sequence,
        transfers_replayed=sum(r["n"] for r in segments),
        segments=[
            (span[0], span[2], r["n"], bytes(r["digest"]))
            for span, r in zip(spans, segments, strict=True)
        ],
    )
    cursor = None
    if not wanted:  # the chain covers every asset: only an audit of all of them checks it
        read, result.problems, cursor = await _reverify(conn, latest, reverify_budget)
        result.transfers_reverified = read
    return result, latest, cursor


async def _advance(
    conn: Connection, report: AuditReport, latest: _Checkpoint, cursor: int | None
) -> None:
    """The next checkpoint, if this audit passed and there is something new."""
    if cursor is not None:
        await conn.execute("UPDATE audit_cursor SET reverified_id = $1", cursor)
    if not report.balanced or report.sequence == latest.sequence:
        return
    await conn.execute(_ADVANCE, [], latest.sequence, report.sequence)
    previous = latest.hash
    rows = []
    for checkpoint_id, upto, count, digest in report.segments:
        previous = chain_hash(previous, checkpoint_id, upto, count, digest)
        rows.append((checkpoint_id, upto, count, digest, previous))
    await conn.executemany(
        "INSERT INTO audit_checkpoints (id, sequence, transfers, segment_hash, hash)"
        " VALUES ($1, $2, $3, $4, $5)",
        rows,
    )
    checkpoint_id, chained = rows[-1][0], previous
    report.checkpoint_id = checkpoint_id
    report.checkpoint_hash = chained.hex()


class Auditor:
    """Runs audits, exports their outcome and sets the halt flag on a violation."""

    def __init__(
        self, pool: asyncpg.Pool, metrics: LedgerMetrics, *, reverify_budget: int = REVERIFY_BUDGET
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._reverify_budget = reverify_budget

    async def audit(self, assets: Sequence[str] = ()) -> AuditReport:
        report = await run_audit(self._pool, assets, reverify_budget=self._reverify_budget)
        self._metrics.audit_transfers.labels("replayed").set(report.transfers_replayed)
        self._metrics.audit_transfers.labels("reverified").set(report.transfers_reverified)
        self._metrics.audit_checkpoint.set(report.checkpoint_sequence)
        problems: list[str] = []
        for asset in report.assets:
            self._metrics.audit_violations.labels(asset.asset).set(len(asset.violations))
            problems.extend(f"{asset.asset}: {v}" for v in asset.violations)
        if not assets:
            self._metrics.audit_violations.labels("checkpoints").set(len(report.problems))
        problems.extend(f"checkpoints: {p}" for p in report.problems)
        if problems:
            reason = "; ".join(problems)[:1000]
            _log.error("LEDGER AUDIT VIOLATION, halting withdrawals: %s", reason)
            await self._pool.execute(
                "UPDATE halt SET halted = true, reason = $1, since = now() WHERE NOT halted",
                reason,
            )
            report.halted = True
            report.halt_reason = report.halt_reason or reason
        self._metrics.halted.set(1 if report.halted else 0)
        return report

    async def run(self, interval_s: float) -> None:
        await poll_until_cancelled(
            self.audit,
            interval_s,
            log=_log,
            failed="audit failed to run",
            level=logging.ERROR,
            drain=False,
        )
