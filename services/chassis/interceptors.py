"""Server and client interceptors shared by every service.

The server interceptor is the one place where a handler's outcome becomes a
gRPC status: `ExchangeError` -> status with ErrorInfo; a handler the service
does not implement yet -> UNIMPLEMENTED with ErrorInfo; a dependency that went
away under the handler (PostgreSQL or NATS: a lost or refused connection) ->
UNAVAILABLE `<SERVICE>_DATABASE_UNAVAILABLE` / `<SERVICE>_NATS_UNAVAILABLE`
(retryable; the pools and the NATS client reconnect by themselves); anything
else -> INTERNAL (a bug) with the traceback in the log, never in the reply. It also
records RED metrics, logs failures as JSON, and keeps the caller's deadline and
request id in context variables so that downstream calls inherit them.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import asyncpg
import grpc
import nats.errors
from grpc.aio import ClientCallDetails

from .authn import Authenticator, auth_context_var
from .errors import ExchangeError, Unavailable, status_metadata
from .telemetry import GRPC_HANDLED, GRPC_LATENCY, GRPC_STARTED, request_id_var, tracing_enabled

__all__ = [
    "ContextPropagationInterceptor",
    "ServerInterceptor",
    "client_interceptors",
    "deadline_var",
    "lost_dependency",
]

_log = logging.getLogger("cex.rpc")

# Absolute time.monotonic() by which the current inbound call must be answered.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# Checks the caller before the handler runs (raises ExchangeError to refuse);
# returns a check to repeat on each message of a client stream, if one applies.
_Recheck: TypeAlias = Callable[[], None]
_Guard: TypeAlias = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[_Recheck | None]]
_CLIENT_STREAMS = ("client_stream", "bidi_stream")


async def _rechecked(requests: AsyncIterator[Any], recheck: _Recheck) -> AsyncIterator[Any]:
    """A client stream's messages, each let through only if the caller still may
    (a frozen account's next message ends the stream with the refusal)."""
    async for message in requests:
        recheck()
        yield message


# Exceptions that mean PostgreSQL or NATS is away (restarting, unreachable), not a bug.
_DATABASE_LOST = (
    asyncpg.PostgresConnectionError,  # the connection failed or closed mid-operation
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, not accepting yet
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections while it restarts
    # asyncpg's protocol state after a connection broke mid-operation ("cannot
    # switch to state ...; another operation is in progress"): the pool drops it.
    asyncpg.exceptions.InternalClientError,
    OSError,  # refused, reset or timed out (connect, socket)
)
_NATS_LOST = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.TimeoutError,
)


def lost_dependency(error: BaseException, prefix: str) -> ExchangeError | None:
    """UNAVAILABLE with a reason when `error` means PostgreSQL or NATS is away;
    None for anything else. `asyncpg.InterfaceError` counts only for a closed
    connection or pool (its other uses are bugs)."""
    if isinstance(error, _DATABASE_LOST) or (
        isinstance(error, asyncpg.InterfaceError) and "clos" in str(error)
    ):
        return Unavailable(f"{prefix}_DATABASE_UNAVAILABLE", "the database is unavailable; retry")
    if isinstance(error, _NATS_LOST):
        return Unavailable(f"{prefix}_NATS_UNAVAILABLE", "the event bus is unavailable; retry")
    return None


deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "deadline", default=None
)


