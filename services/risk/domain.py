"""Limits and the checks against them: pure logic (no I/O, no clock).

Amounts in limits are decimal strings on the wire and exact `Decimal`s here
(parsed by the chassis money parser, compared under a context that traps any
rounding), because one entry ("*") applies to markets with different grids.
Prices and quantities of an order are integers on its market's grid (ticks and
lots); price bands are whole basis points.

Merging (GetLimits, and every check): for each field the most specific value
that is set wins, in this order: the account's entry for the market (or asset),
the account's "*" entry, the defaults' entry for the market, the defaults' "*"
entry. At the top level an account's non-zero value overrides the default's.
So 0 / "" in an account's overrides means "inherit", never "unlimited".
"""

from __future__ import annotations

import decimal
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from enum import IntEnum
from typing import Any, TypeVar

from services.chassis.markets import Market
from services.chassis.money import MoneyError, parse_decimal

__all__ = [
    "ANY",
    "BPS",
    "EXACT",
    "Denial",
    "KillSwitch",
    "KillSwitches",
    "Limits",
    "MarketLimits",
    "MarketRule",
    "OrderCheck",
    "Scope",
    "WithdrawalCheck",
    "WithdrawalLimits",
    "WithdrawalRule",
    "band_bps",
    "check_order",
    "check_withdrawal",
    "limit_amount_problem",
    "merge",
    "visible_switches",
    "within_master",
]

ANY = "*"
BPS = 10_000
# Exact arithmetic: any rounding raises instead of passing silently.
EXACT = decimal.Context(
    prec=200, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow]
)


