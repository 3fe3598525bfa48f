"""The order service's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from services.chassis.markets import DEFAULT_CATALOG, load_catalog
from services.chassis.settings import env_float, env_int, env_str

__all__ = ["OrderConfig"]


@dataclass(frozen=True, slots=True)
class OrderConfig:
    """
    maker_fee_rate / taker_fee_rate: the base tier's rates (decimal strings), from the
        market catalog's fee schedule (services/chassis/markets.py): what an order is
        priced at until the fee tiers followed from auth are loaded (ADR 0016), and
        always when order runs without auth (no mesh or service credential).
    auth_target: where the fee tiers are loaded from (ORDER_AUTH_TARGET; the mesh).
    market_protection: how far from the reference price a market order may trade
        (a fraction: "0.05" = 5%); it sets the protection price sent to match and
        so the hold of a market buy sized by quantity.
    risk_checks: run risk's order checks here, on the rules followed from risk (off
        only for tests of the order path alone).
    consumer_name: the durable name of this replica's match-event consumer: it
        builds the read model (orders, fills) with every other replica's, whichever
        stores an event first (idempotent under the market's cursor), and wakes this
        replica's sessions. One per replica (the chart: `order-state-<pod>`).
    consumer_inactive_s: JetStream deletes that consumer after this long unused
        (0: never), so a replica gone for good leaves nothing behind (the chart's
        pods have new names on every rollout).
    kill_switch_consumer: the durable name of the kill-switch consumer, shared by
        the replicas (each switch's sweep runs once).
    replica: this replica's name (the chart: the pod's); with a random incarnation
        it names the owner of the stream sessions this process holds.
    session_lease_s: how long this process's sessions stay its own without its
        renewing the lease (renewed every third of it); when it lapses, another
        replica claims them and cancels their cancel-on-disconnect orders.
    session_resume_s: how long a disconnected session can be resumed.
    session_reports_keep_s: how long a session's execution reports are kept for
        resuming.
    kill_switches: follow risk's kill-switch events and cancel what they ask to.
    wait_for_consumer_s: how long a read waits for the consumer to store what
        this process answered the caller before answering from what is stored.
    stream_queue: bounded queue per stream session; a reader this far behind is
        told (RESOURCE_EXHAUSTED ORDER_STREAM_SLOW_CONSUMER) and disconnected.
    mesh_target: where risk and match are called; default CEX_MESH_ADDR.
    match_target / risk_target: the hot path's peers called directly (the
        writer's command stream, the rules risk publishes), not through the
        local edge; default the mesh. `cex up` sets them to the services' own
        ports.
    """

    maker_fee_rate: str = format(DEFAULT_CATALOG.fees.maker_rate, "f")
    taker_fee_rate: str = format(DEFAULT_CATALOG.fees.taker_rate, "f")
    market_protection: Decimal = Decimal("0.05")
    risk_checks: bool = True
    consumer_name: str = "order-state"
    consumer_inactive_s: float = 0.0
    kill_switch_consumer: str = "order-state-kill-switches"
    replica: str = "order"
    session_lease_s: float = 10.0
    session_resume_s: float = 60.0
    session_reports_keep_s: float = 600.0
    kill_switches: bool = True
    wait_for_consumer_s: float = 2.0
    stream_queue: int = 10_000
    deadman_interval_s: float = 0.2
    mesh_target: str | None = None
    match_target: str | None = None
    auth_target: str | None = None  # where the fee tiers are loaded from (default: the mesh)
    risk_target: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrderConfig:
        env = os.environ if env is None else env
        return cls(
            maker_fee_rate=format(load_catalog(env).fees.maker_rate, "f"),
            taker_fee_rate=format(load_catalog(env).fees.taker_rate, "f"),
            market_protection=Decimal(env_str(env, "ORDER_MARKET_PROTECTION", "0.05") or "0.05"),
            risk_checks=env_str(env, "ORDER_RISK_CHECKS", "on") != "off",
            consumer_name=env_str(env, "ORDER_CONSUMER_NAME", "order-state") or "order-state",
            consumer_inactive_s=env_float(env, "ORDER_CONSUMER_INACTIVE_S", 0.0),
            kill_switch_consumer=env_str(
                env, "ORDER_KILL_SWITCH_CONSUMER", "order-state-kill-switches"
            )
            or "order-state-kill-switches",
            replica=env_str(env, "ORDER_REPLICA", "order") or "order",
            session_lease_s=env_float(env, "ORDER_SESSION_LEASE_S", 10.0),
            session_resume_s=env_float(env, "ORDER_SESSION_RESUME_S", 60.0),
            session_reports_keep_s=env_float(env, "ORDER_SESSION_REPORTS_KEEP_S", 600.0),
            kill_switches=env_str(env, "ORDER_KILL_SWITCHES", "on") != "off",
            wait_for_consumer_s=env_float(env, "ORDER_WAIT_FOR_CONSUMER_S", 2.0),
            stream_queue=env_int(env, "ORDER_STREAM_QUEUE", 10_000),
            deadman_interval_s=env_float(env, "ORDER_DEADMAN_INTERVAL_S", 0.2),
            mesh_target=env_str(env, "ORDER_MESH_TARGET"),
            match_target=env_str(env, "ORDER_MATCH_TARGET"),
            auth_target=env_str(env, "ORDER_AUTH_TARGET"),
            risk_target=env_str(env, "ORDER_RISK_TARGET"),
        )
