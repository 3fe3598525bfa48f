"""make bench-trading: PlaceOrder through Envoy, unary (ghz) and over streams.

Starts the local stack on free ports (or uses a running one: --state-dir),
lifts risk's default limits so that they do not cap the run, then:

1. unary: ghz (installed by bench/install-ghz.sh into .tools/bin) sends
   PlaceOrder through Envoy with one user's token, open-loop at each --rps of
   the sweep for --duration seconds: resting limit buys (each goes through
   risk, a ledger hold, match's journal and back). Between steps the account's
   orders are cancelled so every step starts from an empty book.
2. streams: --sessions StreamOrders sessions (one account each, opened with
   the service token acting for the account), each quoting: place a limit buy,
   cancel the previous one, at --quote-interval per session. Reported: acks/s
   and ack latency (command sent -> ack read) p50/p99.

3. the edge alone: ghz sends grpc.health.v1 Check to order through the same
   Envoy (closed loop), the ceiling any call through this edge can reach here.

Replicas (issue 20): `--replicas order=2,marketdata=2` (the spelling of `cex
up --replicas`) runs the stack with that many processes of each named service
behind its Envoy; given more than once (`--replicas order=1 --replicas
order=2`), each configuration runs in turn on a fresh stack in this one
invocation and a summary puts their figures side by side. The edge spreads
order's calls by account, so with several order replicas the unary load is
spread over at least two accounts per replica, and with `--replicas` each
stream session opens with its own account's token (without it, as before,
with the service token acting for the account: one hash key, one replica).
CPU is reported per process, replicas apart (`order-2`).

Everything (PostgreSQL, NATS, Envoy, every service, ghz and this script)
shares the machine's cores; the report says how many there are. The last line
is `RESULT {json}` with the figures issue 17 asks for, all from this one run:
lone_p50_ms / lone_p99_ms (the first --rps step, 25/s by default),
unary_orders_s (the highest achieved rate with p99 under 250 ms),
noop_edge_rps, p99_ms_at_1000 (null unless 1,000/s was offered and at least
95 % of it achieved), stream_cmds_s, cpu_ms_per_order (at unary_orders_s's
step) and cpu_ms_per_stream_cmd: CPU summed over every process of the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import processes
from bench.stats import percentile
from bench.trading_setup import Account, accounts, bearer, lift_limits, operator_token
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from cex_stack.topology import Ports, free_ports, parse_replicas
from services.chassis import ErrorDetails

ROOT = Path(__file__).resolve().parents[1]
GHZ = ROOT / ".tools" / "bin" / "ghz"
PROTOSET = ROOT / "gen" / "descriptor" / "cex.binpb"


def _ghz(edge: str, token: str, rps: int, duration: int, concurrency: int) -> dict[str, object]:
    data = {
        "client_order_id": "{{.UUID}}",
        "market": "BTC-USDT",
        "side": "SIDE_BUY",
        "type": "ORDER_TYPE_LIMIT",
        "price": "95",
        "quantity": "0.1",
    }
    out = subprocess.run(
        [
            str(GHZ),
            "--insecure",
            "--protoset",
            str(PROTOSET),
            "--call",
            "cex.order.v1.OrderService.PlaceOrder",
            "--data",
            json.dumps(data),
            "--metadata",
            json.dumps({"authorization": f"Bearer {token}"}),
            "--rps",
            str(rps),
            "--duration",
            f"{duration}s",
            "--concurrency",
            str(concurrency),
            "--connections",
            "4",
            "--timeout",
            "20s",
            "--format",
            "json",
            edge,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if not out.stdout.strip():
        raise RuntimeError(f"ghz failed: {out.stderr}")
    report: dict[str, object] = json.loads(out.stdout)
    return report


def _cpu_line(before: dict[str, float], after: dict[str, float], orders: int) -> tuple[str, float]:
    """CPU ms per order by component (PostgreSQL: backends alive at both ends), and
    the total."""
    parts = [
        f"{name} {(after[name] - before[name]) * 1000 / max(orders, 1):.2f}"
        for name in before
        if name in after
    ]
    total = sum(after[n] - before[n] for n in before if n in after) * 1000 / max(orders, 1)
    return f"<!-- CPU ms per order: {', '.join(parts)}; total {total:.2f} -->", total


def _ns_ms(value: object) -> float:
    return float(value) / 1e6  # type: ignore[arg-type]


def _latency(report: dict[str, object], pct: int) -> float:
    for entry in report.get("latencyDistribution") or []:  # type: ignore[attr-defined]
        if entry["percentage"] == pct:
            return _ns_ms(entry["latency"])
    return float("nan")


async def _cancel_all(channel: grpc.aio.Channel, account: Account) -> None:
    await order_pb2_grpc.OrderServiceStub(channel).CancelAllOrders(
        order_pb2.CancelAllOrdersRequest(request_id=uuid.uuid4().hex),
        metadata=bearer(account.token),
        timeout=300,
    )


@dataclass(frozen=True)
class Step:
    rps: int
    achieved: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # per acknowledged order, every process of the stack


async def noop_edge(edge: str, seconds: int) -> float:
    """grpc.health.v1 Check to order through Envoy, closed loop: calls/s."""
    argv = [
        *(str(GHZ), "--insecure", "--authority", "order", "--format", "json"),
        *("--call", "grpc.health.v1.Health/Check"),
        *("--data", json.dumps({"service": "cex.order.v1.OrderService"})),
        *("--duration", f"{seconds}s", "--concurrency", "16", "--connections", "4", edge),
    ]
    out = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, check=False)
    report = json.loads(out.stdout)
    ok = int((report.get("statusCodeDistribution") or {}).get("OK", 0))
    rps = ok / (_ns_ms(report["total"]) / 1000)
    print("\n## the edge alone: health Check through Envoy (ghz, closed loop)\n")
    print(f"{ok} calls OK, {rps:.0f} calls/s, p50 {_latency(report, 50):.2f} ms, "
          f"p99 {_latency(report, 99):.2f} ms")  # fmt: skip
    return rps


_PER_ACCOUNT_RPS = 500  # each account's share: under the edge's per-account bucket (1,000/s)


def _accounts_for(rps: int, order_replicas: int) -> int:
    """Accounts a rate is spread over: as many as the edge's per-account limit needs,
    and with several order replicas at least two per replica (the edge sends each
    account to one replica, by a hash)."""
    floor = 2 * order_replicas if order_replicas > 1 else 1
    return max(floor, -(-rps // _PER_ACCOUNT_RPS))


async def _ghz_accounts(
    edge: str, tokens: list[str], rps: int, duration: int, concurrency: int
) -> tuple[dict[str, int], list[float], float]:
    """The rate spread over the accounts given (at most), one ghz each, side by side:
    status counts, every call's latency (ms), seconds."""
    n = len(tokens)
    reports = await asyncio.gather(
        *(
            asyncio.to_thread(_ghz, edge, token, rps // n, duration, max(concurrency // n, 10))
            for token in tokens[:n]
        )
    )
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for report in reports:
        codes.update(report.get("statusCodeDistribution") or {})  # type: ignore[arg-type]
        errors.update(report.get("errorDistribution") or {})  # type: ignore[arg-type]
        latencies += [_ns_ms(d["latency"]) for d in report.get("details") or []]  # type: ignore[attr-defined]
    seconds = max(_ns_ms(r["total"]) / 1000 for r in reports)
    for error, count in errors.most_common(3):
        print(f"<!-- {count} x {error[:300]} -->")
    return dict(codes), latencies, seconds


async def unary(
    edge: str, channel: grpc.aio.Channel, svc: str, args: argparse.Namespace, pids: dict[str, int]
) -> list[Step]:
    order_replicas = args.run_replicas.get("order", 1)
    n = _accounts_for(max(args.rps), order_replicas)
    users = await accounts(channel, svc, n, {"USDT": "1000000000"})
    steps: list[Step] = []
    print("\n## unary PlaceOrder through Envoy (ghz, open loop)\n")
    print("| target rps | sent | ok | achieved orders/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rps in args.rps:
        before = processes.cpu(pids)
        tokens = [u.token for u in users][: _accounts_for(rps, order_replicas)]
        codes, latencies, seconds = await _ghz_accounts(
            edge, tokens, max(rps, len(tokens)), args.duration, args.concurrency
        )
        after = processes.cpu(pids)
        ok, total = codes.get("OK", 0), sum(codes.values())
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(
            f"| {rps} | {total} | {ok} | {ok / seconds:.0f} | {p50:.1f} | {p99:.1f} |", flush=True
        )
        line, cpu = _cpu_line(before, after, ok)
        print(line)
        if ok < total:
            print(f"<!-- answers at {rps}: {codes} -->")
        steps.append(Step(rps, ok / seconds, p50, p99, cpu))
        for user in users:
            await _cancel_all(channel, user)
    return steps


class _Quoter:
    def __init__(self, stub: order_pb2_grpc.OrderServiceStub, account: str, token: str) -> None:
        """`token`: the account's own, or the service's acting for the account."""
        self.account = account
        self.queue: asyncio.Queue[order_pb2.StreamOrdersRequest | None] = asyncio.Queue()
        self.call = stub.StreamOrders(self._requests(), metadata=bearer(token))
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.rejects: Counter[str] = Counter()
        self.window: asyncio.Semaphore | None = None

    async def _requests(self):  # type: ignore[no-untyped-def]
        while (message := await self.queue.get()) is not None:
            yield message

    async def read(self) -> None:
        async for message in self.call:
            kind = message.WhichOneof("payload")
            if kind in ("ack", "reject"):
                rid = message.ack.request_id if kind == "ack" else message.reject.request_id
                started = self.sent.pop(rid, None)
                if started is not None:
                    self.latencies.append(time.perf_counter() - started)
                    if self.window is not None:
                        self.window.release()
                if kind == "reject":
                    self.rejects[ErrorDetails.from_status(message.reject.status).reason] += 1

    async def quote(self, stop: float, interval: float) -> None:
        await self.queue.put(
            order_pb2.StreamOrdersRequest(
                subscribe=order_pb2.StreamSubscribe(account_id=self.account)
            )
        )
        await asyncio.sleep(random.random() * interval)
        previous = ""
        while time.perf_counter() < stop:
            cid = await self._place()
            if previous:
                await self._cancel(previous)
            previous = cid
            await asyncio.sleep(interval)
        await asyncio.sleep(3)
        await self.queue.put(None)

    async def _place(self) -> str:
        """Send a resting buy (out of everyone's way); its client_order_id."""
        cid = uuid.uuid4().hex
        self.sent[cid] = time.perf_counter()
        place = order_pb2.PlaceOrderRequest(
            client_order_id=cid,
            market="BTC-USDT",
            side=t.SIDE_BUY,
            type=t.ORDER_TYPE_LIMIT,
            price=str(random.randint(90, 94)),
            quantity="0.1",
        )
        await self.queue.put(order_pb2.StreamOrdersRequest(place=place))
        return cid

    async def _cancel(self, client_order_id: str) -> None:
        rid = uuid.uuid4().hex
        self.sent[rid] = time.perf_counter()
        cancel = order_pb2.CancelOrderRequest(request_id=rid, client_order_id=client_order_id)
        await self.queue.put(order_pb2.StreamOrdersRequest(cancel=cancel))

    async def pump(self, stop: float, window: int) -> None:
        """Closed loop: keep `window` commands in flight (place a buy, cancel the one
        placed before it), as fast as the session's acks come back."""
        self.window = asyncio.Semaphore(window)
        await self.queue.put(
            order_pb2.StreamOrdersRequest(
                subscribe=order_pb2.StreamSubscribe(account_id=self.account)
            )
        )
        placed: list[str] = []
        while time.perf_counter() < stop:
            await self.window.acquire()
            if len(placed) > window:
                await self._cancel(placed.pop(0))
                continue
            placed.append(await self._place())
        await asyncio.sleep(3)
        await self.queue.put(None)


async def _fund(channel: grpc.aio.Channel, svc: str, ids: list[str]) -> None:
    """Deposit USDT to accounts that exist only in the ledger (the service acts for them)."""
    ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
    for i in range(0, len(ids), 500):
        await ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(
                transfers=[
                    ledger_pb2.Transfer(
                        id=f"bench-dep-{a}",
                        debit_account_id="sys:custody",
                        credit_account_id=a,
                        asset="USDT",
                        amount="100000",
                        kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                    )
                    for a in ids[i : i + 500]
                ]
            ),
            metadata=bearer(svc),
            timeout=60,
        )


async def streams(
    edge: str, channel: grpc.aio.Channel, svc: str, args: argparse.Namespace, pids: dict[str, int]
) -> tuple[float, float]:
    if args.replicas:  # sessions of their own accounts, spread over order's replicas
        users = await accounts(channel, svc, args.sessions, {"USDT": "100000"})
        ids, tokens = [u.account_id for u in users], [u.token for u in users]
    else:
        ids = [f"bench-mm-{uuid.uuid4().hex[:12]}" for _ in range(args.sessions)]
        tokens = [svc] * len(ids)
        await _fund(channel, svc, ids)
    stubs = [order_pb2_grpc.OrderServiceStub(channel)]
    quoters = [_Quoter(stubs[0], a, token) for a, token in zip(ids, tokens, strict=True)]
    readers = [asyncio.create_task(q.read()) for q in quoters]
    before = processes.cpu(pids)
    start = time.perf_counter()
    stop = start + args.stream_seconds
    sampled = asyncio.create_task(processes.peak_rss_mb(pids["order"], stop))
    if args.stream_window:
        await asyncio.gather(*(q.pump(stop, args.stream_window) for q in quoters))
    else:
        await asyncio.gather(*(q.quote(stop, args.quote_interval) for q in quoters))
    elapsed = time.perf_counter() - start
    after = processes.cpu(pids)
    rss = await sampled
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    latencies = [x for q in quoters for x in q.latencies]
    reasons: Counter[str] = Counter()
    for q in quoters:
        reasons.update(q.rejects)
    rejects = sum(reasons.values())
    mode = (
        f"window {args.stream_window}" if args.stream_window else f"every {args.quote_interval:g} s"
    )
    print("\n## StreamOrders: market-maker sessions quoting (place + cancel)\n")
    print("| sessions | mode | commands acked | rejects | commands/s | ack p50 ms | ack p99 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.sessions} | {mode} | {len(latencies)} | {rejects} | "
        f"{len(latencies) / elapsed:.0f} | "
        f"{percentile(latencies, 0.5) * 1e3:.1f} | {percentile(latencies, 0.99) * 1e3:.1f} |",
        flush=True,
    )
    line, cpu = _cpu_line(before, after, len(latencies))
    print(line.replace("per order", "per command"))
    print(f"<!-- order service peak RSS with {args.sessions} sessions open: {rss:.0f} MB -->")
    if reasons:
        print(f"<!-- rejects: {dict(reasons)} -->")
    return len(latencies) / elapsed, cpu


def result(
    steps: list[Step], noop_rps: float, stream: tuple[float, float] | None
) -> dict[str, float | None]:
    """The RESULT line's figures (None where this run did not measure them)."""
    lone = steps[0] if steps else None
    under = [s for s in steps if s.p99_ms < 250]
    best = max(under, key=lambda s: s.achieved, default=None)
    at_1000 = next((s for s in steps if s.rps == 1000), None)
    sustained = at_1000 is not None and at_1000.achieved >= 950

    def r(value: float | None, digits: int = 2) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "lone_p50_ms": r(lone.p50_ms if lone else None),
        "lone_p99_ms": r(lone.p99_ms if lone else None),
        "unary_orders_s": r(best.achieved if best else None, 0),
        "noop_edge_rps": r(noop_rps, 0),
        "p99_ms_at_1000": r(at_1000.p99_ms if sustained and at_1000 else None),
        "stream_cmds_s": r(stream[0] if stream else None, 0),
        "cpu_ms_per_order": r(best.cpu_ms if best else None),
        "cpu_ms_per_stream_cmd": r(stream[1] if stream else None),
    }


