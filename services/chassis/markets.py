"""Assets and markets: the static reference data every service agrees on.

An asset has a scale (decimal places of its minor unit): ledger balances are
integers in minor units. A market trades a base asset against a quote asset on
a grid: prices are multiples of `tick_size`, quantities of `lot_size`, so a
trade's quote amount (price x quantity) is a whole number of tick-lots, and
`tick_size * lot_size` must be a whole number of the quote asset's minor unit.

Fees live here too, so that there is one source for what the exchange charges
and what it shows (issue 18): the starting trading fee schedule (`fees`: the
maker and taker rates of the tier "default", charged in the asset a party
receives; auth seeds its schedule with it, and operators change the schedule
at runtime from there: ADR 0016), and per asset its withdrawal network, fee and
minimum that funding applies. Auth's GetFees (`GET /v1/fees`) answers them to a
caller.

The defaults below are what `cex up` runs with; `CEX_MARKETS` names a YAML
file with the same shape to replace them (read once, at start). An asset or
the fee schedule it leaves out keeps the built-in values for its symbol.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .money import from_units, parse_decimal, to_units

__all__ = ["DEFAULT_CATALOG", "Asset", "Catalog", "FeeSchedule", "Market", "load_catalog"]


@dataclass(frozen=True, slots=True)
class Asset:
    symbol: str
    scale: int  # decimal places of the minor unit
    # Withdrawals: the network it moves on ("" = not withdrawable), the fee
    # charged on top of the amount, and the smallest amount (asset units).
    network: str = ""
    withdrawal_fee: Decimal = Decimal(0)
    min_withdrawal: Decimal = Decimal(0)

    @property
    def unit(self) -> Decimal:
        return Decimal(1).scaleb(-self.scale)

    def to_minor(self, amount: str) -> int:
        """A decimal string as minor units; MoneyError if malformed or over-precise."""
        return to_units(amount, self.unit)

    def format(self, minor: int) -> str:
        return from_units(minor, self.unit)


@dataclass(frozen=True, slots=True)
class Market:
    symbol: str
    base: Asset
    quote: Asset
    tick_size: Decimal
    lot_size: Decimal
    min_quantity: Decimal
    max_quantity: Decimal
    min_notional: Decimal  # in the quote asset
    # The default price band (a fraction of the reference price; 0: none): a
    # market listed at runtime may carry one (ADR 0018); risk's rules override it.
    price_band: Decimal = Decimal(0)

    def asset(self, symbol: str) -> Asset:
        """The market's base or quote asset, by symbol."""
        if symbol not in (self.base.symbol, self.quote.symbol):
            raise KeyError(f"{symbol} is neither {self.symbol}'s base nor its quote")
        return self.base if symbol == self.base.symbol else self.quote

    def __post_init__(self) -> None:
        for name in ("tick_size", "lot_size", "min_quantity", "max_quantity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.symbol}: {name} must be positive")
        if (self.tick_size * self.lot_size) % self.quote.unit:
            raise ValueError(
                f"{self.symbol}: tick_size x lot_size must be a whole number of "
                f"{self.quote.symbol} minor units"
            )
        if self.lot_size % self.base.unit or self.min_quantity % self.lot_size:
            raise ValueError(f"{self.symbol}: lot_size and min_quantity must sit on the grids")

    @property
    def notional_unit(self) -> Decimal:
        """The quote amount of one tick-lot (one tick of price times one lot)."""
        return self.tick_size * self.lot_size

    def ticks(self, price: str) -> int:
        return to_units(price, self.tick_size)

    def lots(self, quantity: str) -> int:
        return to_units(quantity, self.lot_size)

    def tick_lots(self, quote_amount: str) -> int:
        return to_units(quote_amount, self.notional_unit)

    def price(self, ticks: int) -> str:
        return from_units(ticks, self.tick_size)

    def quantity(self, lots: int) -> str:
        return from_units(lots, self.lot_size)

    def quote_amount(self, tick_lots: int) -> str:
        return from_units(tick_lots, self.notional_unit)

    def base_minor(self, lots: int) -> int:
        """Lots as minor units of the base asset."""
        return int(lots * self.lot_size / self.base.unit)

    def quote_minor(self, tick_lots: int) -> int:
        """Tick-lots as minor units of the quote asset."""
        return int(tick_lots * self.notional_unit / self.quote.unit)


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """Trading fee rates (fractions of what a party receives, in that asset)."""

    tier: str
    maker_rate: Decimal
    taker_rate: Decimal


