"""make bench-stack: how fast the local exchange starts, and what the mesh hop costs.

1. Cold start (fresh state directory: initdb included) and warm start (same
   directory again) of every component, as `cex up` does it.
2. grpc.health.v1 Check, a call that does no work, sent directly to a service
   and through Envoy, by concurrent clients for a fixed number of calls:
   throughput and p50/p99, so the difference is the cost of the hop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import SERVICES, Ports, free_ports


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _load(
    target: str, authority: str | None, calls: int, concurrency: int
) -> dict[str, float]:
    options = [("grpc.default_authority", authority)] if authority else []
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="cex.order.v1.OrderService")
        for _ in range(200):  # warm up the connection and both processes
            await stub.Check(request, timeout=5)

        async def worker(n: int) -> None:
            for _ in range(n):
                began = time.perf_counter()
                await stub.Check(request, timeout=5)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


async def main(calls: int, concurrency: int) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    with tempfile.TemporaryDirectory() as state:
        ports: Ports = free_ports()
        stack = Stack(Path(state), ports, env)
        cold = await stack.start()
        await stack.stop()
        stack = Stack(Path(state), ports, env)
        warm = await stack.start()
        count = len(stack.components())
        print(f"start, all {count} components healthy: cold {cold:.1f}s, warm {warm:.1f}s")
        try:
            order = next(s for s in SERVICES if s.name == "order")
            direct = f"{ports.host}:{ports.grpc(order)}"
            for label, target, authority in (
                ("direct to order", direct, None),
                ("through envoy", stack.edge, "order"),
            ):
                r = await _load(target, authority, calls, concurrency)
                print(
                    f"health Check {label:>16}: {r['rps']:8.0f} calls/s  "
                    f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                    f"({calls} calls, {concurrency} concurrent)"
                )
        finally:
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency))