class Scope(IntEnum):
    """KillSwitchScope in the proto."""

    GLOBAL = 1
    MARKET = 2
    ACCOUNT = 3


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a check said no. `code` is a grpc.StatusCode name."""

    reason: str
    message: str
    code: str = "FAILED_PRECONDITION"
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None


# -- limits -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarketLimits:
    market: str
    max_order_quantity: str = ""
    max_order_notional: str = ""
    price_band: str = ""  # a fraction of the reference price, e.g. "0.05"
    max_open_orders: int = 0


@dataclass(frozen=True, slots=True)
class WithdrawalLimits:
    asset: str
    max_amount: str = ""
    max_amount_per_day: str = ""
    max_count_per_day: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    account_id: str = ""  # "" = the exchange defaults
    max_orders_per_second: int = 0
    max_open_orders: int = 0
    markets: tuple[MarketLimits, ...] = ()
    withdrawals: tuple[WithdrawalLimits, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "max_orders_per_second": self.max_orders_per_second,
                "max_open_orders": self.max_open_orders,
                "markets": [
                    {
                        "market": m.market,
                        "max_order_quantity": m.max_order_quantity,
                        "max_order_notional": m.max_order_notional,
                        "price_band": m.price_band,
                        "max_open_orders": m.max_open_orders,
                    }
                    for m in self.markets
                ],
                "withdrawals": [
                    {
                        "asset": w.asset,
                        "max_amount": w.max_amount,
                        "max_amount_per_day": w.max_amount_per_day,
                        "max_count_per_day": w.max_count_per_day,
                    }
                    for w in self.withdrawals
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, account_id: str, text: str) -> Limits:
        doc = json.loads(text)
        return cls(
            account_id=account_id,
            max_orders_per_second=int(doc.get("max_orders_per_second", 0)),
            max_open_orders=int(doc.get("max_open_orders", 0)),
            markets=tuple(MarketLimits(**m) for m in doc.get("markets", ())),
            withdrawals=tuple(WithdrawalLimits(**w) for w in doc.get("withdrawals", ())),
        )


_Entry = TypeVar("_Entry", MarketLimits, WithdrawalLimits)


def _by_key(entries: Iterable[_Entry]) -> dict[str, _Entry]:
    """Entries by what they apply to: a market's symbol, an asset's code, or "*"."""
    return {getattr(e, fields(e)[0].name): e for e in entries}


def _most_specific(kind: type[_Entry], key: str, *layers: Mapping[str, _Entry]) -> _Entry:
    """`key`'s entry as the merge rule reads it: each field the first value set
    along the layers' own entries for `key` and their "*" entries, most specific
    layer first; a field set nowhere keeps its default (unlimited)."""
    chain = [e for layer in layers for e in (layer.get(key), layer.get(ANY)) if e is not None]
    blank = kind(key)
    values: dict[str, Any] = {
        f.name: next((v for e in chain if (v := getattr(e, f.name))), getattr(blank, f.name))
        for f in fields(kind)[1:]
    }
    return replace(blank, **values)


def _merge_entries(
    kind: type[_Entry], defaults: Iterable[_Entry], override: Iterable[_Entry]
) -> tuple[_Entry, ...]:
    d, o = _by_key(defaults), _by_key(override)
    return tuple(_most_specific(kind, key, o, d) for key in sorted(set(d) | set(o)))


def merge(defaults: Limits, override: Limits | None) -> Limits:
    """The effective limits of an account: its overrides over the defaults, field by field."""
    if override is None:
        return replace(defaults)
    return Limits(
        account_id=override.account_id,
        max_orders_per_second=override.max_orders_per_second or defaults.max_orders_per_second,
        max_open_orders=override.max_open_orders or defaults.max_open_orders,
        markets=_merge_entries(MarketLimits, defaults.markets, override.markets),
        withdrawals=_merge_entries(WithdrawalLimits, defaults.withdrawals, override.withdrawals),
    )


def _bounded_int(
    field_name: str, wanted: int, ceiling: int, violations: list[tuple[str, str]]
) -> int:
    """0 is "no limit": under a ceiling, it takes the ceiling."""
    if ceiling and wanted > ceiling:
        violations.append((field_name, f"at most {ceiling}, the master's limit"))
    return wanted or ceiling


def _bounded_text(
    field_name: str, wanted: str, ceiling: str, violations: list[tuple[str, str]]
) -> str:
    """A decimal string; "" is "no limit": under a ceiling, it takes the ceiling."""
    if not ceiling or not wanted:
        return wanted or ceiling
    try:
        over = parse_decimal(wanted) > parse_decimal(ceiling)
    except MoneyError:
        return wanted  # not a decimal: the request's own validation names it
    if over:
        violations.append((field_name, f"at most {ceiling}, the master's limit"))
    return wanted


def within_master(requested: Limits, ceiling: Limits) -> tuple[Limits, list[tuple[str, str]]]:
    """A sub-account's limits as its master sets them (ADR 0017): each no looser
    than the master's own effective limits (`ceiling`, the operator's), a limit
    left unset taking the master's, and every market and asset the master is
    limited in limited as much for the sub (copied when the master names none).
    Returns the limits to store and the (field, why) of each one above the master's."""
    violations: list[tuple[str, str]] = []
    any_market = next((m for m in ceiling.markets if m.market == ANY), None)
    markets_over = {m.market: m for m in ceiling.markets}
    markets = []
    for i, m in enumerate(requested.markets):
        c = markets_over.get(m.market) or any_market or MarketLimits(m.market)
        f = f"limits.markets[{i}]"
        markets.append(
            MarketLimits(
                market=m.market,
                max_order_quantity=_bounded_text(
                    f"{f}.max_order_quantity",
                    m.max_order_quantity,
                    c.max_order_quantity,
                    violations,
                ),
                max_order_notional=_bounded_text(
                    f"{f}.max_order_notional",
                    m.max_order_notional,
                    c.max_order_notional,
                    violations,
                ),
                price_band=_bounded_text(f"{f}.price_band", m.price_band, c.price_band, violations),
                max_open_orders=_bounded_int(
                    f"{f}.max_open_orders", m.max_open_orders, c.max_open_orders, violations
                ),
            )
        )
    named = {m.market for m in requested.markets}
    markets += [m for m in ceiling.markets if m.market not in named]
    assets_over = {w.asset: w for w in ceiling.withdrawals}
    withdrawals = []
    for i, w in enumerate(requested.withdrawals):
        cw = assets_over.get(w.asset) or WithdrawalLimits(w.asset)
        f = f"limits.withdrawals[{i}]"
        withdrawals.append(
            WithdrawalLimits(
                asset=w.asset,
                max_amount=_bounded_text(
                    f"{f}.max_amount", w.max_amount, cw.max_amount, violations
                ),
                max_amount_per_day=_bounded_text(
                    f"{f}.max_amount_per_day",
                    w.max_amount_per_day,
                    cw.max_amount_per_day,
                    violations,
                ),
                max_count_per_day=_bounded_int(
                    f"{f}.max_count_per_day", w.max_count_per_day, cw.max_count_per_day, violations
                ),
            )
        )
    assets = {w.asset for w in requested.withdrawals}
    withdrawals += [w for w in ceiling.withdrawals if w.asset not in assets]
    limits = Limits(
        account_id=requested.account_id,
        max_orders_per_second=_bounded_int(
            "limits.max_orders_per_second",
            requested.max_orders_per_second,
            ceiling.max_orders_per_second,
            violations,
        ),
        max_open_orders=_bounded_int(
            "limits.max_open_orders", requested.max_open_orders, ceiling.max_open_orders, violations
        ),
        markets=tuple(sorted(markets, key=lambda m: m.market)),
        withdrawals=tuple(sorted(withdrawals, key=lambda w: w.asset)),
    )
    return limits, violations


