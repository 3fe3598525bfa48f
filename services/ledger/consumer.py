"""The settlement consumer: match events from JetStream into the writer.

A durable pull consumer on `match.events.*` (stream MATCH_EVENTS) fetches
batches, turns each `cex.match.v1.MatchEvent` into a `MarketEvent`, and hands
each market's run of events to the writer as one `SettleJob`. Messages are
acked only after the job committed, so a crash redelivers them and the cursor
(and the unique trade key) skips what was applied. When the job reports a gap
the missing events are fetched from match's `ReplayEvents` and applied first;
that is also how a message that does not decode, which the chassis'
`PullConsumer` skips, is made up for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal

from nats.js import JetStreamContext

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis import Catalog, MoneyError, PullConsumer, match_events
from services.chassis.money import parse_decimal

from .auditor import LedgerMetrics
from .settlement import Applied, Gap, MarketEvent, Party, Release, TradeSettlement, Unreadable
from .writer import SettleJob, Writer

__all__ = ["STREAM", "SUBJECTS", "Replay", "SettlementConsumer", "to_market_event"]

STREAM = "MATCH_EVENTS"
SUBJECTS = ["match.events.>"]

_log = logging.getLogger("cex.ledger.settlement")

Replay = Callable[[str, int, int], Awaitable[Sequence[match_pb2.MatchEvent]]]


def _zero(text: str) -> bool:
    try:
        return parse_decimal(text) == Decimal(0)
    except MoneyError:
        return False


def _ends_order(event: match_pb2.MatchEvent) -> bool:
    """Whether a rejection ends its order: a refused place of a new order (the
    order service's command id `place:<order_id>`). A refused cancel or amend
    leaves a working order, and its hold, as they were; a duplicate order id
    names an order that exists."""
    r = event.rejected
    return event.command_id == f"place:{r.order_id}" and r.reason != "MATCH_DUPLICATE_ORDER_ID"


def to_market_event(catalog: Catalog, event: match_pb2.MatchEvent) -> MarketEvent:
    """What the ledger must do for one event (MoneyError/KeyError if it cannot read it)."""
    kind = event.WhichOneof("kind")
    if kind == "trade":
        t = event.trade
        market = catalog.markets[event.market]
        assets = catalog.assets

        def party(account: str, order: str, fee: str, fee_asset: str, remaining: str) -> Party:
            asset = assets[fee_asset] if fee_asset else market.quote
            amount = asset.to_minor(fee) if fee else 0
            return Party(account, order, amount, asset.symbol, _zero(remaining))

        maker = party(
            t.maker_account_id,
            t.maker_order_id,
            t.maker_fee,
            t.maker_fee_asset,
            t.maker_remaining_quantity,
        )
        taker = party(
            t.taker_account_id,
            t.taker_order_id,
            t.taker_fee,
            t.taker_fee_asset,
            t.taker_remaining_quantity,
        )
        taker_buys = t.taker_side == types_pb2.SIDE_BUY
        body: TradeSettlement | Release | None = TradeSettlement(
            trade_id=t.trade_id,
            base=market.base.symbol,
            quote=market.quote.symbol,
            quantity=market.base.to_minor(t.quantity),
            quote_quantity=market.quote.to_minor(t.quote_quantity),
            buyer=taker if taker_buys else maker,
            seller=maker if taker_buys else taker,
        )
    elif kind == "cancelled" and _zero(event.cancelled.remaining_quantity):
        body = Release(event.cancelled.order_id)
    elif kind == "rejected" and _ends_order(event):
        body = Release(event.rejected.order_id)
    else:
        body = None
    return MarketEvent(event.market, event.seq, body)


class SettlementConsumer:
    def __init__(
        self,
        *,
        writer: Writer,
        catalog: Catalog,
        js: JetStreamContext,
        replay: Replay,
        metrics: LedgerMetrics,
        durable: str,
    ) -> None:
        self._writer = writer
        self._catalog = catalog
        self._js = js
        self._replay = replay
        self._metrics = metrics
        self._durable = durable

    async def run(self) -> None:
        """Consume until cancelled (the chassis' PullConsumer: NATS being away is
        retried, an undecodable message skipped, a failed batch redelivered)."""
        await PullConsumer(
            js=self._js,
            stream=STREAM,
            subjects=SUBJECTS,
            filter_subject="match.events.*",
            durable=self._durable,
            decode=match_events,
            unbatch=True,
            handle=self.handle,
            span="ledger.settle",
            log=_log,
        ).run()

    async def handle(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        """Apply events (any markets, any order, duplicates allowed); fills gaps."""
        by_market: dict[str, dict[int, match_pb2.MatchEvent]] = {}
        for event in events:
            by_market.setdefault(event.market, {})[event.seq] = event
        for market, found in by_market.items():
            await self._apply_market(market, [found[s] for s in sorted(found)])

    def _convert(self, event: match_pb2.MatchEvent) -> MarketEvent:
        try:
            return to_market_event(self._catalog, event)
        except (MoneyError, KeyError) as error:
            _log.error(
                "UNREADABLE MATCH EVENT %s:%s, not settled: %r", event.market, event.seq, error
            )
            return MarketEvent(event.market, event.seq, Unreadable(repr(error)[:500]))

    async def _apply_market(self, market: str, events: list[match_pb2.MatchEvent]) -> None:
        todo = [self._convert(e) for e in events]
        for _ in range(100):
            result, anomalies = await self._writer.submit(SettleJob(market, todo))
            for kind in anomalies:
                self._metrics.anomalies.labels(kind).inc()
                _log.warning("settlement anomaly %s in %s", kind, market)
            if isinstance(result, Applied):
                self._metrics.settled.inc(result.trades)
                return
            assert isinstance(result, Gap)
            _log.warning(
                "gap in %s: expected seq %s, got %s; replaying", market, result.expected, result.got
            )
            missing = await self._replay(market, result.expected, result.got - 1)
            if not missing or missing[0].seq != result.expected:
                raise RuntimeError(f"ReplayEvents({market}, {result.expected}) returned no fill")
            todo = [self._convert(e) for e in missing] + [m for m in todo if m.seq >= result.got]
        raise RuntimeError(f"{market}: gaps keep appearing")
