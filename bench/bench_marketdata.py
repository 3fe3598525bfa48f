"""make bench-marketdata: market data throughput and fan-out latency.

Starts the local stack's PostgreSQL, NATS and Redis without its services
(ledger, order and risk would consume the benchmark's match events and take a
core's worth of CPU from market data), then a market data process of its own
(`python -m services.marketdata.main`) on an empty database, serving one
market of its own (BENCH-USDT). A stand-in for match in this process answers
GetOrderBook and ReplayEvents from the events it published; the events are
published on core NATS `match.events.BENCH-USDT` as match does. Then:

1. throughput: `--events` events (level changes, every tenth a trade) published
   as fast as this process can; events/s is the count over the time until the
   market data book reaches the last seq (trades stored in PostgreSQL included);
2. fan-out: N StreamOrderBook subscribers (depth 20, over `--channels`
   connections) while the book changes `--rate` times a second for `--seconds`:
   delivery latency p50/p99 two ways, the market data process's CPU and RSS.
   "Newest event": from the delta's update_time (its newest event) to receipt.
   "Every event": a delta conflates every event since the subscriber's last
   message, and each of them waited from its own time to this receipt; that
   is the delay the subscriber's book really had, and the figure that counts.
   N grows through `--subscribers` until the every-event p99 passes
   `--stop-ms`, and the largest N with it under 50 ms and under 100 ms is
   printed;
3. the same with N NATS subscribers of md.BENCH-USDT.book.

The subscribers are bench/mdload (Go, built here with `go build` into
.tools/bin), a process of its own, so that the market data process's CPU is
its own and a Python client decoding every message does not set the pace.
They still share the machine's cores with market data, NATS, PostgreSQL and
this process (the publisher): their CPU is printed on each row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc
import nats
from google.protobuf.timestamp_pb2 import Timestamp

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex_stack import probes
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports

MARKET = "BENCH-USDT"
DEPTH = 20  # the subscribers' StreamOrderBook depth
ROOT = Path(__file__).resolve().parent.parent
CATALOG = """
assets: {BENCH: {scale: 8}, USDT: {scale: 8}}
markets:
  BENCH-USDT: {base: BENCH, quote: USDT, tick_size: "0.01", lot_size: "0.001",
               min_quantity: "0.001", max_quantity: "1000000", min_notional: "1"}
"""


class FakeMatch(match_pb2_grpc.MatchServiceServicer):
    """Answers from the events this benchmark published (the book starts empty)."""

    def __init__(self) -> None:
        self.events: list[match_pb2.MatchEvent] = []

    async def GetOrderBook(self, request, context):  # type: ignore[no-untyped-def]
        # Market data takes the book once, at start (empty, seq 0); later calls only ask
        # for the seq (is a tail missing?), so the levels are left out.
        book = match_pb2.OrderBook(market=MARKET, seq=len(self.events))
        return match_pb2.GetOrderBookResponse(book=book)

    async def ReplayEvents(self, request, context):  # type: ignore[no-untyped-def]
        last = request.to_seq or len(self.events)
        for start in range(max(request.from_seq, 1), last + 1, 500):
            batch = self.events[start - 1 : min(start + 499, last)]
            yield match_pb2.ReplayEventsResponse(events=batch)


class Generator:
    """Level changes within 50 ticks of 100.00 on each side (so most land in the top 20
    levels the subscribers hold); every tenth event a trade.

    It keeps the book it generates, so it knows which events a subscriber at `DEPTH`
    sees (a level that changed, within the top `DEPTH` before or after): those are
    published with the header `Bench-Visible` for mdload's every-event latency (an
    event outside the depth, or a trade, changes nothing the subscriber holds)."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.seq = 0
        self.levels: dict[int, dict[int, str]] = {1: {}, 2: {}}  # side -> ticks -> quantity

    def visible(self, event: match_pb2.MatchEvent) -> bool:
        if event.WhichOneof("kind") != "level_changed":
            return False
        lc = event.level_changed
        ticks = round(Decimal(lc.price) * 100)
        levels = self.levels[lc.side]
        before = levels.pop(ticks, "0")
        if lc.quantity != "0":
            levels[ticks] = lc.quantity
        if before == lc.quantity:  # no change at all
            return False
        better = sum(1 for t in levels if (t > ticks if lc.side == 1 else t < ticks))
        return better < DEPTH

    def next(self) -> match_pb2.MatchEvent:
        self.seq += 1
        now = time.time_ns()
        event = match_pb2.MatchEvent(
            market=MARKET,
            seq=self.seq,
            command_seq=self.seq,
            command_id=f"c{self.seq}",
            event_time=Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000),
        )
        rng = self.rng
        if self.seq % 10 == 0:
            t = event.trade
            t.trade_id, t.price, t.quantity = str(self.seq), "100", "0.5"
            t.quote_quantity, t.taker_side = "50", rng.choice([1, 2])  # type: ignore[assignment]
        else:
            lc = event.level_changed
            side = rng.choice([1, 2])
            ticks = rng.randrange(9950, 10000) if side == 1 else rng.randrange(10001, 10051)
            lc.side, lc.price = side, f"{ticks // 100}.{ticks % 100:02d}"  # type: ignore[assignment]
            qty = rng.randrange(0, 4)
            lc.quantity = "0" if qty == 0 else f"{qty}.5"
            lc.order_count = 1 if qty else 0
        return event