def band_bps(text: str) -> int:
    """A price band fraction ("0.05") as whole basis points (500); MoneyError if not."""
    value = parse_decimal(text)
    bps = value * BPS
    if bps != bps.to_integral_value() or value <= 0:
        raise MoneyError("OFF_GRID", f"{text} is not a positive whole number of basis points")
    return int(bps)


@dataclass(frozen=True, slots=True)
class MarketRule:
    """What applies to one account in one market, parsed once."""

    max_quantity: Decimal | None
    max_notional: Decimal | None
    band_bps: int | None
    max_open_orders: int  # 0 = no limit


@dataclass(frozen=True, slots=True)
class WithdrawalRule:
    max_amount: Decimal | None
    max_amount_per_day: Decimal | None
    max_count_per_day: int  # 0 = no limit


def _dec(text: str) -> Decimal | None:
    return parse_decimal(text) if text else None


@functools.lru_cache(maxsize=65_536)
def market_rule(limits: Limits, market: str) -> MarketRule:
    """The rule for `market` from already merged limits (their entry, else "*");
    memoized (limits are immutable), so the hot path parses no decimals."""
    entry = _most_specific(MarketLimits, market, _by_key(limits.markets))
    return MarketRule(
        max_quantity=_dec(entry.max_order_quantity),
        max_notional=_dec(entry.max_order_notional),
        band_bps=band_bps(entry.price_band) if entry.price_band else None,
        max_open_orders=entry.max_open_orders,
    )


def withdrawal_rule(limits: Limits, asset: str) -> WithdrawalRule:
    entry = _most_specific(WithdrawalLimits, asset, _by_key(limits.withdrawals))
    return WithdrawalRule(
        max_amount=_dec(entry.max_amount),
        max_amount_per_day=_dec(entry.max_amount_per_day),
        max_count_per_day=entry.max_count_per_day,
    )


# -- kill switches ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillSwitch:
    scope: Scope
    market: str = ""
    account_id: str = ""
    engaged: bool = False
    block_withdrawals: bool = False
    reason: str = ""
    updated_by: str = ""
    update_time_ns: int = 0

    @property
    def key(self) -> tuple[int, str, str]:
        return (int(self.scope), self.market, self.account_id)