def _metadata_value(metadata: Any, key: str) -> str:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class _Call:
    """The bookkeeping of one inbound RPC: outcome, metrics and log line.

    The frame both handler wrappers run in (`async with _Call(...)`): it sets
    the call's context variables on entry; on exit an `ExchangeError` or any
    other exception (not an abort already made, nor a cancellation) becomes the
    call's status, and the metrics and log line are written whatever happened.
    """

    __slots__ = ("context", "domain", "kind", "labels", "method", "start")

    def __init__(
        self, full_method: str, kind: str, domain: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        service, _, method = full_method.lstrip("/").partition("/")  # "/pkg.Service/Method"
        self.method = full_method
        self.kind = kind
        self.domain = domain
        self.context = context
        self.labels = (service, method, kind)
        self.start = time.perf_counter()
        GRPC_STARTED.labels(*self.labels).inc()

    async def __aenter__(self) -> _Call:
        context = self.context
        metadata = context.invocation_metadata()
        request_id_var.set(_metadata_value(metadata, "x-request-id"))
        remaining = context.time_remaining()
        deadline_var.set(None if remaining is None else time.monotonic() + remaining)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        # Cancellation and a closed stream (BaseException) are no failure of the
        # handler: they pass through, counted with the context's code.
        error = exc if isinstance(exc, Exception) else None
        try:
            if error is not None and not isinstance(error, grpc.aio.AbortError):
                await self.fail(self.context, error)
        finally:
            self.finish(self.context, error)

    async def fail(
        self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException
    ) -> NoReturn:
        """Answer with the error model; raises AbortError like context.abort does."""
        if not isinstance(error, ExchangeError):
            error = self._classify(error)
        status = error.to_status(self.domain)
        await context.abort(error.code, error.message, trailing_metadata=status_metadata(status))

    def _classify(self, error: BaseException) -> ExchangeError:
        prefix = self.domain.upper()
        if isinstance(error, NotImplementedError):
            return ExchangeError(
                f"{prefix}_UNIMPLEMENTED",
                f"{self.method} is not implemented yet",
                code=grpc.StatusCode.UNIMPLEMENTED,
            )
        if (lost := lost_dependency(error, prefix)) is not None:
            _log.warning("%s in %s: %r", lost.reason, self.method, error)
            return lost
        _log.error("unhandled error in %s", self.method, exc_info=error)
        return ExchangeError(f"{prefix}_INTERNAL", "internal error", code=grpc.StatusCode.INTERNAL)

    def finish(
        self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
    ) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        if isinstance(code, int):
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        elapsed = time.perf_counter() - self.start
        GRPC_HANDLED.labels(*self.labels, code.name).inc()
        GRPC_LATENCY.labels(*self.labels).observe(elapsed)
        level = logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.ERROR
        if _log.isEnabledFor(level):
            _log.log(
                level,
                "rpc %s %s",
                self.method,
                code.name,
                extra={
                    "fields": {
                        "grpc_method": self.method,
                        "grpc_code": code.name,
                        "duration_ms": round(elapsed * 1000, 3),
                        "peer": context.peer(),
                    }
                },
            )


async def _invoke(
    behavior: Callable[..., Any],
    request: Any,
    context: grpc.aio.ServicerContext[Any, Any],
    kind: str,
    guard: _Guard | None,
) -> Any:
    """Checks the caller, then calls the service's handler: its reply, or the
    response iterator of a streaming one."""
    recheck = await guard(context) if guard is not None else None
    if recheck is not None and kind in _CLIENT_STREAMS:
        request = _rechecked(request, recheck)
    result = behavior(request, context)
    return await result if inspect.isawaitable(result) else result


def _wrap_unary_response(
    behavior: Callable[..., Any], kind: str, method: str, domain: str, guard: _Guard | None
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _Call(method, kind, domain, context):
            return await _invoke(behavior, request, context, kind, guard)

    return handler


def _wrap_stream_response(
    behavior: Callable[..., Any], kind: str, method: str, domain: str, guard: _Guard | None
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async with _Call(method, kind, domain, context):
            result = await _invoke(behavior, request, context, kind, guard)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif result is not None:
                for item in result:
                    yield item

    return handler


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Errors, metrics, logs and context for every inbound call, and the caller's
    authentication for the services that declared a policy (see authn.py)."""

    def __init__(self, domain: str, authenticator: Authenticator | None = None) -> None:
        self.domain = domain
        self.authenticator = authenticator

    def _guard(self, method: str) -> _Guard | None:
        authenticator = self.authenticator
        if authenticator is None or not authenticator.guards(method):
            return None

        async def guard(context: grpc.aio.ServicerContext[Any, Any]) -> _Recheck | None:
            ctx = await authenticator.check(method, context.invocation_metadata())
            auth_context_var.set(ctx)
            if ctx is None or not ctx.writes or authenticator.account_states is None:
                return None
            return lambda: authenticator.still_allowed(ctx)

        return guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guard = self._guard(method)
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(handler.unary_unary, "unary", method, self.domain, guard),
                **codec,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(
                    handler.stream_unary, "client_stream", method, self.domain, guard
                ),
                **codec,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(
                    handler.unary_stream, "server_stream", method, self.domain, guard
                ),
                **codec,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, "bidi_stream", method, self.domain, guard),
            **codec,
        )


class ContextPropagationInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Passes the inbound call's deadline and request id on to downstream calls.

    A downstream call gets the shorter of its own timeout and what is left of
    the inbound deadline, so no hop keeps working for a caller that gave up.
    """

    def _details(self, details: ClientCallDetails) -> ClientCallDetails:
        timeout = details.timeout
        deadline = deadline_var.get()
        if deadline is not None:
            remaining = max(deadline - time.monotonic(), 0.001)
            timeout = remaining if timeout is None else min(timeout, remaining)
        metadata = details.metadata
        request_id = request_id_var.get()
        if request_id:
            metadata = grpc.aio.Metadata(*(metadata or ()))
            if not metadata.get_all("x-request-id"):
                metadata.add("x-request-id", request_id)
        return ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for channels to other services: tracing (a client span per call,
    its traceparent in the metadata) when tracing is on, then context."""
    if not tracing_enabled():
        return [ContextPropagationInterceptor()]
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    tracing = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return [*tracing, ContextPropagationInterceptor()]
