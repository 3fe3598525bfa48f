"""make bench-ledger: ledger throughput and latency, synchronous_commit on.

Starts the local stack on a fresh state directory and calls its ledger
directly (not through the edge): each CreateTransfers goes on to the balance
owner, match's writer, which applies it and commits it with its journal (ADR
0013), and is read back. It funds `--accounts` accounts, then measures
CreateTransfers from this process:

1. single: `--single-clients` concurrent clients, one transfer per request;
2. batched: `--batch-clients` concurrent clients, `--batch` transfers per request;
3. batch x1: the last 10 batches from one client (latency without queueing).

Reported: transfers/s (committed and acknowledged), and p50/p99 of the request
latency. Every transfer is a real debit/credit between random funded accounts.
The load generator shares the machine's cores with the ledger and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc

from cex.ledger.v1 import ledger_pb2 as K
from cex.ledger.v1 import ledger_pb2_grpc
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import SERVICES, free_ports
from services.chassis.authn import service_auth_interceptors


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _transfer(tid: str, debit: str, credit: str, amount: str, kind: int) -> K.Transfer:
    return K.Transfer(
        id=tid,
        debit_account_id=debit,
        credit_account_id=credit,
        asset="USDT",
        amount=amount,
        kind=kind,  # type: ignore[arg-type]
    )


async def _run(
    stub: ledger_pb2_grpc.LedgerServiceStub, requests: list[K.CreateTransfersRequest], clients: int
) -> tuple[float, list[float]]:
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def client() -> None:
        while queue:
            request = queue.pop()
            began = time.perf_counter()
            reply = await stub.CreateTransfers(request, timeout=60)
            latencies.append(time.perf_counter() - began)
            failed = [r for r in reply.results if r.status.code]
            assert not failed, failed[0]

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - began, sorted(latencies)


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), free_ports(), env)
        await stack.start()
        try:
            conn = await asyncpg.connect(stack.database_url)
            print(f"synchronous_commit = {await conn.fetchval('SHOW synchronous_commit')}")
            await conn.close()
            ledger = next(s for s in SERVICES if s.name == "ledger")
            async with grpc.aio.insecure_channel(
                f"{stack.ports.host}:{stack.ports.grpc(ledger)}",
                interceptors=service_auth_interceptors(stack.credentials("bench")),
            ) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                accounts = [f"acct-{i}" for i in range(args.accounts)]
                funding = [
                    _transfer(f"fund-{a}", "sys:custody", a, "1000000", K.TRANSFER_KIND_DEPOSIT)
                    for a in accounts
                ]
                await _run(
                    stub,
                    [
                        K.CreateTransfersRequest(transfers=funding[i : i + 1000])
                        for i in range(0, len(funding), 1000)
                    ],
                    4,
                )

                def work(prefix: str, n: int) -> list[K.Transfer]:
                    out = []
                    for i in range(n):
                        a, b = rng.sample(accounts, 2)
                        amount = f"{rng.randint(1, 100)}.{rng.randint(0, 99):02d}"
                        out.append(
                            _transfer(f"{prefix}-{i}", a, b, amount, K.TRANSFER_KIND_ADJUSTMENT)
                        )
                    return out

                single = [K.CreateTransfersRequest(transfers=[t]) for t in work("s", args.single)]
                items = work("b", args.batched)
                batched = [
                    K.CreateTransfersRequest(transfers=items[i : i + args.batch])
                    for i in range(0, len(items), args.batch)
                ]
                await _run(stub, single[:200], args.single_clients)  # warm up
                lone = batched[-10:]
                batched = batched[:-10]
                for label, requests, clients, count in (
                    ("single", single[200:], args.single_clients, len(single) - 200),
                    ("batched", batched, args.batch_clients, len(batched) * args.batch),
                    ("batch x1", lone, 1, len(lone) * args.batch),
                ):
                    elapsed, latencies = await _run(stub, requests, clients)
                    print(
                        f"{label:>8}: {count / elapsed:9.0f} transfers/s  "
                        f"p50 {_percentile(latencies, 0.5) * 1000:7.2f} ms  "
                        f"p99 {_percentile(latencies, 0.99) * 1000:7.2f} ms  "
                        f"({count} transfers, {len(requests)} requests of "
                        f"{len(requests[0].transfers)}, {clients} concurrent clients)"
                    )
        finally:
            await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=10_200)
    parser.add_argument("--single-clients", type=int, default=64)
    parser.add_argument("--batched", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batch-clients", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
