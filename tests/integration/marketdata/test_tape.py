"""The tape, candles and tickers agree with match's trades; every RPC validates its input;
a feed fed through a lossy, duplicating, reordering NATS still reaches match's book."""

from __future__ import annotations

import asyncio
import random
import sys
from decimal import Decimal
from pathlib import Path

import grpc
import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cex.marketdata.v1 import marketdata_pb2 as md
from cex_stack import probes
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports
from services.chassis import ErrorDetails
from tests.integration.marketdata.support import (
    MARKET,
    LocalBook,
    MarketDataInProcess,
    MatchInProcess,
    converged,
    follow,
    levels,
)


async def _all_trades(stub: object) -> list[md.Trade]:
    out: list[md.Trade] = []
    token = ""
    while True:
        reply = await stub.ListTrades(  # type: ignore[attr-defined]
            md.ListTradesRequest(market=MARKET, page_size=37, page_token=token)
        )
        out += reply.trades
        token = reply.next_page_token
        if not token:
            return out


async def test_tape_candles_and_ticker_agree_with_match_trades(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str
) -> None:
    client = await match.start()
    marketdata = MarketDataInProcess(stack, fresh_database_url, private_nats)
    stub = await marketdata.start(match.target)
    trades_stream = stub.StreamTrades(md.StreamTradesRequest(markets=[MARKET]))
    streamed: list[md.Trade] = []

    async def read_trades() -> None:
        async for reply in trades_stream:
            streamed.extend(reply.trades)

    reader = asyncio.create_task(read_trades())
    try:
        results = await client.random_load(MARKET, 300, seed=5)
        engine_trades = [e for r in results for e in r.events if e.WhichOneof("kind") == "trade"]
        assert len(engine_trades) > 20
        for _ in range(200):
            tape = await _all_trades(stub)
            if len(tape) == len(engine_trades) and len(streamed) == len(engine_trades):
                break
            await asyncio.sleep(0.05)
        # The tape: every trade once, newest first, as match reported it.
        assert [t.seq for t in tape] == sorted((e.seq for e in engine_trades), reverse=True)
        by_seq = {e.seq: e for e in engine_trades}
        for t in tape:
            e = by_seq[t.seq]
            assert (t.trade_id, t.price, t.quantity, t.quote_quantity, t.taker_side) == (
                e.trade.trade_id, e.trade.price, e.trade.quantity,
                e.trade.quote_quantity, e.trade.taker_side,
            )  # fmt: skip
        assert [t.seq for t in streamed] == [t.seq for t in reversed(tape)]
        volume = sum(Decimal(t.quantity) for t in tape)
        quote = sum(Decimal(t.quote_quantity) for t in tape)
        prices = [Decimal(t.price) for t in reversed(tape)]
        # Candles at every width add up to the tape.
        for interval in (md.CANDLE_INTERVAL_ONE_MINUTE, md.CANDLE_INTERVAL_ONE_DAY):
            candles = (
                await stub.GetCandles(md.GetCandlesRequest(market=MARKET, interval=interval))
            ).candles
            assert sum(Decimal(c.volume) for c in candles) == volume
            assert sum(Decimal(c.quote_volume) for c in candles) == quote
            assert sum(c.trade_count for c in candles) == len(tape)
            assert Decimal(candles[0].open) == prices[0]
            assert Decimal(candles[-1].close) == prices[-1]
            assert max(Decimal(c.high) for c in candles) == max(prices)
            assert min(Decimal(c.low) for c in candles) == min(prices)
        # The ticker too, and its top of book is match's.
        for _ in range(100):
            ticker = (await stub.GetTicker(md.GetTickerRequest(market=MARKET))).ticker
            if ticker.trade_count == len(tape):
                break
            await asyncio.sleep(0.05)
        assert ticker.trade_count == len(tape)
        assert Decimal(ticker.volume) == volume and Decimal(ticker.quote_volume) == quote
        assert (Decimal(ticker.open_price), Decimal(ticker.last_price)) == (prices[0], prices[-1])
        assert (Decimal(ticker.high_price), Decimal(ticker.low_price)) == (max(prices), min(prices))
        assert Decimal(ticker.price_change) == prices[-1] - prices[0]
        engine = await client.book(MARKET, depth=1)
        assert (ticker.best_bid_price, ticker.best_ask_price) == (
            engine.bids[0].price if engine.bids else "",
            engine.asks[0].price if engine.asks else "",
        )
        tickers = (await stub.ListTickers(md.ListTickersRequest())).tickers
        assert [t.market for t in tickers] == [MARKET]
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await marketdata.stop()


