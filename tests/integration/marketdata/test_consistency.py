"""Local books kept from StreamOrderBook and md.<market>.book reach match's own book.

Random order load on a real match service (in process, real PostgreSQL and
JetStream) while several clients follow the book through market data: full
depth, a shallow depth (levels enter and leave its top), one that drops 1% of
the deltas on purpose (it must notice and resync), and one on core NATS. At
the end each equals match's L2 book at the same seq, levels and checksum.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex_stack.supervisor import Stack
from tests.integration.marketdata.support import (
    MARKET,
    GapDetected,
    LocalBook,
    MarketDataInProcess,
    MatchInProcess,
    checksum,
    converged,
    follow,
    levels,
)


@pytest.fixture
async def marketdata(
    stack: Stack, fresh_database_url: str, private_nats: str, match: MatchInProcess
) -> AsyncIterator[MarketDataInProcess]:
    running = MarketDataInProcess(stack, fresh_database_url, private_nats)
    yield running
    await running.stop()


def _same(local: LocalBook, engine: object) -> None:
    assert local.side("bids") == levels(engine.bids)  # type: ignore[attr-defined]
    assert local.side("asks") == levels(engine.asks)  # type: ignore[attr-defined]


async def test_followers_reach_the_engine_book(
    match: MatchInProcess, marketdata: MarketDataInProcess
) -> None:
    client = await match.start()
    await client.random_load(MARKET, 40, seed=1, prefix="early")  # market data starts late
    stub = await marketdata.start(match.target)
    books = [LocalBook(1000), LocalBook(3), LocalBook(1000)]
    gaps: list[int] = []
    followers = [
        asyncio.create_task(follow(stub, books[0])),
        asyncio.create_task(follow(stub, books[1])),
        asyncio.create_task(follow(stub, books[2], drop_every=25, gaps=gaps)),
    ]
    nats_book = LocalBook(20)
    nc = await nats.connect(marketdata.settings.nats_url)

    async def on_book(msg: nats.aio.msg.Msg) -> None:
        message = md.StreamOrderBookResponse.FromString(msg.data)
        if nats_book.seq < 0 and message.WhichOneof("kind") != "snapshot":
            return  # wait for a snapshot
        try:
            nats_book.apply(message)
        except GapDetected:
            nats_book.seq = -1

    await nc.subscribe(f"md.{MARKET}.book", cb=on_book)
    try:
        await client.random_load(MARKET, 600, seed=2, prefix="load")
        for local in books:
            engine = await converged(local, client)
            _same(local, engine)
        assert gaps, "dropping deltas went unnoticed"
        assert books[2].snapshots > 1
        engine = await converged(nats_book, client)
        _same(nats_book, engine)
        # The checksum a client computes is the one the server sent.
        reply = await stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET, depth=25))
        assert reply.book.seq == engine.seq
        assert reply.book.checksum == checksum(levels(reply.book.bids), levels(reply.book.asks))
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await nc.close()