@dataclass(frozen=True, slots=True)
class KillSwitches:
    """The engaged switches, indexed for the hot path."""

    global_: KillSwitch | None = None
    markets: Mapping[str, KillSwitch] = field(default_factory=dict)
    accounts: Mapping[str, KillSwitch] = field(default_factory=dict)

    @classmethod
    def of(cls, switches: Iterable[KillSwitch]) -> KillSwitches:
        g: KillSwitch | None = None
        markets: dict[str, KillSwitch] = {}
        accounts: dict[str, KillSwitch] = {}
        for s in switches:
            if not s.engaged:
                continue
            if s.scope is Scope.GLOBAL:
                g = s
            elif s.scope is Scope.MARKET:
                markets[s.market] = s
            else:
                accounts[s.account_id] = s
        return cls(g, markets, accounts)

    def for_order(self, account_id: str, market: str) -> KillSwitch | None:
        return self.global_ or self.markets.get(market) or self.accounts.get(account_id)

    def for_withdrawal(self, account_id: str) -> KillSwitch | None:
        for s in (self.global_, self.accounts.get(account_id)):
            if s is not None and s.block_withdrawals:
                return s
        return None


def _scope_name(s: KillSwitch) -> str:
    return {Scope.GLOBAL: "GLOBAL", Scope.MARKET: "MARKET", Scope.ACCOUNT: "ACCOUNT"}[s.scope]


# -- the order check ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderCheck:
    """An order (or an amend) on its market's grid, as risk sees it."""

    account_id: str
    market: Market
    amend: bool
    band_price_ticks: int | None  # the limit price that bands apply to (LIMIT orders only)
    price_ticks: int | None  # the price for the notional: limit, else stop; None = reference
    lots: int | None  # base quantity; None for market buys by quote budget
    quote_budget: Decimal | None  # market buys by quote quantity
    open_orders: int  # the account's working orders, not counting this one
    market_open_orders: int


def _deny(reason: str, message: str, **metadata: str) -> Denial:
    return Denial(reason, message, metadata=metadata)


