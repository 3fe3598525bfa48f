"""Frozen accounts: every service's copy of auth's SUSPENDED and CLOSED accounts.

Why: a token carries its scopes until it expires (minutes), so freezing an
account at auth (SetAccountState) would leave the tokens it already holds able
to trade and withdraw. Instead every service that authenticates callers keeps
the set of accounts that may only read, and its authenticator refuses their
calls that need more than the read scope at once (authn.py):
PERMISSION_DENIED `AUTH_ACCOUNT_SUSPENDED` / `AUTH_ACCOUNT_CLOSED`.

Invariants:
- auth is the truth. Its change sequence (`change_seq`) grows by one with each
  committed state change, in commit order, with no gaps. Its outbox publishes
  each change as `cex.auth.v1.AccountStateChange` on `auth.events.account_state`
  after the commit, at least once, in sequence order: the push, heard within
  milliseconds.
- The push may be lost (NATS is never the only copy). The copy knows the
  sequence it is complete up to; a change that skips a number, a reconnect to
  NATS, and a timer (`reload_s`) each reload the whole set from auth
  (GetFrozenAccounts): the backstop. A change heard while a reload was in
  flight is newer than the reload's answer and is kept (per-account sequence).
- Before the first load nothing is known: the copy refuses nothing (the stack
  starts its services before the edge that lets clients in); `synced_at` says
  when auth last answered, for callers that must not act on an old copy
  (funding, before a withdrawal's broadcast: `fresh`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from cex.auth.v1 import auth_pb2

from .errors import PermissionDenied
from .followed import Followed, follow_subject

__all__ = [
    "FROZEN_REASONS",
    "STREAM",
    "SUBJECT",
    "AccountStates",
    "Frozen",
    "Loader",
    "push_from_nats",
]

STREAM = "AUTH_EVENTS"
SUBJECT = "auth.events.account_state"

SUSPENDED = auth_pb2.ACCOUNT_STATE_SUSPENDED
CLOSED = auth_pb2.ACCOUNT_STATE_CLOSED
# state -> (the ErrorInfo reason, what the refusal says)
FROZEN_REASONS: dict[int, tuple[str, str]] = {
    SUSPENDED: ("AUTH_ACCOUNT_SUSPENDED", "the account is suspended: only read access"),
    CLOSED: ("AUTH_ACCOUNT_CLOSED", "the account is closed: only read access"),
}

Loader = Callable[[], Awaitable[auth_pb2.GetFrozenAccountsResponse]]

_log = logging.getLogger("cex.account_states")

ACCOUNT_STATES_SEQ = Gauge(
    "account_states_change_seq", "auth's account-state change sequence this copy is complete up to."
)
ACCOUNT_STATES_RELOADS = Counter(
    "account_states_reloads_total",
    "Reloads of the frozen accounts from auth, by what asked for them.",
    ("cause",),
)


@dataclass(frozen=True, slots=True)
class Frozen:
    """A frozen account as this copy knows it."""

    account_id: str
    state: int  # SUSPENDED or CLOSED
    change_seq: int
    reason: str = ""

    def refusal(self) -> PermissionDenied:
        reason, message = FROZEN_REASONS[self.state]
        return PermissionDenied(
            reason,
            message,
            metadata={"account_id": self.account_id, "change_seq": str(self.change_seq)},
        )


class AccountStates(Followed[auth_pb2.GetFrozenAccountsResponse]):
    """The accounts that may only read, kept current from auth's push and reloads."""

    what = "the frozen accounts"

    def __init__(
        self,
        load: Loader,
        *,
        reload_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(load, reload_s=reload_s, reloads=ACCOUNT_STATES_RELOADS, clock=clock)
        self._frozen: dict[str, Frozen] = {}
        self._ahead: set[int] = set()  # sequences applied above change_seq (after a gap)
        self._latest: dict[str, int] = {}  # account -> sequence of its newest change heard

    # -- reads ---------------------------------------------------------------

    def frozen(self, account_id: str) -> Frozen | None:
        return self._frozen.get(account_id)

    def refuse_frozen(self, account_id: str) -> None:
        """PERMISSION_DENIED AUTH_ACCOUNT_SUSPENDED/CLOSED if the account is frozen."""
        found = self._frozen.get(account_id) if account_id else None
        if found is not None:
            raise found.refusal()

    def __len__(self) -> int:
        return len(self._frozen)

    # -- the push -----------------------------------------------------------

    def apply(self, change: auth_pb2.AccountStateChange) -> None:
        """One change from auth's push. Older or repeated changes are ignored; one
        that skips a sequence number is applied and asks for a reload (the gap)."""
        seq, account = change.change_seq, change.account_id
        if seq <= self.change_seq or seq in self._ahead or seq <= self._latest.get(account, 0):
            return
        self._set(account, change.state, seq, change.reason)
        self._ahead.add(seq)
        self._advance()
        if self._ahead:
            _log.warning("account state change %d heard after %d: reloading", seq, self.change_seq)
            self.ask_reload("gap")

    def _set(self, account: str, state: int, seq: int, reason: str) -> None:
        self._latest[account] = seq
        if state in FROZEN_REASONS:
            self._frozen[account] = Frozen(account, state, seq, reason)
        else:
            self._frozen.pop(account, None)

    def _advance(self) -> None:
        while self.change_seq + 1 in self._ahead:
            self.change_seq += 1
            self._ahead.discard(self.change_seq)
        self._ahead = {s for s in self._ahead if s > self.change_seq}
        ACCOUNT_STATES_SEQ.set(self.change_seq)

    # -- the backstop --------------------------------------------------------

    def replace(self, snapshot: auth_pb2.GetFrozenAccountsResponse) -> None:
        """The whole set as auth answered it; changes heard since that are newer stay."""
        at = snapshot.change_seq
        if at < self.change_seq:
            return  # an older answer than what this copy already has
        frozen = {
            a.account_id: Frozen(a.account_id, a.state, a.change_seq, a.reason)
            for a in snapshot.accounts
            if a.state in FROZEN_REASONS
        }
        newer = {account: seq for account, seq in self._latest.items() if seq > at}
        for account in newer:
            mine = self._frozen.get(account)
            if mine is None:
                frozen.pop(account, None)
            else:
                frozen[account] = mine
        self._frozen = frozen
        self._latest = newer
        self.change_seq = at
        self._ahead = {s for s in self._ahead if s > at}
        self._advance()
        self.synced_at = self._clock()

    async def fresh(
        self, max_age_s: float, reason: str = "AUTH_ACCOUNT_STATES_UNAVAILABLE"
    ) -> None:
        """Reload unless auth answered within `max_age_s`; UNAVAILABLE if it cannot."""
        await super().fresh(max_age_s, reason)


def push_from_nats(states: AccountStates, url: str, *, name: str) -> Callable[[], Awaitable[None]]:
    """The push for `AccountStates.run`: auth's changes on `auth.events.account_state`."""

    def apply(data: bytes) -> None:
        states.apply(auth_pb2.AccountStateChange.FromString(data))

    return follow_subject(states, apply, url, SUBJECT, name=name)
