"""The grpc.aio server every service runs on.

`Server` gives each service the same shell: health (grpc.health.v1) per
service, server reflection (v1 and v1alpha), keepalive and message-size limits,
the shared interceptors, a Prometheus endpoint, and a graceful shutdown that
first reports NOT_SERVING, then stops with a grace period, then closes the
resources (pools, connections) the service opened through `enter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, TypeVar

import grpc
import uvloop
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import start_http_server

from cex.auth.v1 import auth_pb2, auth_pb2_grpc

from .account_states import AccountStates, push_from_nats
from .authn import Authenticator, Policy, Rule
from .clients import mesh_channel, service_credentials
from .interceptors import ServerInterceptor
from .settings import ChassisSettings, require
from .telemetry import configure_logging, configure_tracing, tracing_enabled
from .tokens import JwksCache, KeySource

__all__ = ["Server", "background", "poll_until_cancelled", "run"]

_log = logging.getLogger("cex.server")
T = TypeVar("T")

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

# The frozen-accounts follower's channel to auth: its own connections, retried at
# least every 2 s (a service starts before the edge it reloads through).
_FOLLOWER_CHANNEL: tuple[tuple[str, int | str], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _reflection_v1(servicer: Any) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1 is wire-identical to v1alpha; serve both from one servicer."""
    return grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """A task that lives as long as the context (`await server.enter(background(...))`):
    cancelled and awaited when the server stops."""
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    task.set_name(name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def poll_until_cancelled(
    step: Callable[[], Awaitable[object]],
    every_s: float,
    *,
    log: logging.Logger,
    failed: str,
    level: int = logging.WARNING,
    drain: bool = True,
) -> NoReturn:
    """A background loop's body: `step`, then again after `every_s`, until the
    task is cancelled (cancellation is no Exception: it passes through).

    With `drain`, a true result (work done: more may be waiting) runs `step`
    again at once. A failure is logged (`failed`, at `level`, with the traceback)
    and retried after `every_s`: a dependency that is away comes back."""
    while True:
        try:
            if await step() and drain:
                continue
        except Exception:
            log.log(level, failed, exc_info=True)
        await asyncio.sleep(every_s)


class _MethodAwarePool:
    """protobuf's Python pool finds services but not their methods; grpcurl asks for both."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service)  # KeyError if not a service either
            if method not in found.methods_by_name:
                raise
            return found.file


class Server:
    def __init__(
        self,
        settings: ChassisSettings,
        *,
        keys: KeySource | None = None,
        account_states: AccountStates | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys  # token verification keys; default: auth's JWKS (CEX_JWKS_URL)
        # The frozen accounts the authenticator refuses; default: followed from auth
        # through the mesh (account_states.py), when the settings name the mesh and
        # the service secret. None: nobody is refused for a freeze.
        self.account_states = account_states
        self._policies: list[Policy] = []
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._services: list[tuple[str, Callable[[Any, grpc.aio.Server], None], Any]] = []
        self._resources = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._metrics: Any = None
        self._reflected: list[str] = []
        self._not_serving: set[str] = set()  # served, but not ready for calls

    @property
    def service_names(self) -> list[str]:
        return [name for name, _, _ in self._services]

    def add(
        self,
        service: ServiceDescriptor,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
        servicer: Any,
        *,
        policy: Mapping[str, Rule] | None = None,
    ) -> None:
        """Serve `servicer`. With a `policy` (method -> Rule), every call is authenticated
        and authorized first, and methods the policy does not name are denied."""
        if policy is not None:
            self._policies.append(Policy.of(service, policy))
        self._services.append((service.full_name, add_to_server, servicer))

    def authenticator(self) -> Authenticator | None:
        if not self._policies:
            return None
        keys = self.keys or JwksCache(require(self.settings.jwks_url, "CEX_JWKS_URL"))
        return Authenticator(self._policies, keys, account_states=self.account_states)

    def follow_account_states(self) -> AccountStates | None:
        """The copy of auth's frozen accounts this service refuses (the same object
        for the authenticator and for any handler or saga that asks), followed from
        the server's start. Made on first ask from auth's GetFrozenAccounts through
        the mesh with the service's credential; None without them."""
        if self.account_states is None:
            credentials = service_credentials(self.settings)
            target = self.settings.mesh_addr
            if credentials is None or target is None:
                return None
            channel: list[grpc.aio.Channel] = []

            async def load() -> auth_pb2.GetFrozenAccountsResponse:
                if not channel:
                    channel.append(
                        await self.enter(
                            mesh_channel(target, credentials=credentials, options=_FOLLOWER_CHANNEL)
                        )
                    )
                stub = auth_pb2_grpc.AuthServiceStub(channel[0])
                reply: auth_pb2.GetFrozenAccountsResponse = await stub.GetFrozenAccounts(
                    auth_pb2.GetFrozenAccountsRequest(), timeout=5.0
                )
                return reply

            self.account_states = AccountStates(
                load, reload_s=self.settings.account_states_reload_s
            )
        return self.account_states

    async def _follow_account_states(self) -> None:
        states = self.follow_account_states() if self._policies else None
        if states is None:
            return
        s = self.settings
        push = (
            push_from_nats(states, s.nats_url, name=f"{s.service}-accounts") if s.nats_url else None
        )
        await self.enter(background(states.run(push), f"{s.service}-account-states"))

    def reflect(self, full_names: Sequence[str]) -> None:
        """List services in reflection that this process does not serve itself (the catalog)."""
        self._reflected.extend(full_names)

    async def enter(self, resource: AbstractAsyncContextManager[T]) -> T:
        """Open a resource now; it is closed when the server stops, in reverse order."""
        return await self._resources.enter_async_context(resource)

    async def set_serving(self, name: str, serving: bool) -> None:
        """Whether a service of this process takes calls (its health, which balancers
        and readiness probes follow; the process itself stays SERVING): e.g. a
        standby serves its service NOT_SERVING until it takes over."""
        (self._not_serving.discard if serving else self._not_serving.add)(name)
        if self._server is not None:
            status = health_pb2.HealthCheckResponse
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._resources.push_async_callback(callback)

    def _options(self) -> Sequence[tuple[str, int]]:
        s = self.settings
        return (
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", s.keepalive_time_s * 1000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
        )

    async def start(self) -> int:
        s = self.settings
        await self._follow_account_states()
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ServerInterceptor(s.service, self.authenticator())
        ]
        if tracing_enabled():  # a server span per call, child of the caller's traceparent
            interceptors.insert(0, aio_server_interceptor())  # type: ignore[no-untyped-call]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=self._options(),
            maximum_concurrent_rpcs=None,
        )
        for _, add_to_server, servicer in self._services:
            add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            *self.service_names,
            *self._reflected,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
            REFLECTION_V1,
        ]
        reflector = reflection.aio.ReflectionServicer(
            names, pool=_MethodAwarePool(descriptor_pool.Default())
        )
        server.add_generic_rpc_handlers((_reflection_v1(reflector),))
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
        self.port = server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.port == 0:
            raise RuntimeError(f"{s.service}: cannot bind {s.host}:{s.grpc_port}")
        await server.start()
        self._server = server
        if s.metrics_port:
            self._metrics, _ = start_http_server(s.metrics_port, addr=s.host)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self.service_names:
            await self.set_serving(name, name not in self._not_serving)
        _log.info(
            "serving",
            extra={"fields": {"port": self.port, "services": self.service_names}},
        )
        return self.port

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first (so balancers drain), then stop with grace, then close."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._metrics is not None:
            self._metrics.shutdown()
        await self._resources.aclose()
        _log.info("stopped")


async def _serve(build: Callable[[], Awaitable[Server]]) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    server = await build()
    await server.start()
    await stopping.wait()
    _log.info("shutting down")
    await server.stop()


def run(service: str, build: Callable[[ChassisSettings], Awaitable[Server]]) -> None:
    """A service's entry point: settings, logs, traces; serve until SIGTERM/SIGINT.

    On uvloop's event loop: measured on the trading path, about a sixth less CPU
    per order than asyncio's loop in every service (docs/benchmarks.md)."""
    settings = ChassisSettings.from_env(service)
    configure_logging(settings.service, settings.log_level)
    configure_tracing(settings.service)  # the SDK flushes its spans at exit
    uvloop.run(_serve(lambda: build(settings)))
