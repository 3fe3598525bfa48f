"""Redis bridges a replica that is still catching up; StreamTickers conflates per market."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as redis

from cex.marketdata.v1 import marketdata_pb2 as md
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails
from tests.integration.marketdata.support import (
    MARKET,
    MarketDataInProcess,
    MatchInProcess,
    levels,
)


@pytest.fixture
async def private_redis(redis_url: str) -> AsyncIterator[str]:
    """A Redis database of the stack's server that nothing else writes to."""
    url = redis_url.rsplit("/", 1)[0] + f"/{random.randrange(5, 15)}"
    client = redis.Redis.from_url(url)
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


async def test_a_replica_catching_up_answers_from_redis(
    stack: Stack,
    match: MatchInProcess,
    fresh_database_url: str,
    private_nats: str,
    private_redis: str,
) -> None:
    client = await match.start()
    await client.random_load(MARKET, 80, seed=3)
    first = MarketDataInProcess(stack, fresh_database_url, private_nats, redis_url=private_redis)
    stub = await first.start(match.target)
    engine = await client.book(MARKET)
    cache = redis.Redis.from_url(private_redis)
    unreachable = socket.socket()
    unreachable.bind(("127.0.0.1", 0))
    try:
        for _ in range(200):  # the snapshot and the ticker reach Redis
            data = await cache.get(f"md:{MARKET}:book")
            ticker = await cache.get(f"md:{MARKET}:ticker")
            if data and ticker and md.OrderBook.FromString(data).seq == engine.seq:
                break
            await asyncio.sleep(0.05)
        book = md.GetOrderBookRequest(market=MARKET, depth=3)
        live = (await stub.GetOrderBook(book, timeout=10)).book
        await first.stop()
        # A replica that cannot reach match: its feed never gets ready. (The port is
        # bound here and never listened on: refused, and no other process's.)
        dead = f"127.0.0.1:{unreachable.getsockname()[1]}"
        second = MarketDataInProcess(
            stack, fresh_database_url, private_nats, redis_url=private_redis
        )
        stub = await second.start(dead)
        try:
            stored = (await stub.GetOrderBook(book, timeout=10)).book
            assert stored.seq == engine.seq
            assert levels(stored.bids) == levels(engine.bids)[:3] == levels(live.bids)
            assert levels(stored.asks) == levels(live.asks) and stored.checksum == live.checksum
            ticker_reply = await stub.GetTicker(md.GetTickerRequest(market=MARKET), timeout=10)
            assert ticker_reply.ticker.market == MARKET
        finally:
            await second.stop()
        # Without Redis and without match: NOT_READY.
        third = MarketDataInProcess(stack, fresh_database_url, private_nats)
        stub = await third.start(dead)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET), timeout=10)
            details = ErrorDetails.from_rpc_error(failure.value)
            assert (details.code, details.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "MARKETDATA_NOT_READY",
            )
        finally:
            await third.stop()
    finally:
        unreachable.close()
        await cache.aclose()


async def test_stream_tickers_sends_the_current_ticker_then_changes(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str
) -> None:
    client = await match.start()
    marketdata = MarketDataInProcess(stack, fresh_database_url, private_nats)
    stub = await marketdata.start(match.target)
    try:
        await client.random_load(MARKET, 30, seed=4, prefix="a")
        call = stub.StreamTickers(md.StreamTickersRequest(markets=[MARKET]))
        first = await asyncio.wait_for(call.read(), 10)
        assert [t.market for t in first.tickers] == [MARKET]
        results = await client.random_load(MARKET, 60, seed=8, prefix="b")
        trades = sum(e.WhichOneof("kind") == "trade" for r in results for e in r.events)
        assert trades > 0
        want = first.tickers[0].trade_count + trades
        latest = first.tickers[0]
        while latest.trade_count < want:  # one ticker per update, conflated
            reply = await asyncio.wait_for(call.read(), 10)
            assert [t.market for t in reply.tickers] == [MARKET]
            latest = reply.tickers[0]
        assert latest.trade_count == want
        assert latest.seq > first.tickers[0].seq
        call.cancel()
    finally:
        await marketdata.stop()