class ProcStats:
    """CPU seconds and RSS of a process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self, task: int | None = None) -> float:
        """The whole process's, or one thread's (the main thread: task = pid)."""
        path = f"/proc/{self.pid}/stat" if task is None else f"/proc/{self.pid}/task/{task}/stat"
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


async def _book_seq(stub: marketdata_pb2_grpc.MarketDataServiceStub) -> int:
    reply = await stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET, depth=1), timeout=10)
    return reply.book.seq


async def _publish(nc: nats.NATS, fake: FakeMatch, gen: Generator, n: int) -> None:
    for _ in range(n):
        event = gen.next()
        fake.events.append(event)
        headers = {"Bench-Visible": "1"} if gen.visible(event) else None
        batch = match_pb2.EventBatch(events=[event]).SerializeToString()
        await nc.publish(f"match.events.{MARKET}", batch, headers=headers)


async def _paced(
    nc: nats.NATS, fake: FakeMatch, gen: Generator, rate: float, seconds: float
) -> None:
    began = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - began) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            await _publish(nc, fake, gen, 1)
            sent += 1
        await nc.flush()
        await asyncio.sleep(max(0.0, sent / rate - (time.perf_counter() - began)))


class Load:
    """The subscribers: bench/mdload (Go), a process of its own, driven over its stdin."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stats = ProcStats(process.pid)

    @classmethod
    async def start(cls, target: str, nats_url: str, channels: int) -> Load:
        root = ROOT
        binary = root / ".tools" / "bin" / "mdload"
        build = await asyncio.create_subprocess_exec(
            "go", "build", "-o", str(binary), ".", cwd=root / "bench" / "mdload"
        )
        if await build.wait() != 0:
            raise RuntimeError("go build bench/mdload failed")
        process = await asyncio.create_subprocess_exec(
            str(binary), "-target", target, "-nats", nats_url, "-market", MARKET,
            "-depth", str(DEPTH), "-conns", str(channels),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(process)

    async def ask(self, command: str) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 600)
        words = line.decode().split()
        if not words or words[0] == "error":
            raise RuntimeError(f"mdload {command!r}: {line!r}")
        return words

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def _load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


async def _fanout_step(
    label: str,
    n: int,
    args: argparse.Namespace,
    nc: nats.NATS,
    fake: FakeMatch,
    gen: Generator,
    stats: ProcStats,
    load: Load,
) -> float:
    await load.ask("reset")
    cpu0, main0, t0 = stats.cpu_s(), stats.cpu_s(stats.pid), time.perf_counter()
    load_cpu0 = load.stats.cpu_s()
    await _paced(nc, fake, gen, args.rate, args.seconds)
    await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - t0
    cpu = (stats.cpu_s() - cpu0) / elapsed
    main = (stats.cpu_s(stats.pid) - main0) / elapsed
    load_cpu = (load.stats.cpu_s() - load_cpu0) / elapsed
    report = await load.ask("report")
    _, count, p50, p99, worst, gaps, resyncs, _, _, events, e50, e99, eworst = report
    # gRPC: every delta received is a write of this process; NATS: one publish for all.
    per_delta = f", {cpu * elapsed / max(1, int(count)) * 1e6:4.0f} us per delta"
    if label != "grpc":
        per_delta = ""
    print(
        f"{label:>5} x {n:>6}: {int(count):>9} deltas  newest event p50 {float(p50):7.2f} ms  "
        f"p99 {float(p99):7.2f} ms  max {float(worst):7.2f} ms | {int(events):>10} events  "
        f"every event p50 {float(e50):7.2f} ms  p99 {float(e99):7.2f} ms  "
        f"max {float(eworst):7.2f} ms | gaps {gaps}  resyncs {resyncs}  "
        f"marketdata CPU {cpu * 100:5.1f}% (event loop {main * 100:5.1f}%"
        f"{per_delta}) "
        f"RSS {stats.rss_mb():6.1f} MB  "
        f"subscribers' CPU {load_cpu * 100:5.1f}%  load {_load_average()}",
        flush=True,
    )
    return float(e99)


