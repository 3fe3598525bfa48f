"""The market data service's own settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.chassis.settings import env_float, env_int, env_str

__all__ = ["MarketDataSettings"]


@dataclass(frozen=True, slots=True)
class MarketDataSettings:
    """
    markets: the markets served (empty: every market in the catalog)
    match_target: where GetOrderBook/ReplayEvents go; default the mesh (CEX_MESH_ADDR)
    max_depth: the deepest book a client may ask for (levels per side)
    nats_depth: depth of the deltas and snapshots published on md.<market>.book
    nats_snapshot_s: how often a snapshot is published on md.<market>.book
    subscriber_max_levels: conflated levels a slow book subscriber may owe before it is
        resynced with a fresh snapshot instead
    subscriber_max_lag: events a slow book subscriber may fall behind before the same
    trades_queue: trade batches a StreamTrades subscriber may owe before it is dropped
    heartbeat_s: a quiet book stream still gets an (empty) delta this often when seq moved
    idle_check_s: with no event for this long, ask match whether events were missed
    ticker_interval_s: tickers are published at most this often per market
    redis_interval_s: how often the book snapshot and ticker are written to Redis
    """

    markets: tuple[str, ...] = ()
    match_target: str | None = None
    max_depth: int = 1000
    nats_depth: int = 100
    nats_snapshot_s: float = 5.0
    subscriber_max_levels: int = 4000
    subscriber_max_lag: int = 100_000
    trades_queue: int = 1000
    heartbeat_s: float = 1.0
    idle_check_s: float = 5.0
    ticker_interval_s: float = 1.0
    redis_interval_s: float = 0.25
    max_batch: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MarketDataSettings:
        env = os.environ if env is None else env
        markets = env_str(env, "MARKETDATA_MARKETS", "") or ""
        d = cls()
        return cls(
            markets=tuple(m.strip() for m in markets.split(",") if m.strip()),
            match_target=env_str(env, "MARKETDATA_MATCH_TARGET"),
            max_depth=env_int(env, "MARKETDATA_MAX_DEPTH", d.max_depth),
            nats_depth=env_int(env, "MARKETDATA_NATS_DEPTH", d.nats_depth),
            nats_snapshot_s=env_float(env, "MARKETDATA_NATS_SNAPSHOT_S", d.nats_snapshot_s),
            subscriber_max_levels=env_int(
                env, "MARKETDATA_SUBSCRIBER_MAX_LEVELS", d.subscriber_max_levels
            ),
            subscriber_max_lag=env_int(env, "MARKETDATA_SUBSCRIBER_MAX_LAG", d.subscriber_max_lag),
            trades_queue=env_int(env, "MARKETDATA_TRADES_QUEUE", d.trades_queue),
            heartbeat_s=env_float(env, "MARKETDATA_HEARTBEAT_S", d.heartbeat_s),
            idle_check_s=env_float(env, "MARKETDATA_IDLE_CHECK_S", d.idle_check_s),
            ticker_interval_s=env_float(env, "MARKETDATA_TICKER_INTERVAL_S", d.ticker_interval_s),
            redis_interval_s=env_float(env, "MARKETDATA_REDIS_INTERVAL_S", d.redis_interval_s),
            max_batch=env_int(env, "MARKETDATA_MAX_BATCH", d.max_batch),
        )
