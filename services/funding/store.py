"""PostgreSQL access for funding's rows: withdrawals, deposits, addresses, sagas, outbox.

Functions take a connection so that callers can put several in one transaction
(a withdrawal and its saga; a step's outcome and the rows it changes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import asyncpg

from services.chassis import from_row
from services.chassis.tracing import carrier

from .domain import OPEN_STATES, LogEntry, SagaRecord

__all__ = [
    "AccountPage",
    "AddressRow",
    "AllowlistRow",
    "Connection",
    "DepositRow",
    "Page",
    "SagaRow",
    "StepRow",
    "WithdrawalRow",
    "emit",
]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool


class _Record:
    """A row type read straight from its table (chassis' from_row): `of` takes every
    column the dataclass names, but those `given` (decoded, or from elsewhere)."""

    __slots__ = ()

    @classmethod
    def of(cls, row: asyncpg.Record, **given: Any) -> Self:
        return from_row(cls, row, **given)


@dataclass(frozen=True, slots=True)
class WithdrawalRow(_Record):
    withdrawal_id: str
    request_id: str
    account_id: str
    fingerprint: str
    asset: str
    network: str
    amount: int
    fee: int
    address: str
    memo: str
    state: str
    cancel_requested: bool
    broadcast_started: bool
    txid: str
    confirmations: int
    required_confirmations: int
    failure: bytes | None
    saga_id: str
    create_time: datetime
    update_time: datetime
    complete_time: datetime | None
    approval_required: bool = False
    approval_deadline: datetime | None = None
    review: str = ""
    reviewed_by: str = ""
    review_reason: str = ""
    review_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class AddressRow(_Record):
    address_id: str
    account_id: str
    asset: str
    network: str
    address: str
    label: str
    create_time: datetime
    usable_time: datetime
    remove_time: datetime | None


@dataclass(frozen=True, slots=True)
class AllowlistRow:
    account_id: str
    enabled: bool
    disable_time: datetime | None
    update_time: datetime | None


@dataclass(frozen=True, slots=True)
class DepositRow(_Record):
    deposit_id: str
    txid: str
    output_index: int
    account_id: str
    asset: str
    network: str
    amount: int
    address: str
    memo: str
    confirmations: int
    required_confirmations: int
    state: str
    reverted: bool
    ledger_transfer_id: str
    saga_id: str
    detect_time: datetime
    credit_time: datetime | None
    update_time: datetime


@dataclass(frozen=True, slots=True)
class StepRow(_Record):
    idx: int
    name: str
    compensation: bool
    state: str
    attempt: int
    error: bytes | None
    outputs: dict[str, str]
    record_time: datetime


@dataclass(frozen=True, slots=True)
class SagaRow(_Record):
    saga_id: str
    kind: str
    reference_id: str
    account_id: str
    state: str
    current_step: str
    create_time: datetime
    update_time: datetime
    steps: tuple[StepRow, ...] = ()


@dataclass(frozen=True, slots=True)
class Page:
    """Keyset position for newest-first lists: (time, id) of the last row returned."""

    time: datetime | None = None
    key: str = ""


@dataclass(frozen=True, slots=True)
class AccountPage:
    """A page of an account's deposits or withdrawals as ListDeposits and
    ListWithdrawals ask for it: filters ("" = any), a time range, where it goes on."""

    account_id: str
    asset: str
    state: str
    start: datetime | None
    end: datetime | None
    after: Page = Page()  # the pager sets these two
    limit: int = 0


def _account_list(table: str, time_column: str, key_column: str) -> str:
    """The query of an AccountPage of `table`, newest first by (time, key)."""
    return f"""SELECT * FROM {table}
           WHERE account_id = $1 AND ($2 = '' OR asset = $2) AND ($3 = '' OR state = $3)
             AND ($4::timestamptz IS NULL OR {time_column} >= $4)
             AND ($5::timestamptz IS NULL OR {time_column} < $5)
             AND ($6::timestamptz IS NULL OR ({time_column}, {key_column}) < ($6, $7))
           ORDER BY {time_column} DESC, {key_column} DESC LIMIT $8"""


_WITHDRAWALS = _account_list("withdrawals", "create_time", "withdrawal_id")
_DEPOSITS = _account_list("deposits", "detect_time", "deposit_id")


async def _account_rows(conn: Connection, query: str, page: AccountPage) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        query,
        page.account_id,
        page.asset,
        page.state,
        page.start,
        page.end,
        page.after.time,
        page.after.key,
        page.limit,
    )
    return rows


async def emit(conn: Connection, subject: str, payload: dict[str, Any]) -> None:
    """An event, in the transaction that makes it true (the outbox relays it)."""
    trace = carrier()  # the step's span: the relay puts it in the message's headers
    await conn.execute(
        "INSERT INTO outbox (subject, payload, trace_context) VALUES ($1, $2, $3)",
        subject,
        json.dumps(payload),
        json.dumps(trace) if trace else None,
    )


# -- withdrawals ------------------------------------------------------------------


async def insert_withdrawal(conn: Connection, row: WithdrawalRow) -> bool:
    """False if (account_id, request_id) exists already."""
    inserted = await conn.fetchval(
        """INSERT INTO withdrawals (withdrawal_id, request_id, account_id, fingerprint, asset,
               network, amount, fee, address, memo, state, required_confirmations, saga_id,
               create_time, update_time, approval_required, approval_deadline)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'PENDING', $11, $12, $13, $13,
                   $14, $15)
           ON CONFLICT (account_id, request_id) DO NOTHING
           RETURNING true""",
        row.withdrawal_id,
        row.request_id,
        row.account_id,
        row.fingerprint,
        row.asset,
        row.network,
        row.amount,
        row.fee,
        row.address,
        row.memo,
        row.required_confirmations,
        row.saga_id,
        row.create_time,
        row.approval_required,
        row.approval_deadline,
    )
    return bool(inserted)


async def withdrawal(
    conn: Connection, withdrawal_id: str, *, lock: bool = False
) -> WithdrawalRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM withdrawals WHERE withdrawal_id = $1" + (" FOR UPDATE" if lock else ""),
        withdrawal_id,
    )
    return WithdrawalRow.of(row) if row else None


async def withdrawal_by_request(
    conn: Connection, account_id: str, request_id: str
) -> WithdrawalRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM withdrawals WHERE account_id = $1 AND request_id = $2",
        account_id,
        request_id,
    )
    return WithdrawalRow.of(row) if row else None


async def list_withdrawals(conn: Connection, page: AccountPage) -> list[WithdrawalRow]:
    return [WithdrawalRow.of(r) for r in await _account_rows(conn, _WITHDRAWALS, page)]


async def record_cancel(
    conn: Connection, account_id: str, request_id: str, withdrawal_id: str
) -> str:
    """Remembers the cancel's request_id; returns the withdrawal it names (maybe another)."""
    await conn.execute(
        """INSERT INTO cancel_requests (account_id, request_id, withdrawal_id)
           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING""",
        account_id,
        request_id,
        withdrawal_id,
    )
    found: str = await conn.fetchval(
        "SELECT withdrawal_id FROM cancel_requests WHERE account_id = $1 AND request_id = $2",
        account_id,
        request_id,
    )
    return found


