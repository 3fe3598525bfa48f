"""make bench-telemetry: what tracing and metrics cost on the order path, in one run.

For each tracing mode (off: the default, no SDK; on, sampling 100%; on,
sampling 1%) a fresh stack is started with that mode's OTEL_* environment,
exporting OTLP to a collector inside this process (it only counts spans), and
--clients closed-loop clients place resting limit buys through Envoy for
--seconds (after a warm-up). Reported per mode: orders/s, p50/p99 latency, the
stack's CPU per order (user+system time of every process of the stack over
the measured window: steadier than throughput on a shared machine) and spans
received per order. The modes run in turn, --rounds times, so that a change in
the machine's load hits all of them.

Metrics cannot be switched off (every service always serves them), so their
cost is measured directly: the RED bookkeeping the server interceptor does per
call (two counters and a histogram, as services/chassis/interceptors.py does),
timed in this process, times the server calls one order makes, against the CPU
an order costs the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter as CounterOf
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from bench.stats import percentile
from bench.trading_setup import Account, accounts, bearer, lift_limits, operator_token
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.collector import Collector, collector
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis import ErrorDetails

MODES: dict[str, dict[str, str]] = {
    "off": {"OTEL_TRACES_EXPORTER": "none"},
    "on, 100%": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "on, 1%": {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
    },
}
# Server calls per resting limit order: order's PlaceOrder, risk's CheckOrder and
# ledger's CreateTransfers (holds are batched: at most one per order). Match's
# commands ride a long-lived stream (one call for many orders).
SERVER_CALLS_PER_ORDER = 3


@dataclass
class Result:
    orders: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    spans: int = 0
    reasons: CounterOf[str] = field(default_factory=CounterOf)


def _cpu_seconds(stack: Stack) -> float:
    """User+system CPU of every process of the stack so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for wave in stack.started:
        for component in wave:
            if component.process is None:
                continue
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{component.process.pid}/stat").read_text().split(")")[-1]
                parts = fields.split()
                total += int(parts[11]) + int(parts[12])  # utime, stime
    return total / ticks


async def _client(
    stub: order_pb2_grpc.OrderServiceStub, account: Account, stop: float, result: Result | None
) -> None:
    metadata = bearer(account.token)
    while time.perf_counter() < stop:
        request = order_pb2.PlaceOrderRequest(
            client_order_id=uuid.uuid4().hex,
            market="BTC-USDT",
            side=t.SIDE_BUY,
            type=t.ORDER_TYPE_LIMIT,
            price="90",
            quantity="0.1",
        )
        began = time.perf_counter()
        try:
            await stub.PlaceOrder(request, metadata=metadata, timeout=20)
        except grpc.aio.AioRpcError as error:
            if result is not None:
                result.errors += 1
                result.reasons[ErrorDetails.from_rpc_error(error).reason or error.code().name] += 1
            continue
        if result is not None:
            result.orders += 1
            result.latencies.append(time.perf_counter() - began)


async def _load(
    channel: grpc.aio.Channel, users: list[Account], seconds: float, result: Result | None
) -> None:
    stub = order_pb2_grpc.OrderServiceStub(channel)
    stop = time.perf_counter() + seconds
    await asyncio.gather(*(_client(stub, u, stop, result) for u in users))


async def run_mode(
    name: str, env: dict[str, str], spans: Collector, args: argparse.Namespace
) -> Result:
    environment = embedded_env()
    environment.update(env, OTEL_EXPORTER_OTLP_ENDPOINT=spans.endpoint)
    stack = Stack(Path(tempfile.mkdtemp(prefix="cex-bench-otel-")), free_ports(), environment)
    await stack.start()
    try:
        svc = await operator_token(stack.edge, stack.service_secret)
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            await lift_limits(channel, svc)
            users = await accounts(channel, svc, args.clients, {"USDT": "100000000"})
            await _load(channel, users, args.warmup, None)
            await asyncio.sleep(1.0)  # let the warm-up's spans reach the collector
            idle_before, idle_began = _cpu_seconds(stack), time.perf_counter()
            await asyncio.sleep(args.idle)  # what the stack burns with no orders (polls, checks)
            idle_rate = (_cpu_seconds(stack) - idle_before) / (time.perf_counter() - idle_began)
            result = Result()
            spans_before, cpu_before = spans.received, _cpu_seconds(stack)
            began = time.perf_counter()
            await _load(channel, users, args.seconds, result)
            result.seconds = time.perf_counter() - began
            await asyncio.sleep(2.0)  # consumers and exporters finish the window's work
            window = time.perf_counter() - began
            result.cpu_s = _cpu_seconds(stack) - cpu_before - idle_rate * window
            result.spans = spans.received - spans_before
    finally:
        await stack.stop()
    return result


