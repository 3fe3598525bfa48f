"""`cex top`'s arithmetic: what it reads from an exposition and how it turns two
scrapes into rates and quantiles (as Prometheus' rate() and histogram_quantile())."""

from __future__ import annotations

import math

from cex_stack.top import Sample, parse, quantile, render, row


def _line(name: str, value: float, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {value}"


_GET = {"grpc_method": "Get", "grpc_service": "s", "grpc_type": "unary"}
_WATCH = {"grpc_method": "Watch", "grpc_service": "s", "grpc_type": "server_stream"}
_BUCKET = "grpc_server_handling_seconds_bucket"
EXPOSITION = "\n".join(
    [
        "# TYPE grpc_server_handled_total counter",
        _line("grpc_server_handled_total", 90, grpc_code="OK", **_GET),
        _line("grpc_server_handled_total", 6, grpc_code="INVALID_ARGUMENT", **_GET),
        _line("grpc_server_handled_total", 4, grpc_code="UNAVAILABLE", **_GET),
        "# TYPE grpc_server_handling_seconds histogram",
        _line(_BUCKET, 50, le="0.01", **_GET),
        _line(_BUCKET, 98, le="0.1", **_GET),
        _line(_BUCKET, 100, le="+Inf", **_GET),
        _line(_BUCKET, 0, le="0.01", **_WATCH),
        _line(_BUCKET, 7, le="+Inf", **_WATCH),
        "",
    ]
)


def test_parse_counts_calls_server_errors_and_unary_buckets() -> None:
    sample = parse(EXPOSITION, at=10.0)
    assert (sample.calls, sample.errors) == (100.0, 4.0)  # INVALID_ARGUMENT is the caller's
    assert sample.buckets == {0.01: 50.0, 0.1: 98.0, math.inf: 100.0}  # streams left out


def test_quantile_interpolates_within_the_bucket() -> None:
    buckets = {0.01: 50.0, 0.1: 98.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == 0.01
    assert math.isclose(quantile(0.75, buckets), 0.01 + 0.09 * 25 / 48)
    assert quantile(0.99, buckets) == 0.1  # in +Inf: the highest finite bound
    assert math.isnan(quantile(0.5, {}))
    assert math.isnan(quantile(0.5, {0.1: 0.0, math.inf: 0.0}))


def test_row_is_the_difference_between_two_scrapes() -> None:
    before = Sample(0.0, calls=100, errors=4, buckets={0.01: 50, 0.1: 98, math.inf: 100})
    after = Sample(2.0, calls=300, errors=14, buckets={0.01: 50, 0.1: 298, math.inf: 300})
    r = row("s", True, before, after)
    assert (r.rps, r.error_ratio) == (100.0, 0.05)
    assert 0.01 < r.p50_s < 0.1  # the interval's 200 calls all took 10-100 ms


def test_a_restarted_service_counts_from_zero() -> None:
    before = Sample(0.0, calls=1000, errors=0, buckets={0.01: 1000, math.inf: 1000})
    after = Sample(1.0, calls=10, errors=1, buckets={0.01: 10, math.inf: 10})
    r = row("s", False, before, after)
    assert (r.rps, r.error_ratio, r.healthy) == (10.0, 0.1, False)


def test_render_shows_every_row() -> None:
    rows = [
        row("auth", True, Sample(0.0), Sample(1.0)),
        row("ledger", False, Sample(0.0), Sample(1.0)),
    ]
    text = render(rows, 1.0)
    assert "auth" in text and "SERVING" in text and "DOWN" in text
    assert text.splitlines()[2].split()[-2:] == ["-", "-"]  # no calls: no latency
