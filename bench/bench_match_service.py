"""The match service path: SubmitCommands with journaling and publishing on.

    make bench-match          (after the in-process engine figures)
    .venv/bin/python -m bench.bench_match_service [--commands N] [--runs 1x64,100x8]

Starts the local stack (for its PostgreSQL, `synchronous_commit = on`), an
empty database and a NATS server with JetStream of its own (so the stack's
ledger does not try to settle the benchmark's trades), then runs match as its
own process (`python -m services.match.main`, as `cex up` does) for BTC-USDT.
The command stream is bench_match's exchange-core mix (the same generator and
seed), put on the wire as decimal strings: quantities are scaled by 1,000 lots
so every order clears the market's minimum notional.

Each run opens one SubmitCommands stream and keeps `window` batches of `batch`
commands in flight; a batch is acknowledged once its commands are journaled
(group commit) and applied. Reported: commands/s acknowledged, and p50/p99 of
the time from sending a batch to its acknowledgement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import grpc

from bench.bench_match import CENTER, generate
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2
from cex_stack import probes
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports
from services.chassis.authn import service_auth_interceptors
from services.chassis.markets import DEFAULT_CATALOG
from services.match import AmendOrder, CancelOrder, Command, PlaceOrder, Side, TimeInForce

MARKET = DEFAULT_CATALOG.markets["BTC-USDT"]
QTY_SCALE = 1_000  # lots per bench_match quantity unit: 0.01 BTC at about 1,000 USDT


def wire(cmd: Command, n: int) -> match_pb2.Command:
    """One bench_match command as match's wire command (ids by number)."""
    out = match_pb2.Command(command_id=f"b{n}", market=MARKET.symbol)
    if isinstance(cmd, PlaceOrder):
        assert cmd.price is not None
        out.place.CopyFrom(
            match_pb2.PlaceCommand(
                order_id=f"o{cmd.order_id}",
                account_id=f"a{cmd.account_id}",
                side=types_pb2.SIDE_BUY if cmd.side is Side.BUY else types_pb2.SIDE_SELL,
                type=types_pb2.ORDER_TYPE_LIMIT,
                time_in_force=(
                    types_pb2.TIME_IN_FORCE_IOC
                    if cmd.tif is TimeInForce.IOC
                    else types_pb2.TIME_IN_FORCE_GTC
                ),
                price=MARKET.price(cmd.price),
                quantity=MARKET.quantity(cmd.qty * QTY_SCALE),
                maker_fee_rate="0.001",
                taker_fee_rate="0.002",
            )
        )
    elif isinstance(cmd, CancelOrder):
        out.cancel.CopyFrom(
            match_pb2.CancelCommand(
                order_id=f"o{cmd.order_id}",
                account_id=f"a{cmd.account_id}",
                reason=types_pb2.CANCEL_REASON_USER_REQUESTED,
            )
        )
    elif isinstance(cmd, AmendOrder):
        out.amend.CopyFrom(
            match_pb2.AmendCommand(
                order_id=f"o{cmd.order_id}",
                account_id=f"a{cmd.account_id}",
                price=MARKET.price(cmd.price) if cmd.price is not None else "",
                quantity=MARKET.quantity(cmd.qty * QTY_SCALE) if cmd.qty is not None else "",
            )
        )
    else:
        raise TypeError(cmd)
    return out