def metrics_cost_us(n: int = 200_000) -> float:
    """µs per server call of the interceptor's RED bookkeeping (started, handled, latency)."""
    registry = CollectorRegistry()
    labels = ("grpc_service", "grpc_method", "grpc_type")
    started = Counter("s", "s", labels, registry=registry)
    handled = Counter("h", "h", (*labels, "grpc_code"), registry=registry)
    latency = Histogram("l", "l", labels, registry=registry)
    values = ("cex.order.v1.OrderService", "PlaceOrder", "unary")
    began = time.process_time()  # CPU time: what the work costs, whatever the load
    for _ in range(n):
        t0 = time.perf_counter()
        started.labels(*values).inc()
        handled.labels(*values, "OK").inc()
        latency.labels(*values).observe(time.perf_counter() - t0)
    return (time.process_time() - began) / n * 1e6


async def main(args: argparse.Namespace) -> None:
    print(f"# bench-telemetry ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(
        f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {sys.version.split()[0]}; load average at start {os.getloadavg()[0]:.1f}; "
        f"{args.clients} closed-loop clients, {args.seconds:.0f} s per mode and round"
    )
    results: dict[str, list[Result]] = {name: [] for name in MODES}
    loads: list[float] = []
    async with collector(keep=False) as spans:
        for _ in range(args.rounds):
            for name, env in MODES.items():
                results[name].append(await run_mode(name, env, spans, args))
                loads.append(os.getloadavg()[0])
    print("\n| tracing | orders/s | p50 ms | p99 ms | stack CPU ms/order | spans/order |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        orders = sum(r.orders for r in runs)
        seconds = sum(r.seconds for r in runs)
        latencies = [x for r in runs for x in r.latencies]
        cpu = sum(r.cpu_s for r in runs)
        print(
            f"| {name} | {orders / seconds:.0f} | {percentile(latencies, 0.5) * 1e3:.1f} | "
            f"{percentile(latencies, 0.99) * 1e3:.1f} | {cpu / max(orders, 1) * 1e3:.2f} | "
            f"{sum(r.spans for r in runs) / max(orders, 1):.1f} |"
        )
        errors = sum(r.errors for r in runs)
        if errors:
            reasons: CounterOf[str] = CounterOf()
            for r in runs:
                reasons.update(r.reasons)
            print(f"<!-- {name}: {errors} failed calls: {dict(reasons)} -->")
    off = results["off"]
    cpu_per_order_us = sum(r.cpu_s for r in off) / max(sum(r.orders for r in off), 1) * 1e6
    cost = metrics_cost_us()
    print(
        f"\nmetrics: {cost:.1f} µs of RED bookkeeping per server call, "
        f"{SERVER_CALLS_PER_ORDER} server calls per order: {cost * SERVER_CALLS_PER_ORDER:.0f} µs "
        f"of the {cpu_per_order_us:.0f} µs of stack CPU an order costs with tracing off "
        f"({cost * SERVER_CALLS_PER_ORDER / cpu_per_order_us * 100:.1f}%)"
    )
    print(f"load average during the runs: {statistics.mean(loads):.1f} (mean after each mode)")


def _cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients (accounts)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--idle", type=float, default=3.0, help="s of idle CPU measured first")
    parser.add_argument("--rounds", type=int, default=1, help="times each mode runs, in turn")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_cli()))
