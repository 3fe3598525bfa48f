"""Risk's pre-trade checks, run in order's own process (ADR 0013).

Risk owns the rules (limits, kill switches, reference prices) and publishes
them on `WatchRules`: the whole set on connect, again at once after every
change, a heartbeat otherwise. `RulesFollower` keeps the latest copy (never
one with an older change sequence), reconnecting by itself; `RiskChecks` runs
risk's own `OrderChecks` on that copy, with the per-account rate buckets in
Redis that every checking process shares, except the open-order limits, which
go to the writer with the order (it counts working orders exactly). So an
order's way leaves the process for nothing but the writer.

A copy that has heard nothing for `stale_heartbeats` heartbeats (risk away, or
the stream broken) is stale: checks refuse with UNAVAILABLE
`ORDER_RISK_RULES_STALE` (retryable) rather than decide on rules that may
have changed. Right after a start, before the first rules arrive (the stream
needs this service's token, which the stack issues once its edge is up), a
check waits for them up to `first_rules_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from decimal import Decimal

import grpc
from prometheus_client import Gauge

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import Catalog, Unavailable
from services.chassis.money import parse_decimal
from services.risk.bucket import RateLimiter
from services.risk.checks import OrderChecks
from services.risk.domain import KillSwitches, Limits, market_rule
from services.risk.rules import FollowedRules

from .downstream import StatusError, rate_usage_var

__all__ = ["RULES_HEARD", "RiskChecks", "RulesFollower"]

_log = logging.getLogger("cex.order.risk")
_BACKOFF_MAX_S = 1.0

RULES_HEARD = Gauge(
    "order_risk_rules_heard_timestamp_seconds",
    "Unix time risk's rules stream last spoke (0 before the first rules); 3 heartbeats "
    "later the copy is stale and every place and amend is refused UNAVAILABLE.",
)


class RulesFollower:
    """The latest rules risk published; what `OrderChecks` reads (checks.Rules)."""

    def __init__(
        self, channel: grpc.aio.Channel, catalog: Catalog, *, stale_heartbeats: int = 3
    ) -> None:
        self._stub = risk_pb2_grpc.RiskServiceStub(channel)
        self._catalog = catalog
        self._stale_heartbeats = stale_heartbeats
        self.rules: FollowedRules | None = None
        self.ready = asyncio.Event()
        RULES_HEARD.set_function(self.heard_at)

    async def run(self) -> None:
        """Follow until cancelled, reconnecting after any failure."""
        delay = 0.1
        while True:
            try:
                async for message in self._stub.WatchRules(risk_pb2.WatchRulesRequest()):
                    self._take(message)
                    delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                _log.warning("following risk's rules failed: %r; retrying", error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _take(self, message: risk_pb2.WatchRulesResponse) -> None:
        rules = self.rules
        if rules is not None and (message.unchanged or message.change_seq < rules.change_seq):
            # A heartbeat, or an older replica's set: risk is alive, keep ours.
            rules.received = time.monotonic()
            return
        self.rules = FollowedRules(message, self._catalog)
        self.ready.set()

    def age_s(self) -> float:
        """Seconds since risk last spoke on the stream (inf: it has not yet)."""
        rules = self.rules
        return float("inf") if rules is None else time.monotonic() - rules.received

    def heard_at(self) -> float:
        """The Unix time risk last spoke on the stream (0: it has not yet)."""
        age_s = self.age_s()
        return 0.0 if age_s == float("inf") else time.time() - age_s

    def current(self) -> FollowedRules:
        rules = self.rules
        if rules is None:
            raise Unavailable(
                "ORDER_RISK_RULES_STALE", "risk's rules have not arrived yet", retry_after_s=0.5
            )
        age_s = self.age_s()
        if age_s > self._stale_heartbeats * rules.heartbeat_s:
            raise Unavailable(
                "ORDER_RISK_RULES_STALE",
                f"risk's rules are stale (change {rules.change_seq}, no word from risk "
                f"for {age_s:.1f} s)",
                retry_after_s=0.5,
            )
        return rules

    # -- checks.Rules ----------------------------------------------------------

    @property
    def switches(self) -> KillSwitches:
        return self.current().switches

    def limits(self, account_id: str) -> Limits:
        return self.current().limits(account_id)

    def price(self, market: str) -> int | None:
        return self.current().price(market)


class RiskChecks:
    """The pre-trade check of one order (or amend), answered as risk would."""

    def __init__(
        self,
        follower: RulesFollower,
        limiter: RateLimiter,
        catalog: Catalog,
        *,
        enabled: bool = True,
        first_rules_s: float = 5.0,
    ) -> None:
        self._follower = follower
        self._checks = OrderChecks(follower, limiter, catalog)
        self._enabled = enabled
        self._first_rules_s = first_rules_s

    def open_order_limits(self, account_id: str, market: str) -> tuple[int, int]:
        """The account's open-order limits (all markets, `market`; 0: none). The writer
        enforces them: it counts working orders exactly, as of its own decision."""
        if not self._enabled:
            return 0, 0
        limits = self._follower.limits(account_id)
        return limits.max_open_orders, market_rule(limits, market).max_open_orders

    async def check(self, request: risk_pb2.CheckOrderRequest) -> Decimal | None:
        """None or the reference price; raises the denial (or ORDER_RISK_RULES_STALE)."""
        if not self._enabled:
            return None
        if self._follower.rules is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._follower.ready.wait(), self._first_rules_s)
        reply = await self._checks.check(request)
        if reply.rate_limit.limit:
            rate_usage_var.set((reply.rate_limit.limit, reply.rate_limit.used))
        if not reply.allowed:
            raise StatusError(reply.denial, "ORDER_RISK_DENIED")
        if reply.reference_price:
            with contextlib.suppress(ValueError):
                return parse_decimal(reply.reference_price)
        return None
