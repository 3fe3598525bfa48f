"""Fee tiers by traded volume: measuring every account's 30-day volume.

auth owns each account's fee tier (ADR 0016); the trades are the order
service's (its fills, the read model of match's journal). So auth asks order
for every account's volume over the window (ListTradedVolumes: the quote
amount of its fills in markets quoted in the volume asset, USDT by default),
keeps it on the account and moves each account whose tier follows its volume
to the tier the schedule gives (up or down); an operator's assignment
overrides. It runs every `fee_volume_interval_s` and on demand
(EvaluateFeeTiers). Replicas may measure at once: each measurement is one
transaction under the fee-tier counter's row lock, so they serialize, and the
second finds nothing left to move.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal

from cex.order.v1 import order_pb2, order_pb2_grpc
from services.chassis import Unavailable, timestamp
from services.chassis.money import parse_decimal

from .domain import TierChange
from .store import Store

__all__ = ["VolumeSource", "Volumes", "order_volumes"]

_log = logging.getLogger("cex.auth.fees")

VolumeSource = Callable[[datetime, str], Awaitable[dict[str, Decimal]]]


def order_volumes(stub: order_pb2_grpc.OrderServiceAsyncStub) -> VolumeSource:
    """Every account's volume since a time, page by page from order."""

    async def fetch(since: datetime, asset: str) -> dict[str, Decimal]:
        volumes: dict[str, Decimal] = {}
        token = ""
        while True:
            reply = await stub.ListTradedVolumes(
                order_pb2.ListTradedVolumesRequest(
                    start_time=timestamp(since),
                    quote_asset=asset,
                    page_size=10_000,
                    page_token=token,
                ),
                timeout=30,
            )
            for v in reply.volumes:
                volumes[v.account_id] = parse_decimal(v.volume)
            token = reply.next_page_token
            if not token:
                return volumes

    return fetch


class Volumes:
    """Measures volumes and moves tiers: now (`measure`) and on a timer (`run`)."""

    def __init__(
        self,
        store: Store,
        source: VolumeSource,
        *,
        asset: str,
        days: int,
        clock: Callable[[], datetime],
        changed: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._source = source
        self.asset = asset
        self._window = timedelta(days=days)
        self._clock = clock
        self._changed = changed  # publish the changes now (the outbox)
        self._lock = asyncio.Lock()

    async def measure(self, changed_by: str) -> tuple[int, list[TierChange]]:
        """(accounts measured, tier changes); UNAVAILABLE while order cannot answer."""
        async with self._lock:
            now = self._clock()
            try:
                volumes = await self._source(now - self._window, self.asset)
            except Exception as error:
                raise Unavailable(
                    "AUTH_VOLUMES_UNAVAILABLE", "cannot read traded volumes from order; retry"
                ) from error
            measured, changes = await self._store.measure_volumes(
                volumes, changed_by=changed_by, now=now
            )
        if changes:
            await self._changed()
        return measured, changes

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                measured, changes = await self.measure("svc:auth")
                _log.info("fee tiers: %d accounts measured, %d moved", measured, len(changes))
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.warning("measuring traded volumes failed", exc_info=True)