# -- the address allowlist ---------------------------------------------------------


async def lock_allowlist(conn: Connection, account_id: str, *, shared: bool = False) -> None:
    """Serializes what changes an account's allowlist (exclusive) with the withdrawal
    requests it checks (shared), to the transaction's end."""
    lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    await conn.execute(f"SELECT {lock}(hashtext('funding.allowlist:' || $1))", account_id)


async def allowlist(conn: Connection, account_id: str) -> AllowlistRow:
    row = await conn.fetchrow(
        "SELECT * FROM withdrawal_allowlists WHERE account_id = $1", account_id
    )
    if row is None:
        return AllowlistRow(account_id, False, None, None)
    return AllowlistRow(account_id, row["enabled"], row["disable_time"], row["update_time"])


async def save_allowlist(
    conn: Connection,
    account_id: str,
    *,
    enabled: bool,
    disable_time: datetime | None,
    now: datetime,
) -> AllowlistRow:
    await conn.execute(
        """INSERT INTO withdrawal_allowlists (account_id, enabled, disable_time, update_time)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (account_id) DO UPDATE
           SET enabled = $2, disable_time = $3, update_time = $4""",
        account_id,
        enabled,
        disable_time,
        now,
    )
    return AllowlistRow(account_id, enabled, disable_time, now)


