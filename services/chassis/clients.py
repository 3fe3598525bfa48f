"""Channels to other services, through the mesh (Envoy locally, Istio in Kubernetes)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import grpc

from .authn import ServiceCredentials, service_auth_interceptors
from .interceptors import client_interceptors
from .settings import ChassisSettings

__all__ = ["mesh_channel", "service_credentials"]


@contextlib.asynccontextmanager
async def mesh_channel(
    target: str,
    *,
    max_message_bytes: int = 4 * 1024 * 1024,
    credentials: ServiceCredentials | None = None,
    authority: str | None = None,
    options: tuple[tuple[str, int | str], ...] = (),
    serving: str | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """One long-lived channel; deadlines, request ids and traces flow through it, and,
    given `credentials`, the service's token (plus the user's, when acting for one).
    `authority`: the service named to the mesh (its :authority), when `target` is
    the mesh rather than the service itself. `options`: more channel arguments.
    `serving`: the gRPC service called; a `target` that lists several addresses
    (`ipv4:127.0.0.1:50063,127.0.0.1:50093`) is then balanced round robin over
    those whose health says they serve it (a writer's standby does not)."""
    if serving and "," in target:
        options = (*options, ("grpc.service_config", _serving_config(serving)))
    interceptors: list[grpc.aio.ClientInterceptor] = client_interceptors()
    if credentials is not None:
        interceptors += service_auth_interceptors(credentials)
    channel = grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=(
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *((("grpc.default_authority", authority),) if authority else ()),
            *options,
        ),
    )
    try:
        yield channel
    finally:
        await channel.close()


def service_credentials(settings: ChassisSettings) -> ServiceCredentials | None:
    """This service's credential, issued by auth through the mesh; None without a secret."""
    if not settings.service_secret or not settings.mesh_addr:
        return None
    target = settings.mesh_addr

    async def issue(key_id: str, secret: str) -> tuple[str, float]:
        from cex.auth.v1 import auth_pb2, auth_pb2_grpc

        # A connection of its own: channels with the same target and arguments
        # share gRPC's global subchannels, and so their reconnect backoff. Calls
        # made before the edge was up (a service starts first) would otherwise
        # leave every later IssueToken of the process failing fast for seconds.
        async with grpc.aio.insecure_channel(
            target, options=(("grpc.use_local_subchannel_pool", 1),)
        ) as channel:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret), timeout=5
            )
        return reply.access_token, reply.expire_time.ToSeconds()

    return ServiceCredentials(settings.service, issue, settings.service_secret)


def _serving_config(service: str) -> str:
    """gRPC's client-side health checking (gRFC A17) under round robin."""
    health = {"serviceName": service}
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": health})