async def _error(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return ErrorDetails.from_rpc_error(failure.value)


async def _stream_error(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    return ErrorDetails.from_rpc_error(failure.value)


async def test_every_method_validates_its_input(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str
) -> None:
    await match.start()
    marketdata = MarketDataInProcess(stack, fresh_database_url, private_nats)
    stub = await marketdata.start(match.target)
    later, earlier = Timestamp(seconds=2_000_000_000), Timestamp(seconds=1_000_000_000)
    try:
        cases = [
            (stub.GetMarket(md.GetMarketRequest()), "MARKETDATA_MISSING_MARKET", "market"),
            (stub.GetMarket(md.GetMarketRequest(market="DOGE-USDT")),
             "MARKETDATA_UNKNOWN_MARKET", "market"),
            (stub.ListMarkets(md.ListMarketsRequest(page_size=-1)),
             "MARKETDATA_INVALID_PAGE_SIZE", "page_size"),
            (stub.ListMarkets(md.ListMarketsRequest(page_token="garbage!")),
             "MARKETDATA_INVALID_PAGE_TOKEN", "page_token"),
            (stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET, depth=1001)),
             "MARKETDATA_INVALID_DEPTH", "depth"),
            (stub.GetOrderBook(md.GetOrderBookRequest(market="")),
             "MARKETDATA_MISSING_MARKET", "market"),
            (stub.ListTrades(md.ListTradesRequest(market=MARKET, start_time=later,
                                                  end_time=earlier)),
             "MARKETDATA_INVALID_TIME_RANGE", "end_time"),
            (stub.GetTicker(md.GetTickerRequest(market="X")),
             "MARKETDATA_UNKNOWN_MARKET", "market"),
            (stub.ListTickers(md.ListTickersRequest(markets=[MARKET, "X"])),
             "MARKETDATA_UNKNOWN_MARKET", "markets[1]"),
            (stub.GetCandles(md.GetCandlesRequest(market=MARKET)),
             "MARKETDATA_INVALID_INTERVAL", "interval"),
            (stub.GetCandles(md.GetCandlesRequest(
                market=MARKET, interval=md.CANDLE_INTERVAL_ONE_HOUR, page_token="bm9wZQ==")),
             "MARKETDATA_INVALID_PAGE_TOKEN", "page_token"),
        ]  # fmt: skip
        for call, reason, field in cases:
            details = await _error(call)
            assert (details.reason, details.domain) == (reason, "marketdata"), reason
            assert [v.field for v in details.violations] == [field], reason
            code = (
                grpc.StatusCode.NOT_FOUND
                if "UNKNOWN" in reason
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            assert details.code == code
        streams = [
            (stub.StreamOrderBook(md.StreamOrderBookRequest(market=MARKET, depth=-1)),
             "MARKETDATA_INVALID_DEPTH"),
            (stub.StreamOrderBook(md.StreamOrderBookRequest(market="X")),
             "MARKETDATA_UNKNOWN_MARKET"),
            (stub.StreamTrades(md.StreamTradesRequest(markets=["X"])),
             "MARKETDATA_UNKNOWN_MARKET"),
            (stub.StreamTickers(md.StreamTickersRequest(markets=["X"])),
             "MARKETDATA_UNKNOWN_MARKET"),
        ]  # fmt: skip
        for call, reason in streams:
            assert (await _stream_error(call)).reason == reason
        # Valid calls: the catalog, paged.
        first = await stub.ListMarkets(md.ListMarketsRequest(page_size=2))
        rest = await stub.ListMarkets(md.ListMarketsRequest(page_token=first.next_page_token))
        symbols = [m.symbol for m in [*first.markets, *rest.markets]]
        assert symbols == ["BTC-USDT", "ETH-BTC", "ETH-USDT"] and not rest.next_page_token
        market = (await stub.GetMarket(md.GetMarketRequest(market=MARKET))).market
        assert (market.tick_size, market.lot_size, market.base_asset_scale) == (
            "0.01",
            "0.00001",
            8,
        )
    finally:
        await marketdata.stop()


async def _nats_server(tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_ports().nats
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "nats-server"), "-a", "127.0.0.1", "-p", str(port),
        "--jetstream", "-sd", str(tmp_path / "nats2"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"nats://127.0.0.1:{port}"
    for _ in range(100):
        if await probes.nats_ok(url):
            return process, url
        await asyncio.sleep(0.05)
    raise RuntimeError("second nats-server did not come up")


async def test_a_lossy_reordering_bus_is_repaired_from_match(
    stack: Stack, match: MatchInProcess, fresh_database_url: str, private_nats: str, tmp_path: Path
) -> None:
    """Market data listens on its own NATS, where the test relays match's events losing
    10%, repeating 10% and swapping neighbours: gaps are filled through ReplayEvents and
    the lost tail is found by asking match when the bus goes quiet."""
    client = await match.start()
    process, lossy_url = await _nats_server(tmp_path)
    marketdata = MarketDataInProcess(stack, fresh_database_url, lossy_url)
    relay_in = await nats.connect(private_nats)
    relay_out = await nats.connect(lossy_url)
    rng = random.Random(9)
    held: list[bytes] = []

    async def relay(msg: nats.aio.msg.Msg) -> None:
        roll = rng.random()
        if roll < 0.1:
            return
        if roll < 0.2:
            await relay_out.publish(msg.subject, msg.data)
        if roll < 0.3 and not held:
            held.append(msg.data)
            return
        await relay_out.publish(msg.subject, msg.data)
        while held:
            await relay_out.publish(msg.subject, held.pop())

    await relay_in.subscribe(f"match.events.{MARKET}", cb=relay)
    try:
        stub = await marketdata.start(match.target)
        local = LocalBook(1000)
        follower = asyncio.create_task(follow(stub, local))
        await client.random_load(MARKET, 400, seed=11)
        engine = await converged(local, client)
        assert local.side("bids") == levels(engine.bids)
        assert local.side("asks") == levels(engine.asks)
        feed = marketdata.server._services[0][2]._hub.feeds[MARKET]  # type: ignore[union-attr]
        assert feed.gaps > 0 and feed.restarts == 0
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    finally:
        await marketdata.stop()
        await relay_in.close()
        await relay_out.close()
        process.kill()
        await process.wait()
