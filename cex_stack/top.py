"""`cex top`: a live view of the local mesh for an SRE.

Every interval it scrapes each service's Prometheus endpoint (the chassis RED
metrics: `grpc_server_handled_total`, `grpc_server_handling_seconds`) and asks
its gRPC health, then shows per service: health, requests per second, the
share of calls that ended in a server-side error, and p50/p99 latency of unary
calls over the interval (streams live as long as their clients, so their
durations would only hide the calls'). Rates and quantiles come from the
difference between two scrapes, as Prometheus' `rate()` and
`histogram_quantile()` compute them.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from . import probes
from .topology import Ports, ServiceSpec

__all__ = ["Row", "Sample", "parse", "quantile", "render", "row", "watch"]

# Codes that mean the server failed, not that the caller asked for something wrong.
SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


@dataclass(frozen=True)
class Sample:
    """One scrape of one service: cumulative counters at `at` (monotonic seconds)."""

    at: float
    calls: float = 0.0
    errors: float = 0.0
    buckets: Mapping[float, float] = field(default_factory=dict)  # le -> cumulative, unary


@dataclass(frozen=True)
class Row:
    name: str
    healthy: bool
    rps: float
    error_ratio: float
    p50_s: float
    p99_s: float


def parse(text: str, at: float) -> Sample:
    """The RED figures of one Prometheus text exposition."""
    calls = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "grpc_server_handled_total":
                calls += s.value
                if s.labels.get("grpc_code") in SERVER_ERRORS:
                    errors += s.value
            elif (
                s.name == "grpc_server_handling_seconds_bucket"
                and s.labels.get("grpc_type") == "unary"
            ):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return Sample(at, calls, errors, buckets)


def quantile(q: float, buckets: Mapping[float, float]) -> float:
    """`histogram_quantile(q, ...)` over cumulative bucket counts (NaN when empty):
    linear within the bucket that holds the q-th call; the +Inf bucket answers with
    the highest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def row(name: str, healthy: bool, before: Sample, after: Sample) -> Row:
    """The figures over the interval between two scrapes (a restart resets counters:
    then the second scrape alone counts, as Prometheus' rate() treats a reset)."""
    span = max(after.at - before.at, 1e-9)
    reset = after.calls < before.calls
    base = Sample(before.at) if reset else before
    calls = after.calls - base.calls
    errors = after.errors - base.errors
    window = {le: n - base.buckets.get(le, 0.0) for le, n in after.buckets.items()}
    return Row(
        name,
        healthy,
        rps=calls / span,
        error_ratio=errors / calls if calls else 0.0,
        p50_s=quantile(0.5, window),
        p99_s=quantile(0.99, window),
    )


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def render(rows: Sequence[Row], interval_s: float) -> str:
    lines = [
        f"cex top: every {interval_s:g}s, unary latency in ms",
        f"{'service':<12} {'health':<9} {'rps':>9} {'errors':>8} {'p50':>8} {'p99':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.name:<12} {'SERVING' if r.healthy else 'DOWN':<9} {r.rps:>9.1f}"
            f" {r.error_ratio:>7.1%} {_ms(r.p50_s):>8} {_ms(r.p99_s):>8}"
        )
    return "\n".join(lines)


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


async def _samples(ports: Ports, services: Sequence[ServiceSpec]) -> dict[str, Sample]:
    texts = await asyncio.gather(
        *(
            asyncio.to_thread(_scrape, f"http://{ports.host}:{ports.metrics(s)}/metrics")
            for s in services
        )
    )
    now = time.monotonic()
    return {s.name: parse(t, now) for s, t in zip(services, texts, strict=True)}


async def _health(ports: Ports, services: Sequence[ServiceSpec]) -> dict[str, bool]:
    checks = await asyncio.gather(
        *(probes.grpc_health(f"{ports.host}:{ports.grpc(s)}", s.grpc_service) for s in services)
    )
    return {s.name: ok for s, ok in zip(services, checks, strict=True)}


async def watch(
    ports: Ports, services: Sequence[ServiceSpec], *, interval_s: float, rounds: int | None
) -> str:
    """Print a table every `interval_s` (clearing the terminal), `rounds` times or
    until interrupted; returns the last table."""
    before = await _samples(ports, services)
    table = ""
    done = 0
    while rounds is None or done < rounds:
        await asyncio.sleep(interval_s)
        after = await _samples(ports, services)
        health = await _health(ports, services)
        rows = [row(s.name, health[s.name], before[s.name], after[s.name]) for s in services]
        table = render(rows, interval_s)
        print(("\033[H\033[2J" if rounds is None else "") + table, flush=True)
        before = after
        done += 1
    return table
