"""batch_span: work done for many traced items is the child of one (a sampled one) and
links to the others; nothing traced, no span."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.chassis.tracing import Context, batch_span, context_of, message_context


def _remote(trace_id: int, span_id: int, sampled: bool) -> Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return trace.set_span_in_context(
        NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags))
    )


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # parentbased_always_on
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_the_batch_is_the_child_of_the_first_sampled_item_and_links_the_rest() -> None:
    provider, exporter = _provider()
    unsampled, first, other = _remote(1, 11, False), _remote(2, 22, True), _remote(3, 33, True)
    items = [None, unsampled, first, first, other]
    with batch_span("settle", items, provider=provider) as span:
        assert trace.get_current_span() is span
    [done] = exporter.get_finished_spans()
    assert done.parent is not None
    assert (done.context.trace_id, done.parent.span_id) == (2, 22)
    assert sorted(link.context.span_id for link in done.links) == [11, 33]
    assert done.attributes is not None and done.attributes["cex.batch.traces"] == 3


def test_a_batch_of_sampled_out_items_is_sampled_out() -> None:
    provider, exporter = _provider()
    with batch_span("settle", [_remote(1, 11, False)], provider=provider) as span:
        assert span.get_span_context().trace_id == 1
        assert not span.is_recording()
    assert exporter.get_finished_spans() == ()


def test_nothing_traced_makes_no_span() -> None:
    provider, exporter = _provider()
    with batch_span("settle", [None, Context()], provider=provider) as span:
        assert span is trace.INVALID_SPAN
    assert exporter.get_finished_spans() == ()


def test_trace_context_is_read_from_headers_only_when_there_is_one() -> None:
    class Message:
        headers: dict[str, str] | None = None

    message = Message()
    assert message_context(message) is None
    message.headers = {"Nats-Msg-Id": "BTC-USDT:1"}
    assert message_context(message) is None
    message.headers["traceparent"] = f"00-{'ab' * 16}-{'cd' * 8}-01"
    found = message_context(message)
    assert found is not None
    span_context = trace.get_current_span(found).get_span_context()
    assert (format(span_context.trace_id, "032x"), span_context.trace_flags.sampled) == (
        "ab" * 16,
        True,
    )
    assert context_of({}) is None
