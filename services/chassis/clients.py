"""Channels to other services, through the mesh (Envoy locally, Istio in Kubernetes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from .interceptors import client_interceptors

__all__ = ["mesh_channel"]


@contextlib.asynccontextmanager
async def mesh_channel(
    target: str, *, max_message_bytes: int = 4 * 1024 * 1024
) -> AsyncIterator[grpc.aio.Channel]:
    """One long-lived channel; deadlines, request ids and traces flow through it."""
    channel = grpc.aio.insecure_channel(
        target,
        interceptors=client_interceptors(),
        options=(
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ),
    )
    try:
        yield channel
    finally:
        await channel.close()
