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

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from cex.auth.v1 import auth_pb2

from .bus import nats_connection
from .errors import PermissionDenied, Unavailable

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


class AccountStates:
    """The accounts that may only read, kept current from auth's push and reloads."""

    def __init__(
        self,
        load: Loader,
        *,
        reload_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.reload_s = reload_s
        self._clock = clock
        self._frozen: dict[str, Frozen] = {}
        self.change_seq = 0  # complete up to this sequence
        self._ahead: set[int] = set()  # sequences applied above change_seq (after a gap)
        self._latest: dict[str, int] = {}  # account -> sequence of its newest change heard
        self.synced_at: float | None = None  # when auth last answered (clock)
        self._wake = asyncio.Event()
        self._reload_lock = asyncio.Lock()

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

    def ask_reload(self, cause: str) -> None:
        ACCOUNT_STATES_RELOADS.labels(cause).inc()
        self._wake.set()

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

    async def reload(self) -> None:
        async with self._reload_lock:
            self._wake.clear()  # before loading: a change heard during it asks again
            self.replace(await self._load())

    async def fresh(self, max_age_s: float) -> None:
        """Reload unless auth answered within `max_age_s`; UNAVAILABLE if it cannot."""
        if self.synced_at is not None and self._clock() - self.synced_at <= max_age_s:
            return
        try:
            await self.reload()
        except Exception as error:
            raise Unavailable(
                "AUTH_ACCOUNT_STATES_UNAVAILABLE",
                "cannot tell from auth whether the account is frozen; retry",
            ) from error

    # -- running -------------------------------------------------------------

    async def run(self, subscribe: Callable[[], Awaitable[None]] | None = None) -> None:
        """Reload now, then on every gap, reconnect and `reload_s`; `subscribe` (the
        push: it calls `apply` and `ask_reload("reconnect")`) runs alongside."""
        follower = asyncio.ensure_future(subscribe()) if subscribe is not None else None
        try:
            await self._reloads()
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await follower

    async def _reloads(self) -> None:
        failures = 0
        while True:
            try:
                await self.reload()
                if failures:
                    _log.warning("frozen accounts reloaded again after %d failures", failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                if failures == 1:
                    _log.warning("reloading the frozen accounts from auth failed: %r", error)
            wait = self.reload_s if not failures else min(self.reload_s, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if not self._wake.is_set():
                ACCOUNT_STATES_RELOADS.labels("timer").inc()


def push_from_nats(states: AccountStates, url: str, *, name: str) -> Callable[[], Awaitable[None]]:
    """The push for `AccountStates.run`: a core NATS subscription to auth's changes
    (every replica of every service hears each one; nothing durable to clean up).
    What it misses while disconnected is caught by the reload after the reconnect."""

    async def on_message(message: Msg) -> None:
        try:
            change = auth_pb2.AccountStateChange.FromString(message.data)
        except Exception as error:
            _log.error("UNDECODABLE account state change on %s: %r", message.subject, error)
            states.ask_reload("undecodable")
            return
        states.apply(change)

    async def on_reconnect() -> None:
        states.ask_reload("reconnect")

    async def follow() -> None:
        while True:
            try:
                async with nats_connection(url, name=name, on_reconnect=on_reconnect) as client:
                    await client.subscribe(SUBJECT, cb=on_message)
                    states.ask_reload("subscribed")  # what came before the subscription
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                _log.warning("following account state changes on NATS failed: %r", error)
                await asyncio.sleep(1.0)

    return follow
