"""Structured JSON logs, Prometheus RED metrics and OpenTelemetry tracing."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "GRPC_HANDLED",
    "GRPC_LATENCY",
    "GRPC_STARTED",
    "JETSTREAM_PENDING",
    "JETSTREAM_REDELIVERED",
    "JETSTREAM_UNDECODABLE",
    "JWKS_FETCH_FAILURES",
    "JsonFormatter",
    "configure_logging",
    "configure_tracing",
    "metrics_registry",
    "request_id_var",
    "tracing_enabled",
]


def metrics_registry(given: CollectorRegistry | None, metrics_port: int) -> CollectorRegistry:
    """Where a service's own metrics go: `given` (tests), else the process's
    registry when it serves them on `metrics_port`, else a private one (so that
    servers built side by side in one process do not register a metric twice)."""
    if given is not None:
        return given
    return REGISTRY if metrics_port else CollectorRegistry()


request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Named as go-grpc-prometheus names them, so existing dashboards and alerts fit.
_LABELS = ("grpc_service", "grpc_method", "grpc_type")
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server.", (*_LABELS, "grpc_code")
)
GRPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end, on the server.",
    _LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Token verification keys (auth's JWKS) that could not be fetched (services/chassis/tokens.py).
JWKS_FETCH_FAILURES = Counter(
    "authn_jwks_fetch_failures_total", "Failed fetches of auth's JWKS (token verification keys)."
)
# JetStream durable consumers, from the metadata of the messages they fetch (bus.py).
JETSTREAM_PENDING = Gauge(
    "jetstream_consumer_pending",
    "Messages the consumer has not received yet (num_pending of its last fetched message).",
    ("stream", "consumer"),
)
JETSTREAM_REDELIVERED = Counter(
    "jetstream_consumer_redelivered_total",
    "Messages received again (delivery count above 1): a consumer failing or too slow to ack.",
    ("stream", "consumer"),
)
JETSTREAM_UNDECODABLE = Counter(
    "jetstream_consumer_undecodable_total",
    "Messages the consumer could not decode: logged, acked and skipped (PullConsumer).",
    ("stream", "consumer"),
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the trace, span and request ids when there are any."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Called once by a process's entry point, never at import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler(env: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, read from `env` (the SDK reads
    os.environ only); parentbased_always_on by default, as the specification says."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in _SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r} is not supported")
    if name.endswith("always_on"):
        root: Sampler = ALWAYS_ON
    elif name.endswith("always_off"):
        root = ALWAYS_OFF
    else:
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(raw)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number, got {raw!r}") from None
        root = TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def tracing_enabled() -> bool:
    """Whether an SDK tracer provider is installed (configure_tracing chose an exporter)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def configure_tracing(service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider chosen by the standard OTEL_* variables; None when tracing is off.

    OTEL_TRACES_EXPORTER: `none` (the default: tracing off, the API's no-op tracer,
    nothing is created or propagated), `console` (spans as JSON on stderr), or `otlp`
    (OTLP/gRPC to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT,
    batched as OTEL_BSP_* say). OTEL_SDK_DISABLED=true turns tracing off whatever
    the exporter. OTEL_TRACES_SAMPLER(_ARG) sample, OTEL_SERVICE_NAME names the service
    (default `cex-<service>`), OTEL_RESOURCE_ATTRIBUTES adds to the resource.
    """
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if exporter_name not in ("none", "console", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported")
    if exporter_name == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    attributes = {"service.name": env.get("OTEL_SERVICE_NAME", f"cex-{service}")}
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_sampler(env))
    if exporter_name == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    return provider
