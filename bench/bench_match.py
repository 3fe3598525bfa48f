"""In-process benchmark of the matching engine on exchange-core's command mix.

    make bench-match
    .venv/bin/python -m bench.bench_match [--commands N] [--seed S] [--gc on|freeze|off]

The mix follows exchange-core's order book benchmark: about 9% new GTC orders,
3% IOC orders, 6% cancels and 82% amends (mostly moves to a new price, some
quantity reductions), over a book of about 1,000 resting orders on ~750 price
levels from 1,000 accounts. Commands are generated up front with a fixed seed
(a shadow book keeps them valid: cancels and amends name live orders), so the
timed loop does nothing but ``book.submit``.

It reports throughput (one untimed-per-command pass), then per-command latency
percentiles from a second pass timing each submit with ``time.perf_counter_ns``,
then the same commands on the reference book for the speed ratio (fewer of them:
it re-sorts the book on every access), checking both give identical events.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis.markets import DEFAULT_CATALOG
from services.match import (
    AmendOrder,
    CancelOrder,
    Command,
    FastOrderBook,
    MarketSpec,
    OrderBook,
    PlaceOrder,
    ReferenceOrderBook,
    Side,
    TimeInForce,
)
from services.match.engine import MarketEngine, decode

SPEC = MarketSpec("BTC-USD", tick_size=1, lot_size=1, min_qty=1, max_qty=1_000_000)
CENTER = 100_000
HALF_SPREAD = 800  # each side spans 800 ticks; 1,000 orders land on ~750 of them
TARGET_ORDERS = 1_000
ACCOUNTS = 1_000


@dataclass
class Workload:
    setup: list[Command]
    commands: list[Command]
    mix: dict[str, int]
    events: dict[str, int]


def generate(n: int, seed: int) -> Workload:
    """Commands for ``n`` benchmark steps after a setup that fills the book."""
    rng = random.Random(seed)
    shadow = FastOrderBook(SPEC)
    next_id = 0
    ts = 0
    mix = {"gtc": 0, "ioc": 0, "cancel": 0, "move": 0, "reduce": 0}
    seen: dict[str, int] = {}

    def new_gtc(aggressive: bool) -> PlaceOrder:
        nonlocal next_id
        next_id += 1
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        bids, asks = shadow.l2(1)
        if aggressive and bids and asks:
            # a little through the touch: trades, then rests
            price = (
                asks[0][0] + rng.randint(0, 3)
                if side is Side.BUY
                else bids[0][0] - rng.randint(0, 3)
            )
        else:
            off = rng.randint(1, HALF_SPREAD)
            price = CENTER - off if side is Side.BUY else CENTER + off
        return PlaceOrder(ts, next_id, rng.randint(1, ACCOUNTS), side, rng.randint(1, 100), price)

    setup: list[Command] = []
    while len(shadow.l3()) < TARGET_ORDERS:
        ts += 1
        cmd = new_gtc(aggressive=False)
        setup.append(cmd)
        shadow.submit(cmd)

    live = {o.order_id: o for o in shadow.l3()}
    live_ids = list(live)
    commands: list[Command] = []
    for _ in range(n):
        ts += 1
        r = rng.random()
        size = len(live_ids)
        if r < 0.09:
            kind = "gtc"
        elif r < 0.12:
            kind = "ioc"
        elif r < 0.18:
            kind = "cancel" if size > TARGET_ORDERS else "gtc"  # hold the book near its size
        else:
            kind = "move" if rng.random() < 0.9 else "reduce"
        cmd: Command
        if kind == "gtc":
            cmd = new_gtc(aggressive=rng.random() < 0.1)
        elif kind == "ioc":
            next_id += 1
            side = Side.BUY if rng.random() < 0.5 else Side.SELL
            bids, asks = shadow.l2(1)
            ref = (asks[0][0] if side is Side.BUY else bids[0][0]) if bids and asks else CENTER
            price = ref + rng.randint(0, 5) if side is Side.BUY else ref - rng.randint(0, 5)
            cmd = PlaceOrder(
                ts,
                next_id,
                rng.randint(1, ACCOUNTS),
                side,
                rng.randint(1, 150),
                price,
                tif=TimeInForce.IOC,
            )
        else:
            oid = live_ids[rng.randrange(size)]
            o = live[oid]
            if kind == "cancel":
                cmd = CancelOrder(ts, oid, o.account_id)
            elif kind == "reduce" and o.leaves > 1:
                cmd = AmendOrder(ts, oid, o.account_id, qty=o.qty - rng.randint(1, o.leaves - 1))
            else:
                assert o.price is not None
                # a random walk of a few ticks, kept inside the band; orders near
                # the touch cross now and then and trade
                step = rng.randint(1, 12)
                up = rng.random() < 0.5
                if abs(o.price - CENTER) > HALF_SPREAD:
                    up = o.price < CENTER
                price = o.price + step if up else o.price - step
                cmd = AmendOrder(ts, oid, o.account_id, price=price)
        mix[kind] += 1
        commands.append(cmd)
        for event in shadow.submit(cmd).events:
            name = type(event).__name__
            seen[name] = seen.get(name, 0) + 1
            _track(shadow, event, live, live_ids)
    return Workload(setup, commands, mix, seen)


def _track(book: OrderBook, event: object, live: dict[int, object], live_ids: list[int]) -> None:
    """Keep the generator's view of live orders current from the events."""
    oid = getattr(event, "order_id", None)
    touched = [oid] if oid is not None else []
    for name in ("maker_order_id", "taker_order_id"):
        other = getattr(event, name, None)
        if other is not None:
            touched.append(other)
    for o in touched:
        view = book.order(o)
        if view is None:
            if o in live:
                del live[o]
                live_ids.remove(o)
        else:
            if o not in live:
                live_ids.append(o)
            live[o] = view


