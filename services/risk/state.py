"""The in-memory copy of what the hot path reads: limits, kill switches, prices.

PostgreSQL is the truth. Each process loads a snapshot at start and reloads it
when `meta.change_seq` moves: at once after its own writes, at once when
another process commits one (the writing transaction NOTIFYs `risk_changed`;
every process LISTENs), and on a poll every `reload_interval_s`, the backstop
for a notification missed while the listening connection was away. So
replicas agree within a notification's trip, and within one interval at worst.
CheckOrder never waits on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from services.chassis import background, poll_until_cancelled

from .domain import KillSwitches, Limits, merge
from .store import Snapshot, Store, StoredLimits

__all__ = ["State"]

_log = logging.getLogger("cex.risk.state")


class State:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._snapshot = Snapshot(0, {"": StoredLimits(Limits(), 0, 0, "")}, [], {})
        self.switches = KillSwitches()
        self._effective: dict[str, Limits] = {}
        self._prices: dict[str, tuple[int, int]] = {}
        self._lock = asyncio.Lock()
        self.version = 0  # grows with every change of what the checks read
        self._wake = asyncio.Event()

    @property
    def change_seq(self) -> int:
        return self._snapshot.change_seq

    async def reload(self) -> None:
        async with self._lock:
            snapshot = await self._store.snapshot()
            self._snapshot = snapshot
            self.switches = KillSwitches.of(snapshot.switches)
            self._effective = {}
            self._merge_prices(snapshot.prices)
            self._changed()

    async def refresh(self) -> None:
        """Reload if anything changed; prices always (the consumer may run elsewhere)."""
        if await self._store.change_seq() != self.change_seq:
            await self.reload()
        else:
            self._merge_prices(await self._store.prices())

    async def run(self, every_s: float) -> None:
        """Refresh at each change another process commits, and every `every_s`."""
        nudged = asyncio.Event()
        async with background(self._listen(nudged.set, every_s), "risk-listen"):
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudged.wait(), every_s)
                nudged.clear()
                try:
                    await self.refresh()
                except Exception:
                    _log.exception("reload failed; keeping the last snapshot")

    async def _listen(self, on_change: Callable[[], None], every_s: float) -> None:
        await poll_until_cancelled(
            lambda: self._store.listen(on_change),
            every_s,
            log=_log,
            failed="listening for risk's changes failed; the poll goes on",
            drain=False,
        )

    # -- reads ---------------------------------------------------------------

    def stored(self, account_id: str) -> StoredLimits | None:
        return self._snapshot.limits.get(account_id)

    @property
    def defaults(self) -> StoredLimits:
        return self._snapshot.limits.get("") or StoredLimits(Limits(), 0, 0, "")

    def limits(self, account_id: str) -> Limits:
        """The effective limits of an account (memoized until the next reload)."""
        found = self._effective.get(account_id)
        if found is None:
            override = self._snapshot.limits.get(account_id) if account_id else None
            found = replace(
                merge(self.defaults.limits, override.limits if override else None),
                account_id=account_id,
            )
            if len(self._effective) > 100_000:
                self._effective.clear()
            self._effective[account_id] = found
        return found

    # -- reference prices ----------------------------------------------------

    def _merge_prices(self, prices: dict[str, tuple[int, int]]) -> None:
        for market, (ticks, seq) in prices.items():
            self.set_price(market, ticks, seq)

    def set_price(self, market: str, ticks: int, seq: int) -> None:
        known = self._prices.get(market)
        if known is None or known[1] < seq:
            self._prices[market] = (ticks, seq)
            if known is None or known[0] != ticks:
                self._changed()

    def prices(self) -> dict[str, tuple[int, int]]:
        """market -> (price_ticks, seq) of the trade it comes from."""
        return dict(self._prices)

    def stored_limits(self) -> dict[str, StoredLimits]:
        """Every stored set of limits by account ("" = the defaults)."""
        return dict(self._snapshot.limits)

    # -- changes -------------------------------------------------------------

    def _changed(self) -> None:
        self.version += 1
        self._wake.set()
        self._wake = asyncio.Event()

    async def changed(self, seen: int, within_s: float) -> int:
        """The version once it differs from `seen`, or after `within_s` (a heartbeat)."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), within_s)
        return self.version

    def price(self, market: str) -> int | None:
        found = self._prices.get(market)
        return found[0] if found else None
