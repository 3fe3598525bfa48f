"""`make bench-marketdata BENCH_ARGS="--replicas marketdata=2"` really measures two
market data processes behind Envoy: both start, Envoy's cluster has both healthy,
and StreamOrderBook calls through Envoy reach both."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from bench.bench_marketdata import CATALOG, MARKET, FakeMatch, replicas_on
from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2_grpc
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports


async def test_two_replicas_behind_envoy_both_serve_streams(tmp_path: Path) -> None:
    env = embedded_env()
    catalog = tmp_path / "markets.yaml"
    catalog.write_text(CATALOG)
    stack = Stack(tmp_path / "stack", free_ports(), env, services=False)
    await stack.start()
    match_server = grpc.aio.server()
    match_pb2_grpc.add_MatchServiceServicer_to_server(FakeMatch(), match_server)  # type: ignore[abstract]
    port = match_server.add_insecure_port("127.0.0.1:0")
    await match_server.start()
    replicas, _ = await replicas_on(
        stack, env, tmp_path, catalog, f"127.0.0.1:{port}", 2, via_envoy=True
    )
    try:
        await replicas.start()
        assert len(replicas.processes) == 2
        assert all(p.returncode is None for p in replicas.processes)
        assert len(set(replicas.targets)) == 2
        assert replicas.edge == f"{stack.ports.host}:{stack.ports.edge}"
        assert await replicas.healthy_endpoints() == 2  # Envoy's own health checks

        # Streams through Envoy, round robin: each replica serves some.
        async with grpc.aio.insecure_channel(replicas.edge) as channel:
            stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
            calls = [
                stub.StreamOrderBook(md.StreamOrderBookRequest(market=MARKET, depth=5))
                for _ in range(6)
            ]
            for call in calls:
                first = await asyncio.wait_for(call.read(), 30)
                assert first.WhichOneof("kind") == "snapshot"
            served = await _streams_per_replica(replicas)
            for call in calls:
                call.cancel()
        assert sorted(served) == sorted(replicas.targets)
        assert all(n >= 1 for n in served.values()), served
    finally:
        await replicas.stop()
        await match_server.stop(0)
        await stack.stop()
    assert all(p.returncode is not None for p in replicas.processes)


async def _streams_per_replica(replicas) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Requests Envoy sent each marketdata endpoint (its /clusters rq_total)."""
    from bench.bench_marketdata import _http_get

    url = f"http://{replicas.ports.host}:{replicas.ports.envoy_admin}/clusters"
    text = await asyncio.to_thread(_http_get, url)
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "marketdata" and parts[2] == "rq_total":
            out[parts[1]] = int(parts[3])
    return out