def replicas_label(replicas: dict[str, int]) -> str:
    """`order=2,marketdata=2`, or `1 each`."""
    named = [f"{name}={n}" for name, n in sorted(replicas.items()) if n > 1]
    return ",".join(named) or "1 each"


@dataclass(frozen=True)
class Outcome:
    """One configuration's figures."""

    label: str
    steps: list[Step]
    stream: tuple[float, float] | None
    result: dict[str, float | None]


async def _configuration(args: argparse.Namespace, replicas: dict[str, int] | None) -> Outcome:
    """The whole benchmark on one stack: the running one (--state-dir), or a fresh one
    with `replicas` (None: CEX_REPLICAS, as `cex up`)."""
    if args.state_dir:
        doc = json.loads((Path(args.state_dir) / "stack.json").read_text())
        stack = Stack(
            Path(args.state_dir), Ports(base=doc["base_port"], host=doc["host"]), dict(os.environ)
        )
        stack.replicas = dict(doc.get("replicas") or {})
        running = None
    else:
        stack = running = Stack(
            Path(tempfile.mkdtemp(prefix="cex-bench-")),
            free_ports(),
            dict(os.environ),
            replicas=replicas,
        )
        await running.start()
    args.run_replicas = stack.replicas
    label = replicas_label(stack.replicas)
    print(f"\n# stack: {label} (load average {os.getloadavg()[0]:.1f})", flush=True)
    try:
        svc = await operator_token(stack.edge, stack.service_secret)
        async with grpc.aio.insecure_channel(stack.edge) as channel:
            await lift_limits(channel, svc)
            pids = processes.pids(stack.state_dir)
            steps = await unary(stack.edge, channel, svc, args, pids) if args.rps else []
            stream = await streams(stack.edge, channel, svc, args, pids) if args.sessions else None
            noop_rps = await noop_edge(stack.edge, args.duration)
        figures = result(steps, noop_rps, stream)
        print("RESULT " + json.dumps({"replicas": label, **figures}), flush=True)
        return Outcome(label, steps, stream, figures)
    finally:
        if running is not None:
            await running.stop()


