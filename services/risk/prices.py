"""Reference prices for the price bands: the last trade of each market.

A durable pull consumer on `match.events.*` (stream MATCH_EVENTS, shared by
risk's replicas) reads match events, keeps the trade with the highest sequence
per market of each batch, writes it to `risk.reference_prices` (only if newer)
and acks; a batch that could not be saved is not acked and comes again (the
chassis' `PullConsumer`, which also skips a message that does not decode).
Every replica reads that table on its reload tick, so all of them
band against the same price; the one that consumed the batch sees it at once.

Gaps do not matter here: only the latest trade counts, so nothing is replayed
from match. A market without any trade yet has no reference price and no band
(the market's tick/lot grid and the quantity and notional limits still apply);
see docs/adr/0007-risk.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from nats.js import JetStreamContext

from cex.match.v1 import match_pb2
from services.chassis import Catalog, MoneyError, match_event_consumer
from services.chassis.listings import learn

from .state import State
from .store import Store

__all__ = ["PriceFollower", "last_trades"]

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


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PriceFollower:
    js: JetStreamContext
    catalog: Catalog
    store: Store
    state: State
    durable: str
    batch: int = 1000

    async def run(self) -> None:
        """Follow until cancelled (the chassis' PullConsumer: NATS being away is
        retried, an undecodable message skipped, a failed batch redelivered)."""
        await match_event_consumer(
            self.js, self.durable, self.handle, batch=self.batch, span="risk.prices", log=_log
        ).run()

    async def handle(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        learn(self.catalog, events)  # a market listed (ADR 0018) before its trades
        latest = last_trades(self.catalog, events)
        if not latest:
            return
        await self.store.save_prices([(m, p, s, t) for m, (p, s, t) in latest.items()])
        for market, (ticks, seq, _) in latest.items():
            self.state.set_price(market, ticks, seq)