def prepared(cls: type[OrderBook], setup: Sequence[Command]) -> OrderBook:
    book: OrderBook = cls(SPEC)  # type: ignore[call-arg]
    for cmd in setup:
        book.submit(cmd)
    return book


def throughput(book: OrderBook, commands: Sequence[Command]) -> tuple[float, float]:
    """Commands per second by the wall clock and by this process's CPU time."""
    submit = book.submit
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for cmd in commands:
        submit(cmd)
    wall_s = (time.perf_counter_ns() - start) / 1e9
    cpu_s = (time.process_time_ns() - cpu) / 1e9
    return len(commands) / wall_s, len(commands) / cpu_s


def latencies(book: OrderBook, commands: Sequence[Command]) -> list[int]:
    submit = book.submit
    clock = time.perf_counter_ns
    out = [0] * len(commands)
    for i, cmd in enumerate(commands):
        t0 = clock()
        submit(cmd)
        out[i] = clock() - t0
    return out


def pct(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * p / 100))] / 1000


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--commands", type=int, default=1_000_000)
    ap.add_argument("--reference-commands", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="throughput passes (median reported)")
    ap.add_argument("--snapshot-orders", type=int, default=20_000)
    ap.add_argument(
        "--gc",
        choices=["on", "freeze", "off"],
        default="freeze",
        help="on: default GC; freeze: gc.freeze() after setup (default); off: disabled",
    )
    args = ap.parse_args(argv)

    print(f"python   {sys.version.split()[0]} ({platform.python_implementation()})")
    print(
        f"machine  {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs,"
        f" {platform.processor() or _cpu_model()}"
    )
    t0 = time.perf_counter()
    work = generate(args.commands, args.seed)
    total = sum(work.mix.values())
    took = time.perf_counter() - t0
    print(
        f"workload {total:,} commands, seed {args.seed}, generated in {took:.1f}s; mix "
        + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in work.mix.items())
    )

    print(
        "events   "
        + ", ".join(f"{k} {v / total:.2f}" for k, v in sorted(work.events.items()))
        + " per command"
    )
    fast = prepared(FastOrderBook, work.setup)
    bids, asks = fast.l2()
    print(f"book     {len(fast.l3())} orders on {len(bids) + len(asks)} levels at start")
    snap = fast.snapshot()

    def fresh(cls: type[OrderBook]) -> OrderBook:
        book = cls.restore(snap)
        gc.collect()
        if args.gc == "freeze":
            gc.freeze()
        elif args.gc == "off":
            gc.disable()
        return book

    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(args.repeat):
        book = fresh(FastOrderBook)
        wall, cpu = throughput(book, work.commands)
        walls.append(wall)
        cpus.append(cpu)
        gc.unfreeze()
        gc.enable()
    walls.sort()
    cpus.sort()
    events = book.seq - fast.seq
    bids, asks = book.l2()
    print(
        f"fast     {walls[len(walls) // 2]:,.0f} commands/s wall (median of {args.repeat}, best"
        f" {walls[-1]:,.0f}); {cpus[len(cpus) // 2]:,.0f}/s by process CPU time;"
        f" {events / len(work.commands):.2f} events/command;"
        f" {len(book.l3())} orders on {len(bids) + len(asks)} levels at end"
    )
    lat = sorted(latencies(fresh(FastOrderBook), work.commands))
    print(
        f"latency  p50 {pct(lat, 50):.1f} us, p99 {pct(lat, 99):.1f} us,"
        f" p99.9 {pct(lat, 99.9):.1f} us, max {lat[-1] / 1000:.0f} us (gc {args.gc})"
    )

    n = min(args.reference_commands, len(work.commands))
    if n:
        sample = work.commands[:n]
        ref = fresh(ReferenceOrderBook)
        ref_rate = throughput(ref, sample)[0]
        check = fresh(FastOrderBook)
        for cmd in sample:
            check.submit(cmd)
        same = check.state_hash() == ref.state_hash()
        fast_rate = throughput(fresh(FastOrderBook), sample)[0]
        print(
            f"ref      {ref_rate:,.0f} commands/s on the first {n:,}; fast/ref = "
            f"{fast_rate / ref_rate:,.0f}x on the same commands; same final hash: {same}"
        )
    gc.enable()
    gc.unfreeze()
    snapshot_cost(args.snapshot_orders)
    return 0