async def add_withdrawal_address(conn: Connection, row: AddressRow) -> AddressRow:
    """The listed address: `row` if it was not listed, else the one already listed."""
    await conn.execute(
        """INSERT INTO withdrawal_addresses (address_id, account_id, asset, network, address,
               label, create_time, usable_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (account_id, asset, address) WHERE remove_time IS NULL DO NOTHING""",
        row.address_id,
        row.account_id,
        row.asset,
        row.network,
        row.address,
        row.label,
        row.create_time,
        row.usable_time,
    )
    listed = await listed_address(conn, row.account_id, row.asset, row.address)
    assert listed is not None
    return listed


async def listed_address(
    conn: Connection, account_id: str, asset: str, address: str
) -> AddressRow | None:
    row = await conn.fetchrow(
        """SELECT * FROM withdrawal_addresses
           WHERE account_id = $1 AND asset = $2 AND address = $3 AND remove_time IS NULL""",
        account_id,
        asset,
        address,
    )
    return AddressRow.of(row) if row else None


async def withdrawal_address(conn: Connection, address_id: str) -> AddressRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM withdrawal_addresses WHERE address_id = $1", address_id
    )
    return AddressRow.of(row) if row else None


async def remove_withdrawal_address(conn: Connection, address_id: str, now: datetime) -> AddressRow:
    """Removes it (if still listed) and returns it."""
    row = await conn.fetchrow(
        """UPDATE withdrawal_addresses SET remove_time = COALESCE(remove_time, $2)
           WHERE address_id = $1 RETURNING *""",
        address_id,
        now,
    )
    assert row is not None
    return AddressRow.of(row)


async def list_withdrawal_addresses(
    conn: Connection, account_id: str, *, asset: str, after: Page, limit: int
) -> list[AddressRow]:
    rows = await conn.fetch(
        """SELECT * FROM withdrawal_addresses
           WHERE account_id = $1 AND remove_time IS NULL AND ($2 = '' OR asset = $2)
             AND ($3::timestamptz IS NULL OR (create_time, address_id) < ($3, $4))
           ORDER BY create_time DESC, address_id DESC LIMIT $5""",
        account_id,
        asset,
        after.time,
        after.key,
        limit,
    )
    return [AddressRow.of(r) for r in rows]


async def keyed_request(conn: Connection, actor: str, request_id: str) -> tuple[str, str] | None:
    """(fingerprint, target) of an idempotency key seen before, or None."""
    row = await conn.fetchrow(
        "SELECT fingerprint, target FROM keyed_requests WHERE actor = $1 AND request_id = $2",
        actor,
        request_id,
    )
    return (row["fingerprint"], row["target"]) if row else None


async def save_keyed_request(
    conn: Connection, actor: str, request_id: str, *, method: str, fingerprint: str, target: str
) -> None:
    """Records an idempotency key with what it did (in the call's transaction)."""
    await conn.execute(
        """INSERT INTO keyed_requests (actor, request_id, method, fingerprint, target)
           VALUES ($1, $2, $3, $4, $5)""",
        actor,
        request_id,
        method,
        fingerprint,
        target,
    )


# -- deposits -----------------------------------------------------------------------


async def deposit_address(
    conn: Connection, account_id: str, asset: str, network: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM deposit_addresses WHERE account_id = $1 AND asset = $2 AND network = $3",
        account_id,
        asset,
        network,
    )
    return row


async def save_deposit_address(
    conn: Connection, account_id: str, asset: str, network: str, address: str
) -> asyncpg.Record:
    await conn.execute(
        """INSERT INTO deposit_addresses (account_id, asset, network, address)
           VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, asset, network) DO NOTHING""",
        account_id,
        asset,
        network,
        address,
    )
    row = await deposit_address(conn, account_id, asset, network)
    assert row is not None
    return row


async def address_owner(conn: Connection, network: str, address: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM deposit_addresses WHERE network = $1 AND address = $2 AND memo = ''",
        network,
        address,
    )
    return row


async def chain_cursor(conn: Connection, *, lock: bool = False) -> int:
    value = await conn.fetchval("SELECT seq FROM chain_cursor" + (" FOR UPDATE" if lock else ""))
    return int(value)


async def move_chain_cursor(conn: Connection, seq: int) -> None:
    await conn.execute("UPDATE chain_cursor SET seq = $1", seq)


