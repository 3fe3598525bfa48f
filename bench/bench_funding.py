"""make bench-funding: deposit and withdrawal sagas end to end, on the whole local stack.

Starts the stack (PostgreSQL, NATS, Redis, every service, the chain simulator with
fast blocks, Envoy), then, through Envoy with a service credential:

1. deposits: `--deposits` transfers from the simulator to `--accounts` deposit
   addresses; the stack's funding sees them, waits for the confirmations and
   credits the ledger. Reported: deposits credited per second (first transfer
   sent to last credit).
2. withdrawals: `--withdrawals` requests from `--clients` concurrent clients;
   each runs hold -> risk -> broadcast -> confirmations -> post. Reported:
   withdrawals completed per second (first request to last completion), the
   RequestWithdrawal latency and the time from request to hold (p50/p99).

Step latency p50/p99 per step comes from the sagas' own step logs (STARTED to
SUCCEEDED, as committed in PostgreSQL). Everything shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import asyncpg
import grpc

from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2 as L
from cex.ledger.v1 import ledger_pb2_grpc
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis import ServiceCredentials

ETH_ADDRESS = "0x" + "c" * 40


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> str:
    return f"p50 {_pct(values, 0.5) * 1000:7.1f} ms  p99 {_pct(values, 0.99) * 1000:7.1f} ms"


async def _steps(conn: asyncpg.Connection, kind: str) -> dict[str, list[float]]:
    rows = await conn.fetch(
        """SELECT t.saga_id, t.idx, t.name, t.compensation, t.state, t.record_time
           FROM funding.saga_steps t JOIN funding.sagas s USING (saga_id)
           WHERE s.kind = $1 ORDER BY t.saga_id, t.idx""",
        kind,
    )
    started: dict[tuple[str, str], datetime] = {}
    out: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        key = (r["saga_id"], r["name"])
        if r["state"] == "STARTED":
            started[key] = r["record_time"]
        elif r["state"] == "SUCCEEDED" and key in started:
            out[r["name"]].append((r["record_time"] - started[key]).total_seconds())
    return out


async def _chain(target: str, method: str, request: dict[str, str]) -> dict[str, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            f"/chainsim.Chain/{method}",
            request_serializer=lambda r: json.dumps(r).encode(),
            response_deserializer=json.loads,
        )
        reply: dict[str, str] = await call(request, timeout=10)
        return reply


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    env = embedded_env()
    env.update(
        {
            "CHAINSIM_BLOCK_S": str(args.block_s),
            "FUNDING_POLL_S": "0.05",
            "FUNDING_CONFIRMATION_POLL_S": "0.1",
            "FUNDING_CHAIN_POLL_S": "0.05",
            "LEDGER_AUDIT_INTERVAL_S": "0",
        }
    )
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), free_ports(), env)
        await stack.start()
        try:
            await _bench(stack, args)
        finally:
            await stack.stop()


async def _bench(stack: Stack, args: argparse.Namespace) -> None:
    async def issue(key_id: str, secret: str) -> tuple[str, float]:
        from cex.auth.v1 import auth_pb2, auth_pb2_grpc

        async with grpc.aio.insecure_channel(stack.edge) as channel:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret), timeout=10
            )
        return reply.access_token, reply.expire_time.ToSeconds()

    credentials = ServiceCredentials("bench", issue, stack.service_secret)
    md = (("authorization", f"Bearer {await credentials.token()}"),)
    chain = f"{stack.ports.host}:{stack.ports.chainsim}"
    print(f"chain simulator: a block every {args.block_s}s; USDT needs 4 confirmations in, 3 out")
    conn = await asyncpg.connect(stack.database_url)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        accounts = [f"acc_bench{uuid.uuid4().hex[:8]}" for _ in range(args.accounts)]

        # -- deposits --------------------------------------------------------------
        addresses = [
            (
                await funding.GetDepositAddress(
                    F.GetDepositAddressRequest(account_id=a, asset="USDT"), metadata=md
                )
            ).deposit_address.address
            for a in accounts
        ]
        began = time.perf_counter()
        for i in range(args.deposits):
            await _chain(chain, "Deposit", {"address": addresses[i % len(addresses)],
                                            "asset": "USDT", "amount": "1000"})  # fmt: skip
        while True:
            credited = await conn.fetchval(
                """SELECT count(*) FROM funding.deposits
                   WHERE state = 'CREDITED' AND account_id = ANY($1)""",
                accounts,
            )
            if credited >= args.deposits:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - began
        print(
            f"deposits:    {args.deposits / elapsed:7.1f} credited/s "
            f"({args.deposits} deposits to {len(accounts)} addresses in {elapsed:.1f}s)"
        )
        for name, values in (await _steps(conn, "deposit")).items():
            print(f"  step {name:<20} {_ms(values)}")

        # -- withdrawals -------------------------------------------------------------
        queue = list(range(args.withdrawals))
        rpc: list[float] = []
        ids: list[str] = []

        async def client() -> None:
            while queue:
                i = queue.pop()
                t0 = time.perf_counter()
                reply = await funding.RequestWithdrawal(
                    F.RequestWithdrawalRequest(
                        request_id=f"bench-{i}", account_id=accounts[i % len(accounts)],
                        asset="USDT", amount="2", address=ETH_ADDRESS,
                    ),
                    metadata=md, timeout=30,
                )  # fmt: skip
                rpc.append(time.perf_counter() - t0)
                ids.append(reply.withdrawal.withdrawal_id)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        while True:
            done = await conn.fetchval(
                """SELECT count(*) FROM funding.withdrawals
                   WHERE withdrawal_id = ANY($1) AND state IN
                         ('COMPLETED', 'FAILED', 'REJECTED', 'CANCELLED')""",
                ids,
            )
            if done >= len(ids):
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - began
        states = await conn.fetch(
            """SELECT state, count(*) FROM funding.withdrawals
               WHERE withdrawal_id = ANY($1) GROUP BY 1""",
            ids,
        )
        to_hold = [
            r["d"]
            for r in await conn.fetch(
                """SELECT extract(epoch FROM t.record_time - w.create_time)::float8 AS d
                   FROM funding.withdrawals w JOIN funding.saga_steps t USING (saga_id)
                   WHERE w.withdrawal_id = ANY($1) AND t.name = 'ledger_hold'
                     AND t.state = 'SUCCEEDED' AND NOT t.compensation""",
                ids,
            )
        ]
        to_done = [
            r["d"]
            for r in await conn.fetch(
                """SELECT extract(epoch FROM complete_time - create_time)::float8 AS d
                   FROM funding.withdrawals WHERE withdrawal_id = ANY($1)
                     AND state = 'COMPLETED'""",
                ids,
            )
        ]
        print(
            f"withdrawals: {len(ids) / elapsed:7.1f} completed/s "
            f"({len(ids)} from {args.clients} clients in {elapsed:.1f}s; "
            f"{', '.join(f'{r[0]} {r[1]}' for r in states)})"
        )
        print(f"  RequestWithdrawal rpc     {_ms(rpc)}")
        print(f"  request -> hold           {_ms(to_hold)}")
        print(f"  request -> completed      {_ms(to_done)}")
        for name, values in (await _steps(conn, "withdrawal")).items():
            print(f"  step {name:<20} {_ms(values)}")
        audit = await ledger.AuditLedger(L.AuditLedgerRequest(), metadata=md, timeout=60)
        print(f"ledger audit balanced: {audit.balanced}")
    await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--deposits", type=int, default=200)
    parser.add_argument("--withdrawals", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--block-s", type=float, default=0.05)
    asyncio.run(main(parser.parse_args()))