def snapshot_cost(orders: int) -> None:
    """What a group snapshot costs with `orders` resting: the document the writer takes
    inside its batch, then the canonical bytes and hash its save task makes."""
    market = DEFAULT_CATALOG.markets["BTC-USDT"]
    engine = MarketEngine(market)
    rng = random.Random(1)
    for i in range(orders):
        buy = i % 2 == 0
        ticks = rng.randrange(1, 500)
        place = match_pb2.PlaceCommand(
            order_id=f"o{i}", client_order_id=f"c{i}", account_id=f"a{i % ACCOUNTS}",
            side=types_pb2.SIDE_BUY if buy else types_pb2.SIDE_SELL,
            type=types_pb2.ORDER_TYPE_LIMIT, quantity="0.1",
            price=str(Decimal(90 if buy else 110) + (-ticks if buy else ticks) * market.tick_size),
            maker_fee_rate="0.001", taker_fee_rate="0.002",
        )  # fmt: skip
        command = match_pb2.Command(command_id=f"p{i}", market=market.symbol, place=place)
        engine.apply(decode(market, command), i + 1, i + 1)
    taken, written = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        document = {"markets": {market.symbol: engine.document()}}
        t1 = time.perf_counter()
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        hashlib.sha256(data).hexdigest()
        taken.append(t1 - t0)
        written.append(time.perf_counter() - t1)
    print(
        f"snapshot {orders:,} resting orders: document {1000 * min(taken):.0f} ms (inside the"
        f" batch), bytes and hash {1000 * min(written):.0f} ms (the save task),"
        f" {len(data) / 1e6:.1f} MB (best of 3)"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


if __name__ == "__main__":
    raise SystemExit(main())