async def submit(
    stub: match_pb2_grpc.MatchServiceStub, commands: Sequence[match_pb2.Command], batch: int,
    window: int,
) -> tuple[float, list[float]]:  # fmt: skip
    """Send `commands` in batches with `window` in flight; (seconds, sorted latencies)."""
    call = stub.SubmitCommands()
    slots = asyncio.Semaphore(window)
    sent: list[float] = []
    latencies: list[float] = []
    batches = [commands[i : i + batch] for i in range(0, len(commands), batch)]

    async def reader() -> None:
        for i in range(len(batches)):
            reply = await call.read()
            assert isinstance(reply, match_pb2.SubmitCommandsResponse)
            latencies.append(time.perf_counter() - sent[i])
            bad = [r for r in reply.results if r.status.code]
            assert not bad, bad[0]
            slots.release()

    began = time.perf_counter()
    reading = asyncio.create_task(reader())
    for chunk in batches:
        await slots.acquire()
        sent.append(time.perf_counter())
        await call.write(match_pb2.SubmitCommandsRequest(commands=chunk))
    await reading
    await call.done_writing()
    return time.perf_counter() - began, sorted(latencies)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    runs = [tuple(int(x) for x in run.split("x")) for run in args.runs.split(",")]
    work = generate(args.commands * len(runs), args.seed)
    setup = [wire(c, i) for i, c in enumerate(work.setup)]
    offset = len(setup)
    commands = [wire(c, offset + i) for i, c in enumerate(work.commands)]
    mix = ", ".join(f"{k} {v}" for k, v in work.mix.items())
    print(f"workload: {len(setup)} resting orders around {MARKET.price(CENTER)}, then "
          f"{len(commands):,} commands ({mix})")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), free_ports(), env)
        await stack.start()
        nats_port = free_ports().nats
        nats = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "nats-server"), "-a", "127.0.0.1",
            "-p", str(nats_port), "--jetstream", "-sd", str(Path(state) / "bench-nats"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        match: asyncio.subprocess.Process | None = None
        try:
            name = f"bench_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(stack.admin_database_url)
            await admin.execute(f"CREATE DATABASE {name}")
            await admin.close()
            url = stack.database_url.rsplit("/", 1)[0] + f"/{name}"
            port = free_ports().edge
            match = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.match.main",
                env={
                    **env,
                    "CEX_GRPC_PORT": str(port),
                    "CEX_JWKS_URL": stack.ports.jwks_url,
                    "DATABASE_URL": url,
                    "NATS_URL": f"nats://127.0.0.1:{nats_port}",
                    "CEX_MATCH_MARKETS": MARKET.symbol,
                    "CEX_LOG_LEVEL": "WARNING",
                },
            )  # fmt: skip
            target = f"127.0.0.1:{port}"
            for _ in range(300):
                if await probes.grpc_health(target, "cex.match.v1.MatchService"):
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("match did not become healthy")
            async with grpc.aio.insecure_channel(
                target, interceptors=service_auth_interceptors(stack.credentials("bench"))
            ) as channel:
                stub = match_pb2_grpc.MatchServiceStub(channel)
                await submit(stub, setup, 100, 4)
                for (batch, window), start in zip(
                    runs, range(0, len(commands), args.commands), strict=True
                ):
                    part = commands[start : start + args.commands]
                    elapsed, latencies = await submit(stub, part, batch, window)
                    print(
                        f"batch {batch:>4} x {window:>2} in flight: "
                        f"{len(part) / elapsed:8,.0f} commands/s  "
                        f"ack p50 {_pct(latencies, 0.5) * 1000:7.2f} ms  "
                        f"p99 {_pct(latencies, 0.99) * 1000:7.2f} ms  ({len(part):,} commands)"
                    )
                book = await stub.GetOrderBook(
                    match_pb2.GetOrderBookRequest(market=MARKET.symbol), timeout=10
                )
            conn = await asyncpg.connect(url)
            counts = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT xmin::text) AS tx FROM match.journal"
            )
            assert counts is not None
            rows, groups = counts["n"], counts["tx"]
            await conn.close()
            print(f"journal: {rows:,} commands in {groups:,} transactions; "
                  f"{book.book.seq:,} events; synchronous_commit on")  # fmt: skip
        finally:
            if match is not None:
                match.terminate()
                await match.wait()
            nats.kill()
            await nats.wait()
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=20_000, help="commands per run")
    parser.add_argument("--runs", default="1x64,20x16,200x4", help="batch x window, ...")
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