def _summary(outcomes: list[Outcome]) -> None:
    """Every configuration's figures side by side."""
    print("\n## by configuration\n")
    print("| replicas | offered orders/s | achieved | p50 ms | p99 ms | CPU ms per order |")
    print("|---|---:|---:|---:|---:|---:|")
    for o in outcomes:
        for st in o.steps:
            print(f"| {o.label} | {st.rps} | {st.achieved:.0f} | {st.p50_ms:.1f} | "
                  f"{st.p99_ms:.1f} | {st.cpu_ms:.2f} |")  # fmt: skip
    print("\n| replicas | stream commands/s | CPU ms per command | edge health Check calls/s |")
    print("|---|---:|---:|---:|")
    for o in outcomes:
        commands, cpu = o.stream if o.stream else (float("nan"), float("nan"))
        print(f"| {o.label} | {commands:.0f} | {cpu:.2f} | {o.result['noop_edge_rps']} |")


async def main(args: argparse.Namespace) -> None:
    print(f"# bench-trading ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(
        f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {sys.version.split()[0]}; load average at start {os.getloadavg()[0]:.1f}"
    )
    outcomes = []
    for replicas in args.replicas or [None]:
        outcomes.append(await _configuration(args, replicas))
    if len(outcomes) > 1:
        _summary(outcomes)


def _cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", help="use the stack running from this state dir")
    parser.add_argument(
        "--replicas",
        type=parse_replicas,
        action="append",
        metavar="SERVICE=N,...",
        help="processes per service on a fresh stack, as `cex up --replicas` "
        "(order=2,marketdata=2); repeat to run several configurations back to back",
    )
    parser.add_argument(
        "--rps",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[25, 200, 400, 700, 1000],
        help="comma-separated open-loop rates for the ghz sweep, the lone order's first "
        "('' to skip)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per rate")
    parser.add_argument("--concurrency", type=int, default=200, help="ghz workers")
    parser.add_argument("--sessions", type=int, default=50, help="stream sessions (0 to skip)")
    parser.add_argument("--quote-interval", type=float, default=1.0, help="s between quotes")
    parser.add_argument("--stream-seconds", type=float, default=20.0)
    parser.add_argument(
        "--stream-window",
        type=int,
        default=8,
        help="closed loop: keep this many commands in flight per session (0: quote on a "
        "timer, --quote-interval)",
    )
    args = parser.parse_args(argv)
    if args.state_dir and args.replicas:
        parser.error("--replicas starts stacks of its own; it does not go with --state-dir")
    return args


if __name__ == "__main__":
    asyncio.run(main(_cli()))
