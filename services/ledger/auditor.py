"""The auditor: the ledger's invariants, checked on one consistent snapshot.

Per asset: posted debits equal posted credits and pending debits equal pending
credits over all accounts (the sum of all balances is zero); no user account is
negative; every account's four columns equal the replay of its transfers; the
pending columns equal the open holds. A violation is exported as a gauge,
logged loudly, and sets the persisted halt flag (table `halt`), which makes
the ledger refuse new WITHDRAWAL transfers until an operator clears it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

__all__ = ["AssetReport", "AuditReport", "Auditor", "LedgerMetrics", "run_audit"]

_log = logging.getLogger("cex.ledger.audit")


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
    assets: list[AssetReport]
    sequence: int
    halted: bool
    halt_reason: str
    anomalies: int

    @property
    def balanced(self) -> bool:
        return all(a.balanced for a in self.assets)


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
_REPLAY = """
WITH effects AS (
    SELECT debit_account_id AS account_id, asset,
           CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END AS dp, 0::bigint AS cp,
           CASE WHEN op = 2 AND state = 1 THEN remaining ELSE 0 END AS dpe, 0::bigint AS cpe
    FROM transfers
    UNION ALL
    SELECT credit_account_id, asset, 0, CASE WHEN op IN (1, 3, 5) THEN amount ELSE 0 END,
           0, CASE WHEN op = 2 AND state = 1 THEN remaining ELSE 0 END
    FROM transfers
), replay AS (
    SELECT account_id, asset, sum(dp) AS dp, sum(cp) AS cp, sum(dpe) AS dpe, sum(cpe) AS cpe
    FROM effects GROUP BY account_id, asset
)
SELECT coalesce(a.asset, r.asset) AS asset, count(*) AS n
FROM accounts a FULL JOIN replay r USING (account_id, asset)
WHERE (cardinality($1::text[]) = 0 OR coalesce(a.asset, r.asset) = ANY($1::text[]))
  AND (a.account_id IS NULL OR r.account_id IS NULL
       OR (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
          IS DISTINCT FROM (r.dp, r.cp, r.dpe, r.cpe))
GROUP BY 1"""


async def run_audit(pool: asyncpg.Pool, assets: Sequence[str] = ()) -> AuditReport:
    """One audit on a REPEATABLE READ snapshot (read only, no locks)."""
    wanted = list(assets)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        sequence = await conn.fetchval("SELECT last_sequence FROM meta")
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
        for row in await conn.fetch(_REPLAY, wanted):
            report = reports.setdefault(row["asset"], AssetReport(row["asset"]))
            report.replay_mismatches = row["n"]
        halt = await conn.fetchrow("SELECT halted, reason FROM halt")
        anomalies = await conn.fetchval("SELECT count(*) FROM settlement_anomalies")
    assert halt is not None
    return AuditReport(
        assets=[reports[a] for a in sorted(reports)],
        sequence=sequence,
        halted=halt["halted"],
        halt_reason=halt["reason"],
        anomalies=anomalies,
    )


class Auditor:
    """Runs audits, exports their outcome and sets the halt flag on a violation."""

    def __init__(self, pool: asyncpg.Pool, metrics: LedgerMetrics) -> None:
        self._pool = pool
        self._metrics = metrics

    async def audit(self, assets: Sequence[str] = ()) -> AuditReport:
        report = await run_audit(self._pool, assets)
        problems: list[str] = []
        for asset in report.assets:
            self._metrics.audit_violations.labels(asset.asset).set(len(asset.violations))
            problems.extend(f"{asset.asset}: {v}" for v in asset.violations)
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
        while True:
            try:
                await self.audit()
            except Exception:
                _log.exception("audit failed to run")
            await asyncio.sleep(interval_s)
