"""The ledger's pure logic: accounts, transfers, holds, linked chains.

No I/O, no clock, no ids made up here. `Book` is the working set of one group
commit: the accounts and transfers the group touches, loaded (and row-locked)
by the store, changed here in memory, and written back by the store in the same
transaction. Amounts are integers in the asset's minor units.

TigerBeetle's model: a transfer debits one account and credits another of the
same asset; a pending transfer (hold) moves amounts into the pending columns
and later resolves once (posted, voided or expired). `Op.CONSUME` is the one
extension: settlement posts part of a hold and leaves the rest pending; the
hold resolves (POSTED) when it reaches zero, or by void/expiry of what remains
(see docs/adr/0005-ledger.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from services.chassis import (
    AlreadyExists,
    ExchangeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

__all__ = [
    "MAX_BATCH",
    "SYSTEM_PREFIX",
    "Account",
    "Anomaly",
    "Book",
    "Failure",
    "Kind",
    "Op",
    "Outcome",
    "State",
    "Transfer",
    "TransferInput",
    "apply_transfers",
    "is_system",
    "split_chains",
    "sub_transfer",
]

MAX_BATCH = 1000
SYSTEM_PREFIX = "sys:"
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


class Op(IntEnum):
    SINGLE = 1
    PENDING = 2
    POST = 3
    VOID = 4
    CONSUME = 5  # internal: post part of a hold, keep the rest pending


class State(IntEnum):  # values of cex.ledger.v1.TransferState
    PENDING = 1
    POSTED = 2
    VOIDED = 3
    EXPIRED = 4


class Kind(IntEnum):  # values of cex.ledger.v1.TransferKind
    UNSPECIFIED = 0
    DEPOSIT = 1
    WITHDRAWAL = 2
    ORDER_HOLD = 3
    TRADE = 4
    FEE = 5
    ADJUSTMENT = 6
    SUB_ACCOUNT = 7


def sub_transfer(
    caller: str, subs: Iterable[str], from_account_id: str, to_account_id: str, request_id: str
) -> str:
    """The id of a transfer between a master (`caller`) and one of its `subs`
    (ADR 0017), either way, derived from the request id so a retry is the same
    transfer (hashed: a request id may hold characters a transfer id may not).
    Any other account, a sibling or the master of a sub included, is
    LEDGER_ACCOUNT_NOT_FOUND, the answer a made-up id gets."""
    violations = [
        FieldViolation(name, "required")
        for name, value in (("from_account_id", from_account_id), ("to_account_id", to_account_id))
        if not value
    ]
    if violations:
        raise InvalidArgument(
            "LEDGER_ACCOUNT_REQUIRED", "name both accounts", violations=violations
        )
    if from_account_id == to_account_id:
        raise InvalidArgument(
            "LEDGER_SAME_ACCOUNT",
            "from_account_id and to_account_id must differ",
            violations=[FieldViolation("to_account_id", "same as from_account_id")],
        )
    other = to_account_id if from_account_id == caller else from_account_id
    if caller not in (from_account_id, to_account_id) or other not in set(subs):
        raise NotFound("LEDGER_ACCOUNT_NOT_FOUND", "no such account")
    digest = hashlib.sha256(f"{caller}\0{request_id}".encode()).hexdigest()[:40]
    return f"sub:{caller}:{digest}"


def is_system(account_id: str) -> bool:
    return account_id.startswith(SYSTEM_PREFIX)


@dataclass(frozen=True, slots=True)
class TransferInput:
    """A transfer as a client asked for it. amount None = the whole pending (post)."""

    id: str
    op: Op
    debit_account_id: str = ""
    credit_account_id: str = ""
    asset: str = ""
    amount: int | None = None
    pending_id: str = ""
    linked: bool = False
    timeout_ns: int = 0
    kind: Kind = Kind.UNSPECIFIED
    reference: str = ""

    @property
    def fingerprint(self) -> str:
        """What "the same fields" means for idempotency (linked is not a field of the effect)."""
        text = "\x1f".join(
            (
                str(int(self.op)),
                self.debit_account_id,
                self.credit_account_id,
                self.asset,
                "" if self.amount is None else str(self.amount),
                self.pending_id,
                str(self.timeout_ns),
                str(int(self.kind)),
                self.reference,
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(slots=True)
class Account:
    account_id: str
    asset: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    update_time_ns: int = 0
    stored: tuple[int, int, int, int] | None = None  # values as loaded; None = new

    @property
    def is_system(self) -> bool:
        return is_system(self.account_id)

    @property
    def key(self) -> tuple[str, str]:
        return (self.account_id, self.asset)

    @property
    def values(self) -> tuple[int, int, int, int]:
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)

    @property
    def available(self) -> int:
        return self.credits_posted - self.debits_posted - self.debits_pending

    @property
    def changed(self) -> bool:
        return self.values != (self.stored or (0, 0, 0, 0))


@dataclass(slots=True)
class Transfer:
    id: str
    sequence: int
    op: Op
    debit_account_id: str
    credit_account_id: str
    asset: str
    amount: int
    pending_id: str
    linked: bool
    timeout_ns: int
    expires_at_ns: int | None
    kind: Kind
    reference: str
    state: State
    remaining: int  # pending transfers: what is still held
    fingerprint: str
    create_time_ns: int
    stored: tuple[State, int] | None = None  # (state, remaining) as loaded; None = new


@dataclass(frozen=True, slots=True)
class Failure:
    """A remembered failure: retrying the same id and fields returns it."""

    id: str
    fingerprint: str
    error: ExchangeError


@dataclass(frozen=True, slots=True)
class Anomaly:
    market: str
    seq: int
    kind: str
    order_id: str
    asset: str
    amount: int
    detail: str


Outcome = Transfer | ExchangeError

# Failures that depend on the ledger's state: remembered under the id.
_REMEMBERED = frozenset(
    {
        "LEDGER_INSUFFICIENT_FUNDS",
        "LEDGER_ACCOUNT_NOT_FOUND",
        "LEDGER_PENDING_TRANSFER_NOT_FOUND",
        "LEDGER_PENDING_TRANSFER_ALREADY_POSTED",
        "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED",
        "LEDGER_PENDING_TRANSFER_EXPIRED",
        "LEDGER_NOT_A_PENDING_TRANSFER",
        "LEDGER_AMOUNT_EXCEEDS_PENDING",
        "LEDGER_ACCOUNT_MISMATCH",
        "LEDGER_ASSET_MISMATCH",
    }
)


def linked_failed(transfer_id: str) -> ExchangeError:
    return FailedPrecondition(
        "LEDGER_LINKED_EVENT_FAILED", f"{transfer_id}: another transfer of its linked chain failed"
    )


def split_chains(linked: Sequence[bool]) -> list[tuple[list[int], bool]]:
    """Indices grouped into linked chains; the flag says whether the chain was closed."""
    chains: list[tuple[list[int], bool]] = []
    current: list[int] = []
    for index, is_linked in enumerate(linked):
        current.append(index)
        if not is_linked:
            chains.append((current, True))
            current = []
    if current:
        chains.append((current, False))
    return chains


def apply_transfers(
    book: Book, items: Sequence[TransferInput | ExchangeError], linked: Sequence[bool]
) -> list[Outcome]:
    """One CreateTransfers request, chain by chain (items that failed parsing are
    errors already; `linked` is the request's flags.linked, failed items included)."""
    outcomes: list[Outcome] = []
    for indices, closed in split_chains(linked):
        chain = [items[i] for i in indices]
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


def validate(item: TransferInput, assets: Iterable[str]) -> ExchangeError | None:
    """Checks that need no state (the server parses amounts before this)."""
    if not _ID.match(item.id):
        return InvalidArgument("LEDGER_ID_INVALID", "id must be 1-128 printable characters")
    if item.op in (Op.SINGLE, Op.PENDING):
        for name, value in (
            ("debit_account_id", item.debit_account_id),
            ("credit_account_id", item.credit_account_id),
        ):
            if not _ID.match(value):
                return InvalidArgument(
                    "LEDGER_ACCOUNT_ID_INVALID", f"{name} must be 1-128 printable characters"
                )
        if item.debit_account_id == item.credit_account_id:
            return InvalidArgument(
                "LEDGER_ACCOUNTS_MUST_DIFFER", "debit and credit accounts must differ"
            )
        if item.asset not in assets:
            return NotFound("LEDGER_ASSET_NOT_FOUND", f"unknown asset {item.asset!r}")
        if item.amount is None or item.amount <= 0:
            return InvalidArgument("LEDGER_AMOUNT_INVALID", "amount must be positive")
        if item.kind == Kind.UNSPECIFIED:
            return InvalidArgument("LEDGER_KIND_REQUIRED", "kind must be set")
        if item.pending_id:
            return InvalidArgument(
                "LEDGER_PENDING_ID_UNEXPECTED", "pending_id is only for post/void"
            )
        if item.timeout_ns < 0 or (item.timeout_ns and item.op != Op.PENDING):
            return InvalidArgument(
                "LEDGER_TIMEOUT_INVALID", "timeout is only for pending transfers, positive"
            )
    else:
        if not _ID.match(item.pending_id):
            return InvalidArgument("LEDGER_PENDING_ID_REQUIRED", "pending_id is required")
        if item.amount is not None and item.amount <= 0:
            return InvalidArgument("LEDGER_AMOUNT_INVALID", "amount must be positive")
        if item.op == Op.VOID and item.amount is not None:
            return InvalidArgument("LEDGER_AMOUNT_INVALID", "a void takes no amount")
        if item.timeout_ns:
            return InvalidArgument(
                "LEDGER_TIMEOUT_INVALID", "timeout is only for pending transfers"
            )
    return None


@dataclass
class Book:
    """The working set of one group commit."""

    now_ns: int
    last_sequence: int
    halted: bool
    assets: frozenset[str]
    accounts: dict[tuple[str, str], Account] = field(default_factory=dict)
    transfers: dict[str, Transfer] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    settled_trades: set[tuple[str, str]] = field(default_factory=set)
    new_transfers: list[Transfer] = field(default_factory=list)
    new_failures: list[Failure] = field(default_factory=list)
    new_trades: list[tuple[str, str, int]] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    # What changed since the last save: found without scanning every account
    # and hold (the match writer keeps them all in memory).
    touched_accounts: dict[tuple[str, str], Account] = field(default_factory=dict)
    touched_transfers: dict[str, Transfer] = field(default_factory=dict)
    # Holds expired since the last save, in order (a tuple: set through _set, so a
    # chain that fails forgets the expiries it rolled back). The writer journals
    # those of its transfers commands; a replay re-applies them.
    expired: tuple[str, ...] = ()
    _undo: list[tuple[Any, str, Any]] | None = None

    # -- reading ---------------------------------------------------------

    def account(self, account_id: str, asset: str) -> Account | None:
        found = self.accounts.get((account_id, asset))
        return found if found is not None and (found.stored or found.changed) else None

    def transfer(self, transfer_id: str) -> Transfer | None:
        return self.transfers.get(transfer_id)

    def available(self, account_id: str, asset: str) -> int:
        found = self.account(account_id, asset)
        return found.available if found else 0

    def changed_accounts(self) -> list[Account]:
        return [a for a in self.touched_accounts.values() if a.changed]

    def changed_pendings(self) -> list[Transfer]:
        return [
            t
            for t in self.touched_transfers.values()
            if t.stored is not None and (t.state, t.remaining) != t.stored
        ]

    def saved(self) -> None:
        """The changes are stored: what is now is what was loaded (a kept book goes on)."""
        for account in self.touched_accounts.values():
            account.stored = account.values
        for record in (*self.touched_transfers.values(), *self.new_transfers):
            record.stored = (record.state, record.remaining)
        self.touched_accounts.clear()
        self.touched_transfers.clear()
        self.new_transfers.clear()
        self.new_failures.clear()
        self.new_trades.clear()
        self.anomalies.clear()
        self.expired = ()

    # -- changing (every change goes through _set so a chain can roll back) --

    def _set(self, obj: Any, name: str, value: Any) -> None:
        if self._undo is not None:
            self._undo.append((obj, name, getattr(obj, name)))
        if isinstance(obj, Transfer):
            self.touched_transfers[obj.id] = obj
        setattr(obj, name, value)

    def _move(
        self, account: Account, *, dp: int = 0, cp: int = 0, dpe: int = 0, cpe: int = 0
    ) -> None:
        undo = self._undo
        if undo is not None:
            undo.append((account, "debits_posted", account.debits_posted))
            undo.append((account, "credits_posted", account.credits_posted))
            undo.append((account, "debits_pending", account.debits_pending))
            undo.append((account, "credits_pending", account.credits_pending))
            undo.append((account, "update_time_ns", account.update_time_ns))
        self.touched_accounts[account.key] = account
        account.debits_posted += dp
        account.credits_posted += cp
        account.debits_pending += dpe
        account.credits_pending += cpe
        account.update_time_ns = self.now_ns

    def _slot(self, account_id: str, asset: str) -> Account:
        key = (account_id, asset)
        found = self.accounts.get(key)
        if found is None:
            found = self.accounts[key] = Account(account_id, asset)
        return found

    def expire_due(self, pending: Transfer) -> bool:
        """Expire a hold whose timeout has passed; True if it did."""
        if (
            pending.op == Op.PENDING
            and pending.state == State.PENDING
            and pending.expires_at_ns is not None
            and pending.expires_at_ns <= self.now_ns
        ):
            self._release(pending, State.EXPIRED)
            self._set(self, "expired", (*self.expired, pending.id))
            return True
        return False

    def _release(self, pending: Transfer, state: State) -> int:
        amount = pending.remaining
        debit = self._slot(pending.debit_account_id, pending.asset)
        credit = self._slot(pending.credit_account_id, pending.asset)
        self._move(debit, dpe=-amount)
        self._move(credit, cpe=-amount)
        self._set(pending, "remaining", 0)
        self._set(pending, "state", state)
        return amount

    def _record(self, item: TransferInput, **values: Any) -> Transfer:
        self._set(self, "last_sequence", self.last_sequence + 1)
        record = Transfer(
            id=item.id,
            sequence=self.last_sequence,
            op=item.op,
            linked=item.linked,
            timeout_ns=item.timeout_ns,
            fingerprint=item.fingerprint,
            create_time_ns=self.now_ns,
            **values,
        )
        self.transfers[item.id] = record
        self.new_transfers.append(record)
        return record

    # -- applying ----------------------------------------------------------

    def apply_chain(self, items: Sequence[TransferInput | ExchangeError]) -> list[Outcome]:
        """A linked chain (or one transfer): all succeed or none is applied.

        Items that are already errors (failed parsing) fail the chain as they are.
        """
        # Expiry is a fact of the clock, not of the chain: settle it first, outside
        # the chain's undo log, so a chain that fails still records it.
        for item in items:
            if isinstance(item, TransferInput) and item.pending_id:
                due = self.transfers.get(item.pending_id)
                if due is not None:
                    self.expire_due(due)
        # A lone transfer fails before it changes anything: no undo log needed.
        undo: list[tuple[Any, str, Any]] = []
        self._undo = undo if len(items) > 1 else None
        marks = (len(self.new_transfers), len(self.new_failures), len(self.anomalies))
        outcomes: list[Outcome] = []
        failed_at = -1
        try:
            for index, item in enumerate(items):
                outcome = item if isinstance(item, ExchangeError) else self._apply_one(item)
                outcomes.append(outcome)
                if isinstance(outcome, ExchangeError):
                    failed_at = index
                    break
        finally:
            self._undo = None
        if failed_at < 0:
            return outcomes
        # Roll back everything the chain did, then remember the failure itself.
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)
        for record in self.new_transfers[marks[0] :]:
            self.transfers.pop(record.id, None)
        del self.new_transfers[marks[0] :]
        del self.new_failures[marks[1] :]
        del self.anomalies[marks[2] :]
        error = outcomes[failed_at]
        assert isinstance(error, ExchangeError)
        failing = items[failed_at]
        if (
            isinstance(failing, TransferInput)
            and error.reason in _REMEMBERED
            and failing.id not in self.transfers
            and failing.id not in self.failures
        ):
            failure = Failure(failing.id, failing.fingerprint, error)
            self.failures[failing.id] = failure
            self.new_failures.append(failure)
        result: list[Outcome] = []
        for index, item in enumerate(items):
            if index == failed_at:
                result.append(error)
            else:
                item_id = item.id if isinstance(item, TransferInput) else "?"
                result.append(item if isinstance(item, ExchangeError) else linked_failed(item_id))
        return result

    def _apply_one(self, item: TransferInput) -> Outcome:
        existing = self.transfers.get(item.id)
        if existing is not None:
            if existing.fingerprint == item.fingerprint:
                return existing
            return _exists_different(item.id)
        failure = self.failures.get(item.id)
        if failure is not None:
            if failure.fingerprint == item.fingerprint:
                return failure.error
            return _exists_different(item.id)
        invalid = validate(item, self.assets)
        if invalid is not None:
            return invalid
        if item.op in (Op.SINGLE, Op.PENDING):
            return self._apply_new(item)
        return self._apply_resolution(item)

    def _apply_new(self, item: TransferInput) -> Outcome:
        assert item.amount is not None
        if self.halted and item.kind == Kind.WITHDRAWAL:
            return FailedPrecondition(
                "LEDGER_HALTED", "the auditor halted withdrawals; an operator must clear it"
            )
        # Zero is a balance: a user account that never held the asset has 0 of
        # it available, and debiting it is refused exactly as for any account
        # that has too little (issue 18; it used to be LEDGER_ACCOUNT_NOT_FOUND).
        debit = self._slot(item.debit_account_id, item.asset)
        if (
            not debit.is_system
            and debit.debits_posted + debit.debits_pending + item.amount > debit.credits_posted
        ):
            return FailedPrecondition(
                "LEDGER_INSUFFICIENT_FUNDS",
                f"account {debit.account_id} has {debit.available} {item.asset} minor units "
                f"available, {item.amount} needed",
                metadata={"account_id": debit.account_id, "asset": item.asset},
            )
        credit = self._slot(item.credit_account_id, item.asset)
        pending = item.op == Op.PENDING
        if pending:
            self._move(debit, dpe=item.amount)
            self._move(credit, cpe=item.amount)
        else:
            self._move(debit, dp=item.amount)
            self._move(credit, cp=item.amount)
        return self._record(
            item,
            debit_account_id=item.debit_account_id,
            credit_account_id=item.credit_account_id,
            asset=item.asset,
            amount=item.amount,
            pending_id="",
            expires_at_ns=self.now_ns + item.timeout_ns if pending and item.timeout_ns else None,
            kind=item.kind,
            reference=item.reference,
            state=State.PENDING if pending else State.POSTED,
            remaining=item.amount if pending else 0,
        )

    def _apply_resolution(self, item: TransferInput) -> Outcome:
        pending = self.transfers.get(item.pending_id)
        if pending is None:
            return NotFound(
                "LEDGER_PENDING_TRANSFER_NOT_FOUND", f"no pending transfer {item.pending_id}"
            )
        if pending.op != Op.PENDING:
            return FailedPrecondition(
                "LEDGER_NOT_A_PENDING_TRANSFER", f"{item.pending_id} is not a pending transfer"
            )
        if item.asset and item.asset != pending.asset:
            return InvalidArgument(
                "LEDGER_ASSET_MISMATCH", f"{item.pending_id} is in {pending.asset}"
            )
        if (item.debit_account_id and item.debit_account_id != pending.debit_account_id) or (
            item.credit_account_id and item.credit_account_id != pending.credit_account_id
        ):
            return InvalidArgument(
                "LEDGER_ACCOUNT_MISMATCH", f"accounts differ from those of {item.pending_id}"
            )
        self.expire_due(pending)
        if pending.state != State.PENDING:
            reason = {
                State.POSTED: "LEDGER_PENDING_TRANSFER_ALREADY_POSTED",
                State.VOIDED: "LEDGER_PENDING_TRANSFER_ALREADY_VOIDED",
                State.EXPIRED: "LEDGER_PENDING_TRANSFER_EXPIRED",
            }[pending.state]
            return FailedPrecondition(reason, f"{item.pending_id} is already resolved")
        values: dict[str, Any] = {
            "debit_account_id": pending.debit_account_id,
            "credit_account_id": pending.credit_account_id,
            "asset": pending.asset,
            "pending_id": pending.id,
            "expires_at_ns": None,
            "kind": item.kind if item.kind != Kind.UNSPECIFIED else pending.kind,
            "reference": item.reference or pending.reference,
            "remaining": 0,
        }
        if item.op == Op.VOID:
            released = self._release(pending, State.VOIDED)
            return self._record(item, amount=released, state=State.VOIDED, **values)
        amount = pending.remaining if item.amount is None else item.amount
        if amount > pending.remaining:
            return FailedPrecondition(
                "LEDGER_AMOUNT_EXCEEDS_PENDING",
                f"{amount} exceeds the {pending.remaining} still pending on {pending.id}",
            )
        debit = self._slot(pending.debit_account_id, pending.asset)
        credit = self._slot(pending.credit_account_id, pending.asset)
        self._move(debit, dpe=-amount, dp=amount)
        self._move(credit, cpe=-amount, cp=amount)
        self._set(pending, "remaining", pending.remaining - amount)
        if item.op == Op.POST and pending.remaining:  # TigerBeetle: the rest returns
            self._release(pending, State.POSTED)
        elif pending.remaining == 0:
            self._set(pending, "state", State.POSTED)
        return self._record(item, amount=amount, state=State.POSTED, **values)


def _exists_different(transfer_id: str) -> ExchangeError:
    return AlreadyExists(
        "LEDGER_TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS",
        f"transfer {transfer_id} exists with different fields",
        metadata={"id": transfer_id},
    )
