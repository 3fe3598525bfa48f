"""make bench-edge: the latency Envoy adds per call, with JWT verification on.

Starts the stack (fresh state), creates an account, an API key and a token, then
calls auth's GetAccount, a protected method, with that token:
- directly to the auth process (its own interceptor verifies the JWT), and
- through Envoy (jwt_authn verifies it, then the service does again),
and, as a reference without any JWT, grpc.health.v1 Check to auth both ways.
Sequential calls (concurrency 1) show the added latency without queueing;
concurrent ones show throughput. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import SERVICES, free_ports
from services.chassis.authn import service_secret

AUTH = next(s for s in SERVICES if s.name == "auth")


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _token(stack: Stack) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        ops = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                api_key_id="svc:bench", api_key_secret=service_secret(stack.service_secret, "bench")
            )
        )
        md = (("authorization", f"Bearer {ops.access_token}"),)
        account = await stub.CreateAccount(
            auth_pb2.CreateAccountRequest(request_id=str(uuid.uuid4()), display_name="bench"),
            metadata=md,
        )
        key = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                account_id=account.account.account_id,
                scopes=[auth_pb2.API_KEY_SCOPE_READ],
            ),
            metadata=md,
        )
        token = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                api_key_id=key.api_key.api_key_id, api_key_secret=key.secret, ttl={"seconds": 900}
            )
        )
    return token.access_token, account.account.account_id


async def _load(
    target: str, authority: str | None, call: str, token: str, calls: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        if call == "GetAccount":
            method = auth_pb2_grpc.AuthServiceStub(channel).GetAccount
            request: object = auth_pb2.GetAccountRequest()
            md: tuple[tuple[str, str], ...] | None = (("authorization", f"Bearer {token}"),)
        else:
            method = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[assignment]
            request = health_pb2.HealthCheckRequest(service=AUTH.grpc_service)
            md = None
        for _ in range(200):  # warm up the connection and both processes
            await method(request, metadata=md, timeout=5)

        async def worker(n: int) -> None:
            for _ in range(n):
                began = time.perf_counter()
                await method(request, metadata=md, timeout=5)
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


def _ghz(target: str, token: str, calls: int, concurrency: int) -> str | None:
    ghz = shutil.which("ghz") or str(Path.home() / "go" / "bin" / "ghz")
    if not Path(ghz).exists():
        return None
    result = subprocess.run(
        [ghz, "--insecure", "--call", "cex.auth.v1.AuthService/GetAccount", "-d", "{}",
         "--metadata", f'{{"authorization":"Bearer {token}"}}', "-n", str(calls),
         "-c", str(concurrency), "--connections", "1", "--format", "csv", target],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    rows = [line.split(",") for line in result.stdout.splitlines() if line.count(",") >= 2]
    ok = sorted(float(r[0]) for r in rows if r[1].strip() == "OK")  # "duration (ms),status,error"
    if not ok:
        return f"ghz failed: {result.stderr[-300:]}"
    return f"{len(ok)} ok, p50 {_percentile(ok, 0.5):.2f} ms  p99 {_percentile(ok, 0.99):.2f} ms"


async def main(calls: int, concurrency: int) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    with tempfile.TemporaryDirectory() as state:
        ports = free_ports()
        stack = Stack(Path(state), ports, env)
        await stack.start()
        try:
            token, _ = await _token(stack)
            direct = f"{ports.host}:{ports.grpc(AUTH)}"
            for c in (1, concurrency):
                for call in ("GetAccount", "Check"):
                    results = {}
                    for label, target, authority in (
                        ("direct", direct, None),
                        ("envoy", stack.edge, "auth"),  # as a Kubernetes Service name
                    ):
                        results[label] = r = await _load(target, authority, call, token, calls, c)
                        print(
                            f"{call:>10} {label:>6} c={c:<3}: {r['rps']:7.0f} calls/s  "
                            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
                        )
                    added = {
                        q: results["envoy"][q] - results["direct"][q] for q in ("p50_ms", "p99_ms")
                    }
                    print(
                        f"{call:>10} envoy adds c={c:<3}: p50 {added['p50_ms']:+.2f} ms  "
                        f"p99 {added['p99_ms']:+.2f} ms"
                    )
            for label, target in (("direct", direct), ("envoy", stack.edge)):
                for c in (1, concurrency):
                    out = _ghz(target, token, calls, c)
                    if out:
                        print(f"ghz GetAccount {label:>6} c={c:<3}: {out}")
        finally:
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency))