@dataclass(frozen=True, slots=True)
class Catalog:
    assets: Mapping[str, Asset]
    markets: Mapping[str, Market]
    fees: FeeSchedule = FeeSchedule("default", Decimal("0.001"), Decimal("0.002"))

    def market(self, symbol: str) -> Market | None:
        return self.markets.get(symbol)

    def add(self, market: Market, *, replace: bool = False) -> bool:
        """A market listed at runtime (ADR 0018), added in place so that every part
        of the process holding this catalog sees it; False if already known (unless
        `replace`: the writer's own copy, whose listing may have failed to commit)."""
        markets = self.markets
        if market.symbol in markets and not replace:
            return False
        if not isinstance(markets, dict):
            raise TypeError("this catalog's markets are read-only")
        markets[market.symbol] = market
        return True


def _asset(symbol: str, spec: Mapping[str, Any], builtin: Asset | None) -> Asset:
    def value(name: str, default: Any) -> Any:
        if name in spec:
            return spec[name]
        return getattr(builtin, name) if builtin is not None else default

    def amount(name: str) -> Decimal:
        found = value(name, "0")
        return found if isinstance(found, Decimal) else parse_decimal(str(found))

    return Asset(
        symbol,
        int(spec["scale"]),
        network=str(value("network", "")),
        withdrawal_fee=amount("withdrawal_fee"),
        min_withdrawal=amount("min_withdrawal"),
    )


def _catalog(doc: Mapping[str, Any], builtin: Catalog | None = None) -> Catalog:
    assets = {
        symbol: _asset(symbol, spec, builtin.assets.get(symbol) if builtin else None)
        for symbol, spec in doc["assets"].items()
    }
    markets: dict[str, Market] = {}
    for symbol, spec in doc["markets"].items():
        base, quote = assets[spec["base"]], assets[spec["quote"]]
        markets[symbol] = Market(
            symbol=symbol,
            base=base,
            quote=quote,
            **{
                name: parse_decimal(str(spec[name]))
                for name in (
                    "tick_size",
                    "lot_size",
                    "min_quantity",
                    "max_quantity",
                    "min_notional",
                )
            },
        )
    fees = doc.get("fees")
    if fees is None:
        return Catalog(assets, markets, **({"fees": builtin.fees} if builtin else {}))
    schedule = FeeSchedule(
        str(fees.get("tier", "default")),
        parse_decimal(str(fees["maker_rate"])),
        parse_decimal(str(fees["taker_rate"])),
    )
    return Catalog(assets, markets, schedule)


def _readonly(catalog: Catalog) -> Catalog:
    return Catalog(MappingProxyType(dict(catalog.assets)), MappingProxyType(dict(catalog.markets)),
                   catalog.fees)  # fmt: skip


# Minor units: 8 decimals for every asset inside the exchange (as the major
# exchanges keep them), so that Binance-like grids (0.01 x 0.00001) are exact.
# Read-only (load_catalog gives each service its own copy to add listings to).
DEFAULT_CATALOG = _readonly(
    _catalog(
        {
            "assets": {
                "BTC": {
                    "scale": 8,
                    "network": "bitcoin",
                    "withdrawal_fee": "0.00002",
                    "min_withdrawal": "0.0001",
                },
                "ETH": {
                    "scale": 8,
                    "network": "ethereum",
                    "withdrawal_fee": "0.0005",
                    "min_withdrawal": "0.001",
                },
                "USDT": {
                    "scale": 8,
                    "network": "ethereum",
                    "withdrawal_fee": "1",
                    "min_withdrawal": "1",
                },
            },
            # The starting fee schedule (tier "default", ADR 0016): a maker
            # pays 0.1 % and a taker 0.2 % of what they receive.
            "fees": {"tier": "default", "maker_rate": "0.001", "taker_rate": "0.002"},
            "markets": {
                "BTC-USDT": {
                    "base": "BTC",
                    "quote": "USDT",
                    "tick_size": "0.01",
                    "lot_size": "0.00001",
                    "min_quantity": "0.00001",
                    "max_quantity": "9000",
                    "min_notional": "5",
                },
                "ETH-USDT": {
                    "base": "ETH",
                    "quote": "USDT",
                    "tick_size": "0.01",
                    "lot_size": "0.0001",
                    "min_quantity": "0.0001",
                    "max_quantity": "100000",
                    "min_notional": "5",
                },
                "ETH-BTC": {
                    "base": "ETH",
                    "quote": "BTC",
                    "tick_size": "0.00001",
                    "lot_size": "0.001",
                    "min_quantity": "0.001",
                    "max_quantity": "100000",
                    "min_notional": "0.0001",
                },
            },
        }
    )
)


def load_catalog(env: Mapping[str, str] | None = None) -> Catalog:
    """The defaults, or the YAML file named by CEX_MARKETS."""
    env = os.environ if env is None else env
    path = env.get("CEX_MARKETS", "").strip()
    if not path:  # a copy: markets listed at runtime are added to it (Catalog.add)
        return Catalog(
            dict(DEFAULT_CATALOG.assets), dict(DEFAULT_CATALOG.markets), DEFAULT_CATALOG.fees
        )
    return _catalog(yaml.safe_load(Path(path).read_text()), DEFAULT_CATALOG)
