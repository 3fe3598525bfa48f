"""Reference prices for the price bands: the last trade of each market.

A durable pull consumer on `match.events.*` (stream MATCH_EVENTS, shared by
risk's replicas) reads match events, keeps the trade with the highest sequence
per market of each batch, writes it to `risk.reference_prices` (only if newer)
and acks. Every replica reads that table on its reload tick, so all of them
band against the same price; the one that consumed the batch sees it at once.

Gaps do not matter here: only the latest trade counts, so nothing is replayed
from match. A market without any trade yet has no reference price and no band
(the market's tick/lot grid and the quantity and notional limits still apply);
see docs/adr/0007-risk.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cex.match.v1 import match_pb2
from services.chassis import Catalog, MoneyError, ensure_stream, observe_fetch
from services.chassis.tracing import SpanKind, batch_span, message_context

from .state import State
from .store import Store

__all__ = ["STREAM", "PriceFollower", "last_trades"]

STREAM = "MATCH_EVENTS"
_log = logging.getLogger("cex.risk.prices")


def last_trades(
    catalog: Catalog, events: Sequence[match_pb2.MatchEvent]
) -> dict[str, tuple[int, int, int]]:
    """market -> (price in ticks, seq, event time ns) of the latest readable trade."""
    found: dict[str, tuple[int, int, int]] = {}
    for event in events:
        if event.WhichOneof("kind") != "trade":
            continue
        market = catalog.market(event.market)
        if market is None:
            continue
        known = found.get(event.market)
        if known is not None and known[1] >= event.seq:
            continue
        try:
            ticks = market.ticks(event.trade.price)
        except MoneyError:
            _log.error("unreadable trade price %r in %s:%s", event.trade.price, event.market,
                       event.seq)  # fmt: skip
            continue
        found[event.market] = (ticks, event.seq, event.event_time.ToNanoseconds())
    return found


class PriceFollower:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        catalog: Catalog,
        store: Store,
        state: State,
        durable: str,
        batch: int = 1000,
    ) -> None:
        self._js = js
        self._catalog = catalog
        self._store = store
        self._state = state
        self._durable = durable
        self._batch = batch

    async def run(self) -> None:
        """Follow until cancelled; NATS being away is retried."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("price follower stopped; restarting in 1 s")
                await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        await ensure_stream(self._js, STREAM, ["match.events.>"])
        sub = await self._js.pull_subscribe(
            "match.events.*",
            durable=self._durable,
            stream=STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30.0,
                max_ack_pending=20_000,
            ),
        )
        try:
            while True:
                try:
                    messages = await sub.fetch(self._batch, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                observe_fetch(STREAM, self._durable, messages)
                events = []
                for m in messages:
                    try:
                        events.append(match_pb2.MatchEvent.FromString(m.data))
                    except Exception:
                        _log.error("unreadable match event on %s", m.subject)
                with batch_span(
                    "risk.prices", map(message_context, messages), kind=SpanKind.CONSUMER
                ):
                    await self.handle(events)
                # Acked only once saved: a crash before redelivers the batch.
                for m in messages:
                    await m.ack()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 1.0)

    async def handle(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        latest = last_trades(self._catalog, events)
        if not latest:
            return
        await self._store.save_prices([(m, p, s, t) for m, (p, s, t) in latest.items()])
        for market, (ticks, seq, _) in latest.items():
            self._state.set_price(market, ticks, seq)
