"""A minimal OTLP/gRPC trace receiver (opentelemetry.proto.collector.trace.v1.TraceService),
for tests and benchmarks that need the spans the stack exports without running an
OpenTelemetry Collector: `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["Collector", "SpanRecord", "collector"]


@dataclass(frozen=True, slots=True)
class SpanRecord:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it receives (or only counts them: `keep=False`)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[SpanRecord] = []
        self.received = 0
        self.port = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "?",
            )
            for scope in resource_spans.scope_spans:
                self.received += len(scope.spans)
                if not self.keep:
                    continue
                self.spans.extend(
                    SpanRecord(
                        service,
                        span.name,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        span.kind,
                    )
                    for span in scope.spans
                )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return [s for s in self.spans if s.trace_id == trace_id]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def collector(*, keep: bool = True) -> AsyncIterator[Collector]:
    """A collector listening on a free local port while the context lasts."""
    server = grpc.aio.server()
    found = Collector(keep=keep)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    found.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield found
    finally:
        await server.stop(0)