async def _sweep(
    label: str,
    args: argparse.Namespace,
    nc: nats.NATS,
    fake: FakeMatch,
    gen: Generator,
    stats: ProcStats,
    load: Load,
) -> None:
    """Grow the subscribers through `--subscribers` (`--nats-subscribers`) until the
    every-event p99 passes `--stop-ms`; then the largest count with it under 50 ms and
    under 100 ms."""
    best: dict[int, int] = {50: 0, 100: 0}
    for count in args.subscribers if label == "grpc" else args.nats_subscribers:
        await load.ask(f"{label} {count}")
        p99 = await _fanout_step(label, count, args, nc, fake, gen, stats, load)
        for limit in best:
            if p99 < limit:
                best[limit] = max(best[limit], count)
        if p99 > args.stop_ms:
            break
    print(
        f"{label}: largest count measured with every-event p99 < 50 ms: {best[50]}, "
        f"with p99 < 100 ms: {best[100]}",
        flush=True,
    )
    await load.ask("close")


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL", "REDIS_URL")
    }
    with tempfile.TemporaryDirectory() as state:
        catalog = Path(state, "bench-markets.yaml")
        catalog.write_text(CATALOG)  # noqa: ASYNC240  (before anything runs)
        stack = Stack(Path(state, "stack"), free_ports(), env, services=False)
        await stack.start()
        process: asyncio.subprocess.Process | None = None
        fake = FakeMatch()
        match_server = grpc.aio.server()
        match_pb2_grpc.add_MatchServiceServicer_to_server(fake, match_server)
        match_port = match_server.add_insecure_port("127.0.0.1:0")
        await match_server.start()
        nc = await nats.connect(stack.nats_url)
        try:
            name = f"bench_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(stack.admin_database_url)
            await admin.execute(f"CREATE DATABASE {name}")
            await admin.close()
            port = free_ports().edge
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.marketdata.main",
                env={
                    **env,
                    "CEX_GRPC_PORT": str(port),
                    "DATABASE_URL": stack.database_url.rsplit("/", 1)[0] + f"/{name}",
                    "NATS_URL": stack.nats_url,
                    "REDIS_URL": stack.redis_url,
                    "CEX_MARKETS": str(catalog),
                    "MARKETDATA_MATCH_TARGET": f"127.0.0.1:{match_port}",
                    "CEX_LOG_LEVEL": "WARNING",
                },
            )  # fmt: skip
            target = f"127.0.0.1:{port}"
            for _ in range(300):
                if await probes.grpc_health(target, "cex.marketdata.v1.MarketDataService"):
                    break
                await asyncio.sleep(0.1)
            stats = ProcStats(process.pid)
            gen = Generator()
            async with grpc.aio.insecure_channel(target) as channel:
                stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
                for _ in range(300):
                    try:
                        await _book_seq(stub)
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.1)
                # 1. throughput
                n = args.events
                cpu0 = stats.cpu_s()
                began = time.perf_counter()
                await _publish(nc, fake, gen, n)
                await nc.flush()
                published = time.perf_counter() - began
                trace = []
                while (seq := await _book_seq(stub)) < gen.seq:
                    trace.append((round(time.perf_counter() - began, 2), seq))
                    await asyncio.sleep(0.02)
                if os.environ.get("BENCH_TRACE"):
                    print(trace[::10])
                elapsed = time.perf_counter() - began
                want = sum(1 for e in fake.events if e.WhichOneof("kind") == "trade")
                while await _count_trades(stack, name) < want:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                stored = time.perf_counter() - began
                cpu = stats.cpu_s() - cpu0
                print(
                    f"throughput: {n} events published in {published:.2f} s; the book at the "
                    f"last seq after {elapsed:.2f} s = {n / elapsed:,.0f} events/s; all "
                    f"{want} trades stored (tape, candles) after {stored:.2f} s = "
                    f"{n / stored:,.0f} events/s (marketdata CPU {cpu / stored * 100:.0f}%, "
                    f"RSS {stats.rss_mb():.1f} MB)",
                    flush=True,
                )
            # 2. gRPC StreamOrderBook subscribers, 3. NATS subscribers of md.<market>.book
            load = await Load.start(target, stack.nats_url, args.channels)
            try:
                await _sweep("grpc", args, nc, fake, gen, stats, load)
                if args.nats_subscribers:
                    await _sweep("nats", args, nc, fake, gen, stats, load)
            finally:
                await load.stop()
        finally:
            await nc.close()
            await match_server.stop(0)
            if process is not None:
                process.terminate()
                await process.wait()
            await stack.stop()


async def _count_trades(stack: Stack, database: str) -> int:
    conn = await asyncpg.connect(stack.database_url.rsplit("/", 1)[0] + f"/{database}")
    try:
        return int(await conn.fetchval("SELECT count(*) FROM marketdata.trades"))
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument(
        "--subscribers", type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 1000, 2000, 4000, 7000, 10000],
    )  # fmt: skip
    parser.add_argument(
        "--nats-subscribers", type=lambda s: [int(x) for x in s.split(",") if x],
        default=[100, 1000, 2000, 4000, 7000, 10000],
    )  # fmt: skip
    parser.add_argument("--stop-ms", type=float, default=500.0)
    asyncio.run(main(parser.parse_args()))
