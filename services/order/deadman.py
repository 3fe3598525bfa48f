"""CancelAllAfter: a dead man's switch per (account, market), kept in PostgreSQL.

Arming stores the trigger time (so a restart keeps the switch); a poller
takes each due switch once (a delete that only succeeds if nobody re-armed it
in between) and cancels the account's working orders with reason
CANCEL_ALL_AFTER.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from cex.type.v1 import types_pb2 as t

from .store import Store

if TYPE_CHECKING:
    from .flow import Flow

__all__ = ["DeadMan"]

_log = logging.getLogger("cex.order.deadman")


class DeadMan:
    def __init__(
        self,
        store: Store,
        flow: Flow,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._flow = flow
        self._clock = clock
        self.fired = 0

    async def set(self, account_id: str, market: str, timeout_s: int) -> datetime | None:
        """Arm or reset (timeout_s > 0) or disarm (0); returns the trigger time."""
        if timeout_s == 0:
            await self._store.disarm(account_id, market)
            return None
        trigger = self._clock() + timedelta(seconds=timeout_s)
        await self._store.arm(account_id, market, trigger)
        return trigger

    async def fire_due(self) -> None:
        for account_id, market, trigger in await self._store.due_switches(self._clock()):
            if not await self._store.fire(account_id, market, trigger):
                continue  # re-armed meanwhile
            self.fired += 1
            _log.info("dead man's switch fired for %s %s", account_id, market or "*")
            await self._flow.cancel_all(account_id, market, reason=t.CANCEL_REASON_CANCEL_ALL_AFTER)
