"""Risk's rules on the wire: limits, kill switches and reference prices.

Risk publishes them (WatchRules: `rules_pb` of its State); the order gateway
follows them and runs risk's checks on its copy (`FollowedRules`), so the copy
answers exactly what risk's State would: the same merge of an account's
overrides over the defaults, the same engaged switches, the same prices. The
change sequence travels with them, and a follower that hears nothing for a few
heartbeats treats its copy as stale (ADR 0013).
"""

from __future__ import annotations

import time
from dataclasses import asdict, fields, replace
from typing import TypeVar

from cex.risk.v1 import risk_pb2
from services.chassis import Catalog, MoneyError, timestamp_ns

from .domain import KillSwitch, KillSwitches, Limits, MarketLimits, Scope, WithdrawalLimits, merge
from .state import State

__all__ = ["FollowedRules", "limits_of", "limits_pb", "rules_pb", "switch_of", "switch_pb"]


# The wire's MarketLimits and WithdrawalLimits name their fields exactly as the
# domain's entries do: an entry crosses field by field, by name.
_Entry = TypeVar("_Entry", MarketLimits, WithdrawalLimits)


def _entry_of(
    kind: type[_Entry], message: risk_pb2.MarketLimits | risk_pb2.WithdrawalLimits
) -> _Entry:
    return kind(**{f.name: getattr(message, f.name) for f in fields(kind)})


def limits_pb(limits: Limits, version: int, update_ns: int) -> risk_pb2.Limits:
    message = risk_pb2.Limits(
        account_id=limits.account_id,
        max_orders_per_second=limits.max_orders_per_second,
        max_open_orders=limits.max_open_orders,
        markets=[risk_pb2.MarketLimits(**asdict(m)) for m in limits.markets],
        withdrawals=[risk_pb2.WithdrawalLimits(**asdict(w)) for w in limits.withdrawals],
        version=version,
    )
    if update_ns:
        message.update_time.CopyFrom(timestamp_ns(update_ns))
    return message


def limits_of(message: risk_pb2.Limits) -> Limits:
    """Limits as the wire carries them (already validated), in domain terms."""
    return Limits(
        account_id=message.account_id,
        max_orders_per_second=message.max_orders_per_second,
        max_open_orders=message.max_open_orders,
        markets=tuple(_entry_of(MarketLimits, m) for m in message.markets),
        withdrawals=tuple(_entry_of(WithdrawalLimits, w) for w in message.withdrawals),
    )


# A kill switch crosses by name too, but for its scope (an enum) and its time.
_SWITCH_FIELDS = ("market", "account_id", "engaged", "block_withdrawals", "reason", "updated_by")


def switch_pb(s: KillSwitch) -> risk_pb2.KillSwitch:
    message = risk_pb2.KillSwitch(
        scope=int(s.scope),  # type: ignore[arg-type]
        **{name: getattr(s, name) for name in _SWITCH_FIELDS},
    )
    if s.update_time_ns:
        message.update_time.CopyFrom(timestamp_ns(s.update_time_ns))
    return message


def switch_of(message: risk_pb2.KillSwitch) -> KillSwitch:
    return KillSwitch(
        scope=Scope(message.scope),
        update_time_ns=message.update_time.ToNanoseconds(),
        **{name: getattr(message, name) for name in _SWITCH_FIELDS},
    )


def rules_pb(state: State, catalog: Catalog, heartbeat_ms: int) -> risk_pb2.WatchRulesResponse:
    """Everything State's order checks read, as one message."""
    stored = state.stored_limits()
    defaults = stored.pop("", None)
    switches = (
        state.switches.global_,
        *state.switches.markets.values(),
        *state.switches.accounts.values(),
    )
    prices = []
    for market, (ticks, seq) in state.prices().items():
        found = catalog.market(market)
        if found is not None:
            prices.append(risk_pb2.ReferencePrice(market=market, price=found.price(ticks), seq=seq))
    return risk_pb2.WatchRulesResponse(
        change_seq=state.change_seq,
        defaults=limits_pb(defaults.limits, defaults.version, defaults.update_time_ns)
        if defaults
        else risk_pb2.Limits(),
        accounts=[limits_pb(s.limits, s.version, s.update_time_ns) for s in stored.values()],
        kill_switches=[switch_pb(s) for s in switches if s is not None],
        reference_prices=prices,
        heartbeat_ms=heartbeat_ms,
    )


class FollowedRules:
    """A follower's copy of risk's rules: what `checks.OrderChecks` reads, as risk's
    State would answer it. `received` is when it came (time.monotonic())."""

    def __init__(self, message: risk_pb2.WatchRulesResponse, catalog: Catalog) -> None:
        self.change_seq = message.change_seq
        self.heartbeat_s = max(message.heartbeat_ms, 1) / 1000
        self.received = time.monotonic()
        self._defaults = limits_of(message.defaults)
        self._accounts = {m.account_id: limits_of(m) for m in message.accounts}
        self.switches = KillSwitches.of(switch_of(m) for m in message.kill_switches)
        self._prices: dict[str, int] = {}
        for p in message.reference_prices:
            market = catalog.market(p.market)
            if market is not None:
                try:
                    self._prices[p.market] = market.ticks(p.price)
                except MoneyError:
                    continue
        self._effective: dict[str, Limits] = {}

    def limits(self, account_id: str) -> Limits:
        found = self._effective.get(account_id)
        if found is None:
            found = replace(
                merge(self._defaults, self._accounts.get(account_id)), account_id=account_id
            )
            if len(self._effective) > 100_000:
                self._effective.clear()
            self._effective[account_id] = found
        return found

    def price(self, market: str) -> int | None:
        return self._prices.get(market)
