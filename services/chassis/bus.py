"""NATS / JetStream connections.

JetStream carries events for fan-out; it is never the only copy of anything
that moves money (see ARCHITECTURE.md), so streams here are conveniences that
consumers may lose and rebuild from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from .telemetry import JETSTREAM_PENDING, JETSTREAM_REDELIVERED

__all__ = ["ensure_stream", "nats_connection", "observe_fetch"]

_log = logging.getLogger("cex.bus")


@contextlib.asynccontextmanager
async def nats_connection(url: str, *, name: str) -> AsyncIterator[Client]:
    async def on_error(error: Exception) -> None:
        _log.warning("nats error: %s", error)

    client = await nats.connect(
        url,
        name=f"cex-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )
    try:
        yield client
    finally:
        await client.drain()


def observe_fetch(stream: str, consumer: str, messages: Sequence[Msg]) -> None:
    """Consumer lag and redeliveries from a fetched batch's own metadata (no extra
    round trip): jetstream_consumer_pending, jetstream_consumer_redelivered_total."""
    if not messages:
        return
    redelivered = sum(1 for m in messages if m.metadata.num_delivered > 1)
    if redelivered:
        JETSTREAM_REDELIVERED.labels(stream, consumer).inc(redelivered)
    JETSTREAM_PENDING.labels(stream, consumer).set(messages[-1].metadata.num_pending or 0)


async def ensure_stream(
    js: JetStreamContext, name: str, subjects: list[str], *, max_age_s: float | None = None
) -> None:
    """Create the stream, or update it to this configuration (idempotent)."""
    config = StreamConfig(
        name=name,
        subjects=subjects,
        storage=StorageType.FILE,
        max_age=max_age_s,
        duplicate_window=120.0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)