async def record_chain_anomaly(
    conn: Connection,
    kind: str,
    *,
    cursor_seq: int,
    chain_seq: int,
    chain_height: int,
    detail: str,
    deposit_id: str = "",
) -> int:
    value = await conn.fetchval(
        """INSERT INTO chain_anomalies (kind, deposit_id, cursor_seq, chain_seq, chain_height,
                                        detail)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        kind,
        deposit_id,
        cursor_seq,
        chain_seq,
        chain_height,
        detail,
    )
    return int(value)


async def chain_anomalies(conn: Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM chain_anomalies ORDER BY id"))


async def deposit(conn: Connection, deposit_id: str, *, lock: bool = False) -> DepositRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM deposits WHERE deposit_id = $1" + (" FOR UPDATE" if lock else ""),
        deposit_id,
    )
    return DepositRow.of(row) if row else None


async def deposit_by_output(
    conn: Connection, network: str, txid: str, output_index: int, *, lock: bool = False
) -> DepositRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM deposits WHERE network = $1 AND txid = $2 AND output_index = $3"
        + (" FOR UPDATE" if lock else ""),
        network,
        txid,
        output_index,
    )
    return DepositRow.of(row) if row else None


async def list_deposits(conn: Connection, page: AccountPage) -> list[DepositRow]:
    return [DepositRow.of(r) for r in await _account_rows(conn, _DEPOSITS, page)]


# -- sagas --------------------------------------------------------------------------


async def saga(conn: Connection, saga_id: str) -> SagaRow | None:
    row = await conn.fetchrow("SELECT * FROM sagas WHERE saga_id = $1", saga_id)
    if row is None:
        return None
    steps = await conn.fetch("SELECT * FROM saga_steps WHERE saga_id = $1 ORDER BY idx", saga_id)
    return SagaRow.of(
        row, steps=tuple(StepRow.of(s, outputs=json.loads(s["outputs"])) for s in steps)
    )


async def list_sagas(
    conn: Connection, *, kind: str, state: str, account_id: str, after: Page, limit: int
) -> list[SagaRow]:
    rows = await conn.fetch(
        """SELECT * FROM sagas
           WHERE ($1 = '' OR kind = $1) AND ($2 = '' OR state = $2)
             AND ($3 = '' OR account_id = $3)
             AND ($4::timestamptz IS NULL OR (create_time, saga_id) < ($4, $5))
           ORDER BY create_time DESC, saga_id DESC LIMIT $6""",
        kind,
        state,
        account_id,
        after.time,
        after.key,
        limit,
    )
    return [SagaRow.of(r, steps=()) for r in rows]


# -- the orchestrator's rows ------------------------------------------------------------


def _record(row: asyncpg.Record) -> SagaRecord:
    return from_row(
        SagaRecord,
        row,
        data=json.loads(row["data"]),
        epoch=row["lease_epoch"],
        trace_context=json.loads(row["trace_context"]) if row["trace_context"] else None,
    )


async def insert_saga(
    conn: Connection,
    *,
    saga_id: str,
    kind: str,
    reference_id: str,
    account_id: str,
    first_step: str,
    data: dict[str, Any],
    deadline: datetime,
    now: datetime,
    trace_context: dict[str, str] | None,
) -> None:
    await conn.execute(
        """INSERT INTO sagas (saga_id, kind, reference_id, account_id, state, step_index,
               attempt, current_step, data, deadline, next_run_at, create_time, update_time,
               trace_context)
           VALUES ($1, $2, $3, $4, 'RUNNING', 0, 0, $5, $6, $7, $8, $8, $8, $9)""",
        saga_id,
        kind,
        reference_id,
        account_id,
        first_step,
        json.dumps(data),
        deadline,
        now,
        json.dumps(trace_context) if trace_context else None,
    )


async def nudge_saga(conn: Connection, saga_id: str, now: datetime) -> None:
    """Due now (if still open), instead of at its next retry."""
    await conn.execute(
        "UPDATE sagas SET next_run_at = $2 WHERE saga_id = $1 AND state = ANY($3)",
        saga_id,
        now,
        list(OPEN_STATES),
    )


async def oldest_open_sagas(conn: Connection) -> dict[str, datetime]:
    """The creation time of the oldest unfinished saga of each kind that has one."""
    rows = await conn.fetch(
        """SELECT kind, min(create_time) AS oldest FROM sagas
           WHERE state IN ('RUNNING', 'COMPENSATING') GROUP BY kind"""
    )
    return {row["kind"]: row["oldest"] for row in rows}


async def claim_sagas(
    conn: Connection,
    *,
    owner: str,
    lease_until: datetime,
    now: datetime,
    skip: list[str],
    limit: int,
) -> list[SagaRecord]:
    """Leases up to `limit` due open sagas to `owner` (its own at once, others' once their
    lease lapsed), each with a new epoch; rows another claimer holds are skipped."""
    rows = await conn.fetch(
        """UPDATE sagas s SET lease_owner = $1, lease_until = $2,
                  lease_epoch = s.lease_epoch + 1
           FROM (SELECT saga_id FROM sagas
                 WHERE state IN ('RUNNING', 'COMPENSATING') AND next_run_at <= $3
                   AND (lease_until IS NULL OR lease_until < $3 OR lease_owner = $1)
                   AND NOT (saga_id = ANY($4::text[]))
                 ORDER BY next_run_at LIMIT $5
                 FOR UPDATE SKIP LOCKED) due
           WHERE s.saga_id = due.saga_id
           RETURNING s.*""",
        owner,
        lease_until,
        now,
        skip,
        limit,
    )
    return [_record(row) for row in rows]


async def lock_saga(conn: Connection, saga_id: str, *, epoch: int, owner: str) -> SagaRecord | None:
    """The saga, row-locked, if `owner` still holds the lease of `epoch`; else None."""
    row = await conn.fetchrow("SELECT * FROM sagas WHERE saga_id = $1 FOR UPDATE", saga_id)
    if row is None or row["lease_epoch"] != epoch or row["lease_owner"] != owner:
        return None
    return _record(row)


async def lock_saga_row(conn: Connection, saga_id: str) -> None:
    """Row-locks a saga whoever leases it (lock order: the saga, then its domain's row)."""
    await conn.execute("SELECT 1 FROM sagas WHERE saga_id = $1 FOR UPDATE", saga_id)


async def append_step(conn: Connection, saga_id: str, entry: LogEntry, now: datetime) -> None:
    await conn.execute(
        """WITH n AS (UPDATE sagas SET log_count = log_count + 1 WHERE saga_id = $1
                      RETURNING log_count)
           INSERT INTO saga_steps (saga_id, idx, name, compensation, state, attempt, error,
                                   outputs, record_time)
           SELECT $1, n.log_count, $2, $3, $4, $5, $6, $7, $8 FROM n""",
        saga_id,
        entry.name,
        entry.compensation,
        entry.state,
        entry.attempt,
        entry.error.SerializeToString() if entry.error is not None else None,
        json.dumps(dict(entry.outputs)),
        now,
    )


async def step_started(
    conn: Connection, saga_id: str, step: str, *, lease_until: datetime, now: datetime
) -> None:
    await conn.execute(
        """UPDATE sagas SET current_step = $2, lease_until = $3, update_time = $4
           WHERE saga_id = $1""",
        saga_id,
        step,
        lease_until,
        now,
    )


async def save_saga(
    conn: Connection,
    saga: SagaRecord,
    *,
    current_step: str,
    next_run_at: datetime,
    lease_until: datetime,
    now: datetime,
) -> None:
    await conn.execute(
        """UPDATE sagas SET state = $2, step_index = $3, attempt = $4, data = $5,
                  deadline = $6, failure = $7, current_step = $8, next_run_at = $9,
                  lease_until = $10, update_time = $11
           WHERE saga_id = $1""",
        saga.saga_id,
        saga.state,
        saga.step_index,
        saga.attempt,
        json.dumps(saga.data),
        saga.deadline,
        saga.failure,
        current_step,
        next_run_at,
        lease_until,
        now,
    )


async def release_saga(conn: Connection, saga: SagaRecord, owner: str) -> None:
    """Gives the lease up (if still held), so that any replica may run it when due."""
    await conn.execute(
        """UPDATE sagas SET lease_until = NULL
           WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3""",
        saga.saga_id,
        saga.epoch,
        owner,
    )


async def credit_started(conn: Connection, saga_id: str) -> bool:
    """Whether a deposit saga ever logged its ledger_credit step."""
    found = await conn.fetchval(
        "SELECT true FROM saga_steps WHERE saga_id = $1 AND name = 'ledger_credit' LIMIT 1",
        saga_id,
    )
    return bool(found)


# -- what a saga's changes do to its withdrawal or deposit ---------------------------


async def flag_withdrawal(
    conn: Connection,
    withdrawal_id: str,
    *,
    cancel_requested: bool = False,
    broadcast_started: bool = False,
) -> None:
    """Raises the withdrawal's one-way flags named (a flag once set stays set)."""
    await conn.execute(
        """UPDATE withdrawals SET cancel_requested = cancel_requested OR $2,
                  broadcast_started = broadcast_started OR $3, update_time = now()
           WHERE withdrawal_id = $1""",
        withdrawal_id,
        cancel_requested,
        broadcast_started,
    )


async def note_withdrawal(
    conn: Connection,
    withdrawal_id: str,
    *,
    failure: bytes | None = None,
    txid: str | None = None,
    confirmations: int | None = None,
) -> None:
    """Records what a step learnt about the withdrawal: why it failed, its
    transaction, the confirmations seen (None: unchanged)."""
    await conn.execute(
        """UPDATE withdrawals SET failure = COALESCE($2, failure), txid = COALESCE($3, txid),
                  confirmations = COALESCE($4, confirmations), update_time = now()
           WHERE withdrawal_id = $1""",
        withdrawal_id,
        failure,
        txid,
        confirmations,
    )


async def set_withdrawal_state(
    conn: Connection, withdrawal_id: str, state: str
) -> WithdrawalRow | None:
    """The withdrawal in its new state; None if it was in that state already."""
    row = await conn.fetchrow(
        """UPDATE withdrawals SET state = $2, update_time = now(),
                  complete_time = CASE WHEN $2 = 'COMPLETED' THEN now() END
           WHERE withdrawal_id = $1 AND state <> $2
           RETURNING *""",
        withdrawal_id,
        state,
    )
    return WithdrawalRow.of(row) if row else None


async def review_withdrawal(
    conn: Connection, withdrawal_id: str, review: str, *, by: str, reason: str, now: datetime
) -> WithdrawalRow:
    """Records the review (set once: the caller holds the row lock and checked it)."""
    row = await conn.fetchrow(
        """UPDATE withdrawals SET review = $2, reviewed_by = $3, review_reason = $4,
                  review_time = $5, update_time = now()
           WHERE withdrawal_id = $1 AND review = ''
           RETURNING *""",
        withdrawal_id,
        review,
        by,
        reason,
        now,
    )
    assert row is not None
    return WithdrawalRow.of(row)


async def insert_deposit(conn: Connection, row: DepositRow) -> None:
    await conn.execute(
        """INSERT INTO deposits (deposit_id, txid, output_index, account_id, asset, network,
               amount, address, confirmations, required_confirmations, state, saga_id,
               detect_time, update_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'PENDING', $11, $12, $12)""",
        row.deposit_id,
        row.txid,
        row.output_index,
        row.account_id,
        row.asset,
        row.network,
        row.amount,
        row.address,
        row.confirmations,
        row.required_confirmations,
        row.saga_id,
        row.detect_time,
    )


async def deposit_seen(
    conn: Connection, deposit_id: str, *, confirmations: int, reverted: bool = False
) -> None:
    """What the chain last said of a deposit's output (a revert is final)."""
    await conn.execute(
        """UPDATE deposits SET confirmations = $2, reverted = reverted OR $3,
                  update_time = now()
           WHERE deposit_id = $1""",
        deposit_id,
        confirmations,
        reverted,
    )


async def set_deposit_state(
    conn: Connection, deposit_id: str, state: str, transfer_id: str
) -> DepositRow:
    row = await conn.fetchrow(
        """UPDATE deposits SET state = $2, update_time = now(),
                  credit_time = CASE WHEN $2 = 'CREDITED' THEN now() END,
                  ledger_transfer_id = CASE WHEN $2 = 'CREDITED' THEN $3 ELSE '' END
           WHERE deposit_id = $1
           RETURNING *""",
        deposit_id,
        state,
        transfer_id,
    )
    assert row is not None
    return DepositRow.of(row)


# -- the outbox relay ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    subject: str
    payload: dict[str, Any]
    trace_context: dict[str, str]


async def take_outbox_turn(conn: Connection) -> bool:
    """One relay at a time across replicas keeps the order (held to the transaction's end)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('funding.outbox'))"))


async def unpublished(conn: Connection, limit: int) -> list[OutboxRow]:
    rows = await conn.fetch(
        """SELECT id, subject, payload, trace_context FROM outbox WHERE publish_time IS NULL
           ORDER BY id LIMIT $1""",
        limit,
    )
    return [
        OutboxRow(
            r["id"], r["subject"], json.loads(r["payload"]), json.loads(r["trace_context"] or "{}")
        )
        for r in rows
    ]


async def published(conn: Connection, ids: list[int]) -> None:
    await conn.execute("UPDATE outbox SET publish_time = now() WHERE id = ANY($1::bigint[])", ids)
