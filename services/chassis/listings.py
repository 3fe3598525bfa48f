"""Markets listed at runtime (ADR 0018): how every service's catalog learns them.

match's writer decides a listing (``CreateMarket``) as a journaled command and
keeps it in its markets table, committed with the journal entry. Every other
service holds the static catalog (`markets.load_catalog`) and adds the listed
markets to it, in place (`Catalog.add`), from three sources, so that none is
the only one:

- at start, match's ``ListListedMarkets`` (the table), before serving;
- the ``MarketListed`` event, the new market's first event on
  ``match.events.<symbol>``, which the consumers of ``match.events.*`` see in
  order, before any order of that market (`learn`);
- a reload of ``ListListedMarkets`` every few seconds, and on demand when a
  caller names a market the catalog does not know (`Listings.refresh`,
  rate-limited): the backstop for a lost event or a match that was away.

A listed market is built from its ``ListedMarket`` alone (grids, limits, the
scales of its assets), so the journal rebuilds it without the catalog; the
catalog's own asset (withdrawal network, fees) is used where it has one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal

import grpc

from cex.match.v1 import match_pb2, match_pb2_grpc

from .markets import Asset, Catalog, Market
from .money import decimal_text, parse_decimal

__all__ = ["Listings", "learn", "listed_market", "listed_spec"]

_log = logging.getLogger("cex.chassis.listings")


def _asset(symbol: str, scale: int, assets: Mapping[str, Asset] | None) -> Asset:
    known = assets.get(symbol) if assets is not None else None
    return known if known is not None and known.scale == scale else Asset(symbol, scale)


def listed_market(
    spec: match_pb2.ListedMarket, assets: Mapping[str, Asset] | None = None
) -> Market:
    """A listed market as the catalog's Market (ValueError if its grids disagree)."""
    return Market(
        symbol=spec.symbol,
        base=_asset(spec.base, spec.base_scale, assets),
        quote=_asset(spec.quote, spec.quote_scale, assets),
        tick_size=parse_decimal(spec.tick_size),
        lot_size=parse_decimal(spec.lot_size),
        min_quantity=parse_decimal(spec.min_quantity),
        max_quantity=parse_decimal(spec.max_quantity),
        min_notional=parse_decimal(spec.min_notional),
        price_band=parse_decimal(spec.price_band) if spec.price_band else Decimal(0),
    )


def listed_spec(market: Market) -> match_pb2.ListedMarket:
    return match_pb2.ListedMarket(
        symbol=market.symbol,
        base=market.base.symbol,
        quote=market.quote.symbol,
        tick_size=decimal_text(market.tick_size),
        lot_size=decimal_text(market.lot_size),
        min_quantity=decimal_text(market.min_quantity),
        max_quantity=decimal_text(market.max_quantity),
        min_notional=decimal_text(market.min_notional),
        price_band=decimal_text(market.price_band) if market.price_band else "",
        base_scale=market.base.scale,
        quote_scale=market.quote.scale,
    )


def learn(catalog: Catalog, events: Iterable[match_pb2.MatchEvent]) -> list[Market]:
    """Add the markets that `events` list to `catalog`; the ones added."""
    added = []
    for event in events:
        if event.WhichOneof("kind") == "market_listed":
            market = listed_market(event.market_listed.market, catalog.assets)
            if catalog.add(market):
                _log.info("market %s listed", market.symbol)
                added.append(market)
    return added


class Listings:
    """A service's follower of match's listed markets (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        channel: grpc.aio.Channel,
        *,
        every_s: float = 5.0,
        on_added: Callable[[Market], None] | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self.catalog = catalog
        self._stub = match_pb2_grpc.MatchServiceStub(channel)
        self._every_s = every_s
        self.on_added = on_added
        self._timeout_s = timeout_s
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task[bool] | None = None

    def added(self, markets: Iterable[Market]) -> None:
        if self.on_added is not None:
            for market in markets:
                self.on_added(market)

    def learn(self, events: Iterable[match_pb2.MatchEvent]) -> None:
        """From a batch of match events (the ``MarketListed`` push)."""
        self.added(learn(self.catalog, events))

    async def load(self) -> bool:
        """Every listed market into the catalog; False if match did not answer."""
        self._last_refresh = time.monotonic()
        try:
            response = await self._stub.ListListedMarkets(
                match_pb2.ListListedMarketsRequest(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("listed markets not loaded: %s", error.code().name)
            return False
        added = []
        for listing in response.markets:
            market = listed_market(listing.market, self.catalog.assets)
            if self.catalog.add(market):
                added.append(market)
        self.added(added)
        return True

    async def refresh(self, *, min_interval_s: float = 1.0) -> bool:
        """Reload now, unless a reload ran within `min_interval_s` (a caller naming
        an unknown market must not turn into a call to match per request)."""
        if self._refreshing is not None and not self._refreshing.done():
            return await asyncio.shield(self._refreshing)
        if time.monotonic() - self._last_refresh < min_interval_s:
            return False
        self._refreshing = asyncio.ensure_future(self.load())
        return await asyncio.shield(self._refreshing)

    async def knows(self, symbol: str) -> bool:
        """Whether `symbol` is a market, asking match once if the catalog does not know it."""
        if self.catalog.market(symbol) is not None:
            return True
        await self.refresh()
        return self.catalog.market(symbol) is not None

    async def run(self) -> None:
        """The backstop: reload every `every_s` until cancelled."""
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.load()
            except Exception:  # a bug: log it, keep the backstop going
                _log.exception("reloading the listed markets failed")
