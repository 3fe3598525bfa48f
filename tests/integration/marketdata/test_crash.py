"""kill -9 of the market data process under load: it comes back consistent.

match runs in the test's process; market data is a real `python -m
services.marketdata.main`, killed with SIGKILL at random moments while orders
flow and a client follows the book, then started again. Afterwards the
client's book is match's, and the stored tape and candles hold every trade
match made exactly once.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import asyncpg
import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2_grpc
from cex_stack.supervisor import Stack
from tests.integration.marketdata.support import (
    MARKET,
    LocalBook,
    MatchInProcess,
    converged,
    follow,
    levels,
    marketdata_process,
)
from tests.integration.match.match_client import Client


async def _load(client: Client, stop: asyncio.Event) -> None:
    round_ = 0
    while not stop.is_set():
        await client.random_load(MARKET, 30, seed=round_, prefix=f"r{round_}")
        round_ += 1


async def _crash_loop(
    kills: int, stack: Stack, match: MatchInProcess, database_url: str, nats_url: str
) -> None:
    client = await match.start()
    process = marketdata_process(stack, database_url, nats_url, match.target)
    await process.start()
    stop = asyncio.Event()
    load = asyncio.create_task(_load(client, stop))
    local = LocalBook(1000)
    channel = grpc.aio.insecure_channel(process.target)
    follower = asyncio.create_task(
        follow(marketdata_pb2_grpc.MarketDataServiceStub(channel), local)
    )
    rng = random.Random(kills)
    try:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            await process.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await process.start()
        await asyncio.sleep(0.5)
        stop.set()
        await load
        engine = await converged(local, client, within_s=30)
        assert local.side("bids") == levels(engine.bids)
        assert local.side("asks") == levels(engine.asks)
        trades = [e for e in await client.replay(MARKET) if e.WhichOneof("kind") == "trade"]
        assert len(trades) > 50
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(100):
                stored = await conn.fetch(
                    "SELECT seq, quantity FROM marketdata.trades WHERE market = $1 ORDER BY seq",
                    MARKET,
                )
                if len(stored) >= len(trades):
                    break
                await asyncio.sleep(0.1)
            assert [r["seq"] for r in stored] == [e.seq for e in trades]
            volume = sum(Decimal(e.trade.quantity) for e in trades)
            for width in (60, 86_400):
                row = await conn.fetchrow(
                    "SELECT sum(volume) AS v, sum(trade_count) AS n FROM marketdata.candles"
                    " WHERE market = $1 AND width_s = $2",
                    MARKET,
                    width,
                )
                assert row is not None and (row["v"], row["n"]) == (volume, len(trades))
        finally:
            await conn.close()
    finally:
        stop.set()
        follower.cancel()
        await asyncio.gather(load, follower, return_exceptions=True)
        await channel.close()
        await process.stop()


async def test_kill_9_under_load_comes_back_consistent(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str
) -> None:
    await _crash_loop(1, stack, match, fresh_database_url, private_nats)


@pytest.mark.chaos
async def test_kill_9_many_times(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str
) -> None:
    await _crash_loop(15, stack, match, fresh_database_url, private_nats)
