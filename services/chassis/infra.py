"""Open the infrastructure a service owns, tied to its server's lifetime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis.asyncio as redis
from nats.aio.client import Client as Nats

from .bus import nats_connection
from .cache import redis_connection
from .db import postgres
from .server import Server
from .settings import require

__all__ = ["Infrastructure", "connect"]


@dataclass(frozen=True, slots=True)
class Infrastructure:
    pool: asyncpg.Pool | None = None
    nats: Nats | None = None
    redis: redis.Redis | None = None


async def connect(
    server: Server,
    *,
    schema: str | None = None,
    migrations: Path | None = None,
    nats: bool = False,
    redis: bool = False,
    session_reset: bool = True,
) -> Infrastructure:
    """PostgreSQL (its schema migrated), NATS and Redis as asked; closed on stop.
    `session_reset=False`: see `postgres` (for services that keep no session state)."""
    s = server.settings
    pool = nats_client = redis_client = None
    if schema is not None:
        url = require(s.database_url, "DATABASE_URL")
        pool = await server.enter(
            postgres(url, schema=schema, migrations=migrations, session_reset=session_reset)
        )
    if nats:
        nats_client = await server.enter(
            nats_connection(require(s.nats_url, "NATS_URL"), name=s.service)
        )
    if redis:
        redis_client = await server.enter(redis_connection(require(s.redis_url, "REDIS_URL")))
    return Infrastructure(pool, nats_client, redis_client)
