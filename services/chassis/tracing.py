"""Trace context across the hops gRPC interceptors do not see: JetStream
messages, batches and work that outlives its request (commands journaled by
match, sagas).

W3C trace context (`traceparent`, `tracestate`) travels as NATS message
headers and as string maps in stored rows. A batch of work done for many
traces (a ledger hold batch, a fetch of JetStream messages) gets one span that
is the child of the first traced item and links to the others, as the
OpenTelemetry messaging conventions describe for batch receive.

With tracing off (no SDK tracer provider) every helper here is a cheap no-op:
nothing is injected, and spans are non-recording.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, Span, SpanKind

__all__ = [
    "Context",
    "SpanKind",
    "batch_span",
    "carrier",
    "context_of",
    "current_context",
    "message_context",
    "tracer",
]


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_context() -> Context:
    """The active context, to carry into work done later or elsewhere (a batch)."""
    return otel_context.get_current()


def carrier(into: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The active span's W3C trace context as string pairs (empty when not traced)."""
    out: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        inject(out)
    if into is not None:
        into.update(out)
    return out


def context_of(pairs: Mapping[str, str] | None) -> Context | None:
    """The context a carrier holds (None if it holds none)."""
    if not pairs or "traceparent" not in pairs:
        return None
    return extract(pairs)


def message_context(message: Any) -> Context | None:
    """The trace context in a NATS message's headers (None if it has none)."""
    headers = getattr(message, "headers", None)
    return context_of(headers) if headers else None


@contextlib.contextmanager
def batch_span(
    name: str,
    contexts: Iterable[Context | None],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int] | None = None,
    tracer_name: str = "cex",
    provider: trace.TracerProvider | None = None,
) -> Iterator[Span]:
    """A span for work done for many items: the child of the first item's trace
    (the first sampled one), linked to every other distinct span among them, and
    the active span inside.
    Without any traced item there is no span (an invalid one is active)."""
    parent: Context | None = None
    found: list[tuple[Context, trace.SpanContext]] = []
    seen: set[tuple[int, int]] = set()
    for ctx in contexts:
        if ctx is None:
            continue
        span_context = trace.get_current_span(ctx).get_span_context()
        if not span_context.is_valid:
            continue
        key = (span_context.trace_id, span_context.span_id)
        if key in seen:
            continue
        seen.add(key)
        found.append((ctx, span_context))
        if parent is None and span_context.trace_flags.sampled:
            parent = ctx  # a sampled trace gets the child (not one sampled out)
    if parent is None and found:
        parent = found[0][0]
    links = [Link(sc) for ctx, sc in found if ctx is not parent]
    if parent is None:  # nothing traced in the batch: no span (and no stray root traces)
        with trace.use_span(trace.INVALID_SPAN, end_on_exit=False):
            yield trace.INVALID_SPAN
        return
    span = trace.get_tracer(tracer_name, tracer_provider=provider).start_span(
        name,
        context=parent,
        kind=kind,
        links=links,
        attributes={**(attributes or {}), "cex.batch.traces": len(seen)},
    )
    with trace.use_span(span, end_on_exit=True):
        yield span
