"""Fee tiers: the order gateways' copy of auth's fee schedule and account tiers.

Why: every order carries its account's maker and taker rates to match's writer
(PlaceCommand.maker_fee_rate/taker_fee_rate), and the gateway must know them
without a call on the ack path. auth owns the schedule and each account's tier
(ADR 0016); this copy follows them as the frozen accounts are followed
(followed.py): each change is pushed on `auth.events.fee_tier` after its
commit, numbered by auth's fee-tier change sequence, and the whole copy is
reloaded (GetFeeTiers) at start, on a gap, on a reconnect and every few
seconds. A lookup is two dict reads.

Invariants:
- Changes apply in sequence order only: one that skips a number is not applied
  but asks for a reload, which brings it and everything before it.
- An account the copy does not list is on the base tier ("default").
- Before the first load the copy holds the catalog's schedule (one tier,
  "default") and no accounts: a gateway that cannot reach auth prices every
  order at the default rates, and says so in `fee_tiers_change_seq` (0).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

from prometheus_client import Counter, Gauge

from cex.auth.v1 import auth_pb2

from .followed import Followed, follow_subject
from .money import decimal_text, parse_decimal

__all__ = ["BASE_TIER", "STREAM", "SUBJECT", "FeeTiers", "bps_rate", "push_fee_tiers"]

BASE_TIER = "default"
STREAM = "AUTH_EVENTS"
SUBJECT = "auth.events.fee_tier"

FEE_TIERS_SEQ = Gauge(
    "fee_tiers_change_seq", "auth's fee-tier change sequence this copy is complete up to."
)
FEE_TIERS_RELOADS = Counter(
    "fee_tiers_reloads_total",
    "Reloads of the fee tiers from auth, by what asked for them.",
    ("cause",),
)

Rates = tuple[str, str]  # maker, taker: decimal fractions of what the party receives


def bps_rate(bps: str) -> str:
    """Basis points ("-0.5") as the rate match takes ("-0.00005")."""
    return decimal_text(parse_decimal(bps).scaleb(-4))


def _rates(schedule: auth_pb2.FeeSchedule) -> dict[str, Rates]:
    return {t.name: (bps_rate(t.maker_fee_bps), bps_rate(t.taker_fee_bps)) for t in schedule.tiers}


class FeeTiers(Followed[auth_pb2.GetFeeTiersResponse]):
    """Each account's maker and taker rates, kept current from auth's push and reloads."""

    what = "the fee tiers"

    def __init__(
        self,
        load: Callable[[], Awaitable[auth_pb2.GetFeeTiersResponse]],
        *,
        default: tuple[Decimal, Decimal],
        reload_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(load, reload_s=reload_s, reloads=FEE_TIERS_RELOADS, clock=clock)
        self._base: Rates = (decimal_text(default[0]), decimal_text(default[1]))
        self._schedule: dict[str, Rates] = {BASE_TIER: self._base}
        self._accounts: dict[str, str] = {}  # account -> tier, for tiers but the base

    # -- reads ---------------------------------------------------------------

    def tier(self, account_id: str) -> str:
        return self._accounts.get(account_id, BASE_TIER)

    def rates(self, account_id: str) -> Rates:
        """The account's (maker, taker) rates as match takes them."""
        tier = self._accounts.get(account_id, BASE_TIER)
        return self._schedule.get(tier) or self._schedule.get(BASE_TIER, self._base)

    # -- the push -----------------------------------------------------------

    def apply(self, change: auth_pb2.FeeTierChange) -> None:
        """One change from auth's push, if it is the next one; a later one asks for a
        reload (the gap) and an older or repeated one is ignored."""
        if change.change_seq <= self.change_seq:
            return
        if change.change_seq != self.change_seq + 1:
            self.ask_reload("gap")
            return
        if change.HasField("schedule"):
            self._schedule = _rates(change.schedule)
        if change.HasField("account"):
            self._assign(change.account.account_id, change.account.fee_tier)
        self.change_seq = change.change_seq
        FEE_TIERS_SEQ.set(self.change_seq)

    def _assign(self, account_id: str, tier: str) -> None:
        if tier and tier != BASE_TIER:
            self._accounts[account_id] = tier
        else:
            self._accounts.pop(account_id, None)

    # -- the backstop --------------------------------------------------------

    def replace(self, snapshot: auth_pb2.GetFeeTiersResponse) -> None:
        """The whole copy as auth answered it, unless this copy is already ahead of it
        (a push heard while the answer was on its way)."""
        self.synced_at = self._clock()
        if snapshot.change_seq < self.change_seq:
            return
        self._schedule = _rates(snapshot.schedule) or {BASE_TIER: self._base}
        self._accounts = {}
        for account in snapshot.accounts:
            self._assign(account.account_id, account.fee_tier)
        self.change_seq = snapshot.change_seq
        FEE_TIERS_SEQ.set(self.change_seq)


def push_fee_tiers(tiers: FeeTiers, url: str, *, name: str) -> Callable[[], Awaitable[None]]:
    """The push for `FeeTiers.run`: auth's changes on `auth.events.fee_tier`."""

    def apply(data: bytes) -> None:
        tiers.apply(auth_pb2.FeeTierChange.FromString(data))

    return follow_subject(tiers, apply, url, SUBJECT, name=name)
