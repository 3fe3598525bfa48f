"""A market listed at runtime (ADR 0018), in the engine and the catalog: the listing is
the market's first event (seq 1) and changes nothing else (the snapshot has the bytes
of a market that never had a command); a ListedMarket is the whole definition; a
service's catalog takes listings, the built-in one does not."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import InvalidArgument
from services.chassis.listings import learn, listed_market, listed_spec
from services.chassis.markets import DEFAULT_CATALOG, Market, load_catalog
from services.match.engine import MarketEngine, decode

ASSETS = DEFAULT_CATALOG.assets
NEW = Market(
    symbol="BTC-ETH", base=ASSETS["BTC"], quote=ASSETS["ETH"], tick_size=Decimal("0.001"),
    lot_size=Decimal("0.00001"), min_quantity=Decimal("0.00001"), max_quantity=Decimal(1000),
    min_notional=Decimal("0.001"), price_band=Decimal("0.5"),
)  # fmt: skip
TS = 1_700_000_000_000_000_000


def listing(reason: str = "new pair", symbol: str = NEW.symbol) -> match_pb2.Command:
    return match_pb2.Command(
        command_id="list:r1",
        market=symbol,
        list_market=match_pb2.ListMarketCommand(
            market=listed_spec(NEW), reason=reason, request_id="r1", listed_by="admin"
        ),
    )


def test_a_listed_market_round_trips_through_its_definition() -> None:
    spec = listed_spec(NEW)
    assert (spec.tick_size, spec.lot_size, spec.price_band) == ("0.001", "0.00001", "0.5")
    assert (spec.base_scale, spec.quote_scale) == (8, 8)
    assert listed_market(spec, ASSETS) == NEW
    alone = listed_market(spec)  # the journal alone: assets from their scales
    assert listed_spec(alone) == spec and alone.base.scale == 8
    with pytest.raises(ValueError, match="minor units"):
        listed_market(match_pb2.ListedMarket(**{**_fields(spec), "tick_size": "0.0001",
                                                "lot_size": "0.00000001"}))  # fmt: skip


def _fields(spec: match_pb2.ListedMarket) -> dict[str, object]:
    return {f.name: v for f, v in spec.ListFields()}


def test_the_listing_is_the_markets_first_event_and_changes_nothing_else() -> None:
    engine = MarketEngine(NEW)
    before = engine.document()
    (event,) = engine.apply(decode(NEW, listing()), 1, TS)
    assert (event.seq, event.command_seq, event.WhichOneof("kind")) == (1, 1, "market_listed")
    assert event.market_listed.market == listed_spec(NEW)
    assert (event.market_listed.reason, event.market_listed.listed_by) == ("new pair", "admin")
    assert engine.status == t.MARKET_STATUS_TRADING and engine.status_reason == ""
    after = engine.document()
    assert set(after) == set(before) and "status" not in after  # no status set
    assert after["book"]["seq"] == 1 and engine.book.l2(None) == ([], [])
    restored = MarketEngine.restore(NEW, engine.snapshot())
    assert restored.state_hash() == engine.state_hash()


def test_a_malformed_listing_is_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        decode(NEW, listing(reason=""))
    assert [v.field for v in refused.value.violations] == ["command.list_market.reason"]
    with pytest.raises(InvalidArgument):
        decode(NEW, listing(symbol="ETH-BTC"))


def test_a_services_catalog_learns_listings_from_events_the_built_in_one_is_read_only() -> None:
    catalog = load_catalog({})
    event = match_pb2.MatchEvent(
        market=NEW.symbol, seq=1, market_listed=match_pb2.MarketListed(market=listed_spec(NEW))
    )
    assert learn(catalog, [event]) == [NEW]
    assert catalog.market(NEW.symbol) == NEW
    assert learn(catalog, [event]) == []  # once
    assert load_catalog({}).market(NEW.symbol) is None  # each load is its own copy
    assert DEFAULT_CATALOG.market(NEW.symbol) is None
    with pytest.raises(TypeError):
        DEFAULT_CATALOG.add(NEW)
