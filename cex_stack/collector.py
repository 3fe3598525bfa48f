"""A minimal OTLP/gRPC trace receiver (opentelemetry.proto.collector.trace.v1.TraceService),
for `cex traces`, tests and benchmarks: the spans the stack exports, without running an
OpenTelemetry Collector (`OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["Collector", "SpanRecord", "collector", "render_trace"]


@dataclass(frozen=True, slots=True)
class SpanRecord:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    start_ns: int = 0
    end_ns: int = 0


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
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                    )
                    for span in scope.spans
                )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return [s for s in self.spans if s.trace_id == trace_id]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def render_trace(spans: list[SpanRecord]) -> str:
    """One trace as an indented tree: offset and duration (ms), service, span name.
    Spans whose parent did not arrive are shown as roots, marked `(orphan)`."""
    if not spans:
        return ""
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    for span in spans:
        children.setdefault(span.parent_id if span.parent_id in ids else "", []).append(span)
    began = min(s.start_ns for s in spans)
    lines = [f"trace {spans[0].trace_id} ({len(spans)} spans)"]

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            orphan = " (orphan)" if depth == 0 and span.parent_id else ""
            offset, took = (span.start_ns - began) / 1e6, (span.end_ns - span.start_ns) / 1e6
            lines.append(
                f"{offset:9.1f} {took:8.1f} ms  {'  ' * depth}{span.service}: {span.name}{orphan}"
            )
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def collector(*, keep: bool = True, listen: str = "127.0.0.1:0") -> AsyncIterator[Collector]:
    """A collector listening on `listen` (a free local port by default) while the context lasts."""
    server = grpc.aio.server()
    found = Collector(keep=keep)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    found.port = server.add_insecure_port(listen)
    await server.start()
    try:
        yield found
    finally:
        await server.stop(0)
