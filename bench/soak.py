"""make soak: a steady trading rate for N minutes; is the stack flat over history?

Starts the local stack on free ports (or uses a running one: --state-dir), then
two accounts trade BTC-USDT through Envoy at --rate orders/s for --minutes:
each pair of orders is a resting sell and a buy that takes it, so every pair
is one trade and the book stays bounded. Every --window seconds it reports:

- CPU ms per order of each process of the stack (and their total),
- the ack latency of PlaceOrder (p50, p99),
- how long the ledger's AuditLedger takes (one call per window),
- storage: PostgreSQL's database size and the JetStream streams' bytes, per
  trade so far.

At the end: the slope of each figure per window over the run (a line fitted
by least squares, in units per 10 minutes): CPU per order, latency and audit
time should be flat; storage grows per trade, bounded by the retention of
every stream and table that is not the book of record. The last line is
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import nats

from bench import processes
from bench.stats import percentile
from bench.trading_setup import Account, accounts, bearer, lift_limits, operator_token
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from cex_stack.topology import Ports, free_ports
from services.chassis import ErrorDetails

STREAMS = ("MATCH_EVENTS", "MD_TRADES", "RISK_EVENTS", "FUNDING_EVENTS")


@dataclass
class Window:
    """What one window measured."""

    minute: float
    orders: int
    trades: int
    cpu_ms: dict[str, float]
    p50_ms: float
    p99_ms: float
    audit_s: float
    db_bytes: int
    stream_bytes: int
    failures: int = 0


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    orders: int = 0
    trades: int = 0
    failures: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def slope(ys: list[float], xs: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def _trade(stub: order_pb2_grpc.OrderServiceStub, traders: list[Account], load: Load,
                 price: str) -> None:  # fmt: skip
    """One resting sell and the buy that takes it: two orders, one trade (the
    traders' current tokens: the soak renews them)."""
    for account, side in ((traders[0], t.SIDE_SELL), (traders[1], t.SIDE_BUY)):
        started = time.perf_counter()
        try:
            await stub.PlaceOrder(
                order_pb2.PlaceOrderRequest(
                    client_order_id=uuid.uuid4().hex,
                    market="BTC-USDT",
                    side=side,
                    type=t.ORDER_TYPE_LIMIT,
                    price=price,
                    quantity="0.1",
                ),
                metadata=bearer(account.token),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            load.failures += 1
            load.reasons[ErrorDetails.from_rpc_error(error).reason or error.code().name] += 1
            return
        load.latencies.append((time.perf_counter() - started) * 1000)
        load.orders += 1
    load.trades += 1


async def _drive(stub: order_pb2_grpc.OrderServiceStub, traders: list[Account], rate: float,
                 until: float, load: Load) -> None:  # fmt: skip
    """Pairs at rate/2 per second, open loop (a slow answer does not slow the offer)."""
    began = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()
    sent = 0
    while (now := time.perf_counter()) < until:
        due = int((now - began) * rate / 2)
        while sent < due:
            task = asyncio.create_task(_trade(stub, traders, load, "100"))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*pending, return_exceptions=True)


async def _storage(database_url: str, nats_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        db = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        total = 0
        for name in STREAMS:
            try:
                total += (await js.stream_info(name)).state.bytes
            except Exception:  # a stream this stack does not have (yet)
                continue
    finally:
        await nc.close()
    return db, total


async def _audit(channel: grpc.aio.Channel, svc: str) -> float:
    started = time.perf_counter()
    await ledger_pb2_grpc.LedgerServiceStub(channel).AuditLedger(
        ledger_pb2.AuditLedgerRequest(), metadata=bearer(svc), timeout=120
    )
    return time.perf_counter() - started


async def soak(stack: Stack, args: argparse.Namespace) -> list[Window]:
    svc = await operator_token(stack.edge, stack.service_secret)
    windows: list[Window] = []
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        await lift_limits(channel, svc)
        traders = await accounts(channel, svc, 2, {"BTC": "1000000", "USDT": "1000000000"})
        stub = order_pb2_grpc.OrderServiceStub(channel)
        pids = processes.pids(stack.state_dir)
        load = Load()
        start = time.perf_counter()
        until = start + args.minutes * 60
        driver = asyncio.create_task(_drive(stub, traders, args.rate, until, load))
        print("| minute | orders | trades | CPU ms/order | p50 ms | p99 ms | audit s |"
              " DB bytes/trade | streams bytes/trade | failures |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        before, seen_orders, seen_trades = processes.cpu(pids), 0, 0
        while time.perf_counter() < until:
            await asyncio.sleep(min(args.window, max(until - time.perf_counter(), 0.1)))
            after = processes.cpu(pids)
            orders = load.orders - seen_orders
            latencies, load.latencies = load.latencies, []
            cpu = {n: (after[n] - before[n]) * 1000 / max(orders, 1) for n in after if n in before}
            db, streams = await _storage(stack.database_url, stack.nats_url)
            window = Window(
                minute=(time.perf_counter() - start) / 60,
                orders=orders,
                trades=load.trades - seen_trades,
                cpu_ms=cpu,
                p50_ms=percentile(latencies, 0.5),
                p99_ms=percentile(latencies, 0.99),
                audit_s=await _audit(channel, svc),
                db_bytes=db,
                stream_bytes=streams,
                failures=load.failures,
            )
            windows.append(window)
            trades = max(load.trades, 1)
            print(
                f"| {window.minute:.1f} | {orders} | {window.trades} | {sum(cpu.values()):.2f} "
                f"| {window.p50_ms:.1f} | {window.p99_ms:.1f} | {window.audit_s:.3f} "
                f"| {db / trades:,.0f} | {streams / trades:,.0f} | {load.failures} |",
                flush=True,
            )
            # Tokens live 5 minutes: renew them every window, outside its CPU figures
            # (the orders read the traders' tokens per call).
            svc = await operator_token(stack.edge, stack.service_secret)
            traders[:] = [await a.renewed(channel) for a in traders]
            before, seen_orders, seen_trades = processes.cpu(pids), load.orders, load.trades
        await driver
    if load.reasons:
        print(f"<!-- failures: {dict(load.reasons)} -->")
    return windows


def report(windows: list[Window]) -> dict[str, object]:
    """Slopes per 10 minutes over the run, and storage per trade at its end."""
    xs = [w.minute / 10 for w in windows]
    names = sorted({n for w in windows for n in w.cpu_ms})
    per_process = {n: round(slope([w.cpu_ms.get(n, 0.0) for w in windows], xs), 3) for n in names}
    trades = sum(w.trades for w in windows) or 1
    first, last = windows[0], windows[-1]
    later = max(trades - first.trades, 1)  # trades after the first window's sizes
    return {
        "minutes": round(last.minute, 1),
        "orders": sum(w.orders for w in windows),
        "trades": trades,
        "failures": last.failures,
        "cpu_ms_per_order_first": round(sum(first.cpu_ms.values()), 2),
        "cpu_ms_per_order_last": round(sum(last.cpu_ms.values()), 2),
        "cpu_ms_per_order_slope_per_10min": round(
            slope([sum(w.cpu_ms.values()) for w in windows], xs), 3
        ),
        "cpu_slope_per_10min_by_process": per_process,
        "p99_ms_slope_per_10min": round(slope([w.p99_ms for w in windows], xs), 2),
        "audit_s_first": round(first.audit_s, 3),
        "audit_s_last": round(last.audit_s, 3),
        "audit_s_slope_per_10min": round(slope([w.audit_s for w in windows], xs), 4),
        "db_bytes_per_trade": round((last.db_bytes - first.db_bytes) / later),
        "stream_bytes_per_trade": round((last.stream_bytes - first.stream_bytes) / later),
    }


async def main(args: argparse.Namespace) -> None:
    print(f"# soak ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {args.rate:g} orders/s "
          f"for {args.minutes:g} min, windows of {args.window:g} s; {os.cpu_count()} cores, "
          f"load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.state_dir:
        doc = json.loads((Path(args.state_dir) / "stack.json").read_text())
        stack = Stack(Path(args.state_dir), Ports(base=doc["base_port"], host=doc["host"]))
        windows = await soak(stack, args)
    else:
        stack = Stack(Path(tempfile.mkdtemp(prefix="cex-soak-")), free_ports(), dict(os.environ))
        await stack.start()
        try:
            windows = await soak(stack, args)
        finally:
            await stack.stop()
    print("RESULT " + json.dumps(report(windows)), flush=True)


def _cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", help="use the stack running from this state dir")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=40.0, help="orders per second")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per report line")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_cli()))