def check_order(
    order: OrderCheck,
    *,
    limits: Limits,
    switches: KillSwitches,
    reference_ticks: int | None,
) -> Denial | None:
    """Every limit but the rate limit (that one needs Redis). None = allowed."""
    m = order.market
    switch = switches.for_order(order.account_id, m.symbol)
    if switch is not None:
        return _deny(
            "RISK_KILL_SWITCH_ENGAGED",
            f"{_scope_name(switch).lower()} kill switch engaged: cancel-only ({switch.reason})",
            scope=_scope_name(switch),
        )
    rule = market_rule(limits, m.symbol)
    quantity = None if order.lots is None else EXACT.multiply(Decimal(order.lots), m.lot_size)
    if rule.max_quantity is not None and quantity is not None and quantity > rule.max_quantity:
        return _deny(
            "RISK_QUANTITY_LIMIT_EXCEEDED",
            f"quantity {quantity.normalize():f} is above the limit {rule.max_quantity:f}",
            limit=f"{rule.max_quantity:f}",
        )
    if rule.max_notional is not None:
        notional: Decimal | None = order.quote_budget
        price_ticks = order.price_ticks if order.price_ticks is not None else reference_ticks
        if quantity is not None and price_ticks is not None:
            notional = EXACT.multiply(EXACT.multiply(Decimal(price_ticks), m.tick_size), quantity)
        if notional is not None and notional > rule.max_notional:
            return _deny(
                "RISK_NOTIONAL_LIMIT_EXCEEDED",
                f"notional {notional.normalize():f} is above the limit {rule.max_notional:f}",
                limit=f"{rule.max_notional:f}",
            )
    price = order.band_price_ticks
    band = rule.band_bps
    if band is None and m.price_band:  # the market's own, from its listing (ADR 0018)
        band = int(m.price_band * BPS)
    # |price - ref| / ref <= bps / 10000, in integers.
    if (
        band is not None
        and reference_ticks is not None
        and price is not None
        and abs(price - reference_ticks) * BPS > band * reference_ticks
    ):
        low = reference_ticks * (BPS - band)
        high = reference_ticks * (BPS + band)
        return _deny(
            "RISK_PRICE_OUT_OF_BAND",
            f"price {m.price(price)} is more than {band} bps from the "
            f"reference price {m.price(reference_ticks)}",
            reference_price=m.price(reference_ticks),
            band_bps=str(band),
            min_price=m.price(-(-low // BPS)),
            max_price=m.price(high // BPS),
        )
    if not order.amend:
        if limits.max_open_orders and order.open_orders >= limits.max_open_orders:
            return _deny(
                "RISK_OPEN_ORDERS_LIMIT_EXCEEDED",
                f"{order.open_orders} working orders: the limit is {limits.max_open_orders}",
                limit=str(limits.max_open_orders),
            )
        if rule.max_open_orders and order.market_open_orders >= rule.max_open_orders:
            return _deny(
                "RISK_OPEN_ORDERS_LIMIT_EXCEEDED",
                f"{order.market_open_orders} working orders in {m.symbol}: "
                f"the limit is {rule.max_open_orders}",
                limit=str(rule.max_open_orders),
                market=m.symbol,
            )
    return None


# -- the withdrawal check -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class WithdrawalCheck:
    account_id: str
    asset: str
    amount: Decimal
    day_amount: Decimal  # allowed withdrawals of this account and asset in the last 24 h
    day_count: int


def check_withdrawal(
    w: WithdrawalCheck, *, limits: Limits, switches: KillSwitches
) -> Denial | None:
    switch = switches.for_withdrawal(w.account_id)
    if switch is not None:
        frozen = switch.scope is Scope.ACCOUNT
        return _deny(
            "RISK_ACCOUNT_FROZEN" if frozen else "RISK_WITHDRAWALS_HALTED",
            f"withdrawals are {'frozen for this account' if frozen else 'halted'} "
            f"({switch.reason})",
            scope=_scope_name(switch),
        )
    rule = withdrawal_rule(limits, w.asset)
    if rule.max_amount is not None and w.amount > rule.max_amount:
        return _deny(
            "RISK_WITHDRAWAL_LIMIT_EXCEEDED",
            f"{w.amount:f} {w.asset} is above the single-withdrawal limit {rule.max_amount:f}",
            limit="max_amount",
        )
    if rule.max_amount_per_day is not None:
        total = EXACT.add(w.day_amount, w.amount)
        if total > rule.max_amount_per_day:
            return _deny(
                "RISK_WITHDRAWAL_LIMIT_EXCEEDED",
                f"{total:f} {w.asset} over 24 hours would pass the limit "
                f"{rule.max_amount_per_day:f}",
                limit="max_amount_per_day",
            )
    if rule.max_count_per_day and w.day_count + 1 > rule.max_count_per_day:
        return _deny(
            "RISK_WITHDRAWAL_LIMIT_EXCEEDED",
            f"{w.day_count} withdrawals in 24 hours: the limit is {rule.max_count_per_day}",
            limit="max_count_per_day",
        )
    return None


def limit_amount_problem(text: str, unit: Decimal | None) -> tuple[str, str] | None:
    """Why a limit's amount is refused, as (description, reason); None when it is
    fine. Empty means no limit; else a positive decimal, on `unit`'s grid if given."""
    if not text:
        return None
    try:
        value = parse_decimal(text)
    except MoneyError as error:
        return str(error), error.reason
    if value <= 0:
        return "must be positive (empty means no limit)", "NOT_POSITIVE"
    if unit is not None and EXACT.remainder(value, unit):
        return f"not a multiple of {unit}", "OFF_GRID"
    return None


def visible_switches(
    switches: Iterable[KillSwitch],
    *,
    account: str | None,
    engaged_only: bool,
    after: tuple[int, str, str] | None,
) -> list[KillSwitch]:
    """The switches a caller may list, in key order after `after`: every GLOBAL and
    MARKET switch, and of ACCOUNT switches only `account`'s (None: everyone's)."""
    return [
        s
        for s in sorted(switches, key=lambda s: s.key)
        if (not engaged_only or s.engaged)
        and (after is None or s.key > after)
        and (account is None or s.scope is not Scope.ACCOUNT or s.account_id == account)
    ]
