"""Public market data through Envoy, without a token: gRPC, streams and REST/JSON,
built by the stack's market data process from the stack's match (and on the
replicated stack by both of its market data processes, each asked in turn)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import grpc
import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t
from tests.replicas import Target, grew, served

MARKET = "ETH-BTC"


def _rest(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.mark.replicas
async def test_market_data_is_public_through_envoy(target: Target) -> None:
    stack, service_token = target.stack, await target.credentials.token()
    before = await served(stack, "marketdata")
    price = "0.91234"  # above any bid the other tests leave on ETH-BTC
    order_id = f"md-e2e-{uuid.uuid4().hex[:8]}"
    command = match_pb2.Command(
        command_id=f"place:{order_id}",
        market=MARKET,
        place=match_pb2.PlaceCommand(
            order_id=order_id, account_id="md-e2e", side=t.SIDE_SELL, type=t.ORDER_TYPE_LIMIT,
            quantity="0.5", price=price, maker_fee_rate="0", taker_fee_rate="0",
        ),
    )  # fmt: skip
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        # An order in the stack's match (a service call: it needs the token).
        submit = match_pb2_grpc.MatchServiceStub(channel).SubmitCommands(
            timeout=10, metadata=(("authorization", f"Bearer {service_token}"),)
        )
        await submit.write(match_pb2.SubmitCommandsRequest(commands=[command]))
        await submit.done_writing()
        reply = await submit.read()
        assert reply.results[0].status.code == 0
        seq = reply.results[0].events[-1].seq
        # Market data, no token at all.
        stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
        stream = stub.StreamOrderBook(md.StreamOrderBookRequest(market=MARKET, depth=50))
        first = await asyncio.wait_for(stream.read(), 30)
        assert first.WhichOneof("kind") == "snapshot" and not first.resynced
        for _ in range(200):
            book = (await stub.GetOrderBook(md.GetOrderBookRequest(market=MARKET))).book
            if book.seq >= seq:
                break
            await asyncio.sleep(0.05)
        assert book.seq >= seq
        assert price in [a.price for a in book.asks]
        # The stream caught up with the same order (snapshot or deltas).
        held = {a.price for a in first.snapshot.asks}
        at = first.snapshot.seq
        while at < seq:
            message = await asyncio.wait_for(stream.read(), 10)
            delta = message.delta
            assert delta.prev_seq == at
            held |= {a.price for a in delta.asks if a.quantity != "0"}
            at = delta.seq
        assert price in held
        stream.cancel()
        markets = (await stub.ListMarkets(md.ListMarketsRequest())).markets
        assert MARKET in [m.symbol for m in markets]
    # REST/JSON through the transcoder, no token either.
    base = f"http://{stack.edge}"
    status, body = _rest(f"{base}/v1/markets/{MARKET}/book?depth=5")
    assert status == 200
    book_json = body["book"]
    assert isinstance(book_json, dict) and int(str(book_json["seq"])) >= seq
    status, body = _rest(f"{base}/v1/markets/{MARKET}")
    assert status == 200 and body["market"]["tick_size"] == "0.00001"  # type: ignore[index]
    status, body = _rest(
        f"{base}/v1/markets/{MARKET}/candles?interval=CANDLE_INTERVAL_ONE_MINUTE&page_size=5"
    )
    assert status == 200 and isinstance(body["candles"], list)
    status, body = _rest(f"{base}/v1/markets/-/tickers")
    assert status == 200 and MARKET in [t["market"] for t in body["tickers"]]  # type: ignore[union-attr]
    # Round robin: the calls above went to every market data replica.
    assert grew(before, await served(stack, "marketdata")) == set(before)
