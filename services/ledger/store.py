"""PostgreSQL access to the ledger's tables: the book of record of balances.

They are written by the balance owner, the match group's writer (ADR 0013),
which keeps every account and every open hold in memory as one long-lived
`Book`: `load_book` reads them when the writer starts, `load_transfers` adds
the transfers and remembered failures a batch names by id, and `save` writes
what the batch changed (COPY of the new transfers, one update and one COPY for
the changed and new accounts, one update of the changed holds, the failures,
trade keys, cursors and anomalies, and the new last sequence) inside the
writer's own transaction, the one that commits its journal. The ledger service
reads them (balances, transfers, the audit).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from services.chassis import ExchangeError, ns_from_utc, utc_from_ns
from services.chassis.db import Statement
from services.chassis.where import Where

from .domain import Account, Book, Failure, Kind, Op, State, Transfer

__all__ = ["MIGRATIONS", "Connection", "Store"]

MIGRATIONS = Path(__file__).with_name("migrations")

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

TRANSFER_COLUMNS = (
    "id",
    "sequence",
    "op",
    "debit_account_id",
    "credit_account_id",
    "asset",
    "amount",
    "pending_id",
    "linked",
    "timeout_ns",
    "expires_at",
    "kind",
    "reference",
    "state",
    "remaining",
    "fingerprint",
    "create_time",
)
_SELECT_TRANSFER = "SELECT " + ", ".join(TRANSFER_COLUMNS) + " FROM transfers"
_TRANSFER_TYPES = dict(
    zip(
        TRANSFER_COLUMNS,
        ("text", "int8", "int2", "text", "text", "text", "int8", "text", "bool", "int8",
         "timestamptz", "int2", "text", "int2", "int8", "text", "timestamptz"),
        strict=True,
    )
)  # fmt: skip
_ACCOUNT_TYPES = {
    "account_id": "text", "asset": "text", "is_system": "bool", "debits_posted": "int8",
    "credits_posted": "int8", "debits_pending": "int8", "credits_pending": "int8",
    "update_time": "timestamptz",
}  # fmt: skip


def transfer_from_row(row: asyncpg.Record) -> Transfer:
    state = State(row["state"])
    return Transfer(
        id=row["id"],
        sequence=row["sequence"],
        op=Op(row["op"]),
        debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"],
        asset=row["asset"],
        amount=row["amount"],
        pending_id=row["pending_id"] or "",
        linked=row["linked"],
        timeout_ns=row["timeout_ns"],
        expires_at_ns=None if row["expires_at"] is None else ns_from_utc(row["expires_at"]),
        kind=Kind(row["kind"]),
        reference=row["reference"],
        state=state,
        remaining=row["remaining"],
        fingerprint=row["fingerprint"],
        create_time_ns=ns_from_utc(row["create_time"]),
        stored=(state, row["remaining"]),
    )


def _transfer_record(t: Transfer, now: datetime) -> tuple[Any, ...]:
    return (
        t.id,
        t.sequence,
        int(t.op),
        t.debit_account_id,
        t.credit_account_id,
        t.asset,
        t.amount,
        t.pending_id or None,
        t.linked,
        t.timeout_ns,
        None if t.expires_at_ns is None else utc_from_ns(t.expires_at_ns),
        int(t.kind),
        t.reference,
        int(t.state),
        t.remaining,
        t.fingerprint,
        now,
    )


def account_from_row(row: asyncpg.Record) -> Account:
    values = (
        row["debits_posted"],
        row["credits_posted"],
        row["debits_pending"],
        row["credits_pending"],
    )
    return Account(
        row["account_id"],
        row["asset"],
        *values,
        update_time_ns=ns_from_utc(row["update_time"]),
        stored=values,
    )


class Store:
    def __init__(self, pool: asyncpg.Pool, assets: Iterable[str]) -> None:
        self.pool = pool
        self.assets = frozenset(assets)

    async def load_book(self, conn: Connection) -> Book:
        """Every account and every open hold, the sequence, the halt flag, the cursors."""
        meta = await conn.fetchrow("SELECT m.last_sequence, h.halted FROM meta m, halt h")
        assert meta is not None
        book = Book(
            now_ns=0,
            last_sequence=meta["last_sequence"],
            halted=meta["halted"],
            assets=self.assets,
        )
        for row in await conn.fetch("SELECT * FROM accounts"):
            account = account_from_row(row)
            book.accounts[account.key] = account
        for row in await conn.fetch(_SELECT_TRANSFER + " WHERE op = 2 AND state = 1"):
            record = transfer_from_row(row)
            book.transfers[record.id] = record
        return book

    async def load_transfers(self, conn: Connection, book: Book, ids: Iterable[str]) -> None:
        """The transfers and remembered failures of these ids that `book` lacks;
        and the halt flag as it is now (the auditor sets it)."""
        book.halted = bool(await conn.fetchval("SELECT halted FROM halt"))
        missing = sorted({i for i in ids if i not in book.transfers})
        if not missing:
            return
        for row in await conn.fetch(_SELECT_TRANSFER + " WHERE id = ANY($1::text[])", missing):
            record = transfer_from_row(row)
            book.transfers[record.id] = record
        rows = await conn.fetch(
            "SELECT id, fingerprint, code, reason, message, metadata FROM failed_transfers"
            " WHERE id = ANY($1::text[])",
            missing,
        )
        for row in rows:
            error = ExchangeError(
                row["reason"],
                row["message"],
                code=_code(row["code"]),
                metadata=json.loads(row["metadata"]),
            )
            book.failures[row["id"]] = Failure(row["id"], row["fingerprint"], error)

    def save(self, statement: Statement, book: Book) -> None:
        """The book's changes, as writes of the balance owner's one-statement commit
        (schema-qualified: the statement runs on match's connection)."""
        now = utc_from_ns(book.now_ns)  # every row this group writes carries its time
        statement.insert(
            "ledger.transfers",
            _TRANSFER_TYPES,
            [_transfer_record(t, now) for t in book.new_transfers],
        )
        changed = book.changed_accounts()
        updated = [a for a in changed if a.stored is not None]
        if updated:
            statement.add(
                """UPDATE ledger.accounts a SET debits_posted = u.dp, credits_posted = u.cp,
                       debits_pending = u.dpe, credits_pending = u.cpe, update_time = $7
                   FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[],
                       $6::int8[]) AS u(account_id, asset, dp, cp, dpe, cpe)
                   WHERE a.account_id = u.account_id AND a.asset = u.asset""",
                [a.account_id for a in updated],
                [a.asset for a in updated],
                [a.debits_posted for a in updated],
                [a.credits_posted for a in updated],
                [a.debits_pending for a in updated],
                [a.credits_pending for a in updated],
                now,
            )
        # New accounts: a concurrent writer (another process) creating the same one
        # makes the commit fail, and the group is retried.
        statement.insert(
            "ledger.accounts",
            _ACCOUNT_TYPES,
            [
                (
                    a.account_id,
                    a.asset,
                    a.is_system,
                    a.debits_posted,
                    a.credits_posted,
                    a.debits_pending,
                    a.credits_pending,
                    now,
                )
                for a in changed
                if a.stored is None
            ],
        )
        pendings = book.changed_pendings()  # stored before this batch: not a new row
        if pendings:
            statement.add(
                """UPDATE ledger.transfers t SET state = u.state, remaining = u.remaining
                   FROM unnest($1::text[], $2::int2[], $3::int8[]) AS u(id, state, remaining)
                   WHERE t.id = u.id""",
                [t.id for t in pendings],
                [int(t.state) for t in pendings],
                [t.remaining for t in pendings],
            )
        statement.insert(
            "ledger.failed_transfers",
            {"id": "text", "fingerprint": "text", "code": "int4", "reason": "text",
             "message": "text", "metadata": "text"},
            [
                (
                    f.id,
                    f.fingerprint,
                    f.error.code.value[0],
                    f.error.reason,
                    f.error.message,
                    json.dumps(f.error.metadata),
                )
                for f in book.new_failures
            ],
        )  # fmt: skip
        statement.insert(
            "ledger.settled_trades",
            {"market": "text", "trade_id": "text", "seq": "int8"},
            book.new_trades,
        )
        statement.insert(
            "ledger.settlement_anomalies",
            {"market": "text", "seq": "int8", "kind": "text", "order_id": "text",
             "asset": "text", "amount": "int8", "detail": "text"},
            [
                (a.market, a.seq, a.kind, a.order_id, a.asset, a.amount, a.detail)
                for a in book.anomalies
            ],
        )  # fmt: skip
        statement.add("UPDATE ledger.meta SET last_sequence = $1", book.last_sequence)

    # -- reads outside the write path ---------------------------------------

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        row = await self.pool.fetchrow(_SELECT_TRANSFER + " WHERE id = $1", transfer_id)
        return None if row is None else transfer_from_row(row)

    async def get_transfers(self, ids: Sequence[str]) -> dict[str, Transfer]:
        rows = await self.pool.fetch(_SELECT_TRANSFER + " WHERE id = ANY($1::text[])", list(ids))
        return {row["id"]: transfer_from_row(row) for row in rows}

    async def balances(self, account_id: str, assets: Sequence[str]) -> list[Account]:
        rows = await self.pool.fetch(
            "SELECT * FROM accounts WHERE account_id = $1"
            " AND (cardinality($2::text[]) = 0 OR asset = ANY($2::text[])) ORDER BY asset",
            account_id,
            list(assets),
        )
        return [account_from_row(r) for r in rows]

    async def list_transfers(
        self,
        *,
        account_id: str,
        asset: str,
        reference: str,
        kind: int,
        state: int,
        start_ns: int | None,
        end_ns: int | None,
        after_sequence: int,
        limit: int,
    ) -> list[Transfer]:
        where = Where("sequence > $1", after_sequence)
        if account_id:
            p = where.arg(account_id)
            where.add(f"(debit_account_id = {p} OR credit_account_id = {p})")
        where.compare("asset", "=", asset or None)
        where.compare("reference", "=", reference or None)
        where.compare("kind", "=", kind or None)
        where.compare("state", "=", state or None)
        where.compare("create_time", ">=", None if start_ns is None else utc_from_ns(start_ns))
        where.compare("create_time", "<", None if end_ns is None else utc_from_ns(end_ns))
        sql = f"{_SELECT_TRANSFER}{where.sql} ORDER BY sequence LIMIT {limit}"
        return [transfer_from_row(r) for r in await self.pool.fetch(sql, *where.args)]


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.FAILED_PRECONDITION
