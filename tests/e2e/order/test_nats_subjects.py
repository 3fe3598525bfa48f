"""Direct NATS clients get what the documentation says (issue 18).

The subjects, payload types, the trades stream and its message ids are read
from the README and ADR 0009 (they must agree with each other), then a client
subscribes to exactly those subjects on the stack's NATS, a trade is made, and
each message must decode as the documented type and carry that trade. If the
docs and the code part ways, this fails.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import nats
from google.protobuf.message import Message

from cex.marketdata.v1 import marketdata_pb2
from cex.order.v1 import order_pb2
from cex_stack.supervisor import Stack
from tests.e2e.order.support import BUY, MARKET, SELL, Exchange

ROOT = Path(__file__).resolve().parents[3]
_SUBJECT = r"`md\.<market>\.(\w+)`"


def _flat(path: str) -> str:
    return " ".join((ROOT / path).read_text().split())


def readme_subjects() -> tuple[dict[str, str], dict[str, str]]:
    """(subject suffix -> payload type, subject suffix -> JetStream stream) per the README."""
    text = _flat("README.md")
    payloads = dict(re.findall(_SUBJECT + r" \((?:one )?([A-Z]\w+)", text))
    streams = {s: n for n, s in re.findall(r"stream `(\w+)`, " + _SUBJECT, text)}
    return payloads, streams


def adr_subjects() -> tuple[dict[str, str], dict[str, str], str]:
    """The same per ADR 0009, and its Nats-Msg-Id template for the stream."""
    text = _flat("docs/adr/0009-market-data.md")
    payloads = dict(re.findall(_SUBJECT + r" \([^)]*\):? (?:one )?([A-Z]\w+)", text))
    streams = dict(re.findall(_SUBJECT + r" \(JetStream stream `(\w+)`", text))
    found = re.search(r"Nats-Msg-Id `([^`]+)`", text)
    assert found is not None, "ADR 0009 names the trades' message id"
    return payloads, streams, found.group(1)


def test_the_readme_and_the_adr_document_the_same_subjects() -> None:
    readme, readme_streams = readme_subjects()
    adr, adr_streams, _ = adr_subjects()
    assert readme == adr == {"book": "StreamOrderBookResponse", "ticker": "Ticker",
                             "trades": "Trade"}  # fmt: skip
    assert readme_streams == adr_streams == {"trades": "MD_TRADES"}


async def _drain(queue: asyncio.Queue[Any], until: float) -> list[Any]:
    found = []
    while (left := until - time.monotonic()) > 0:
        try:
            found.append(await asyncio.wait_for(queue.get(), left))
        except TimeoutError:
            break
    return found


async def test_a_nats_client_reads_every_documented_subject_as_documented(
    stack: Stack, exchange: Exchange
) -> None:
    payloads, _ = readme_subjects()
    _, streams, msg_id = adr_subjects()
    types: dict[str, type[Message]] = {
        suffix: getattr(marketdata_pb2, name) for suffix, name in payloads.items()
    }
    nc = await nats.connect(stack.nats_url)
    try:
        core: dict[str, asyncio.Queue[Any]] = {}
        for suffix in payloads:
            if suffix in streams:
                continue
            core[suffix] = asyncio.Queue()
            await nc.subscribe(f"md.{MARKET}.{suffix}", cb=core[suffix].put)
        # A client starts from what the book subject gives it; the first message also
        # says market data's feed of the market is live (a trade made before that is
        # caught up into the tape but never reaches MD_TRADES).
        first = await asyncio.wait_for(core["book"].get(), 30)
        await core["book"].put(first)
        began = time.monotonic()
        maker = await exchange.trader({"USDT": "100"}, name="nats-maker")
        taker = await exchange.trader({"BTC": "1"}, name="nats-taker")
        await maker.place(side=BUY, price="100", quantity="0.1")
        sold = await taker.place(side=SELL, price="100", quantity="0.1")
        deadline = time.monotonic() + 10
        while True:  # the order service's view of fills follows match's events
            fills = await taker.orders.ListFills(
                order_pb2.ListFillsRequest(market=MARKET), metadata=taker.md, timeout=10
            )
            mine = [f for f in fills.fills if f.order_id == sold.order_id]
            if mine:
                break
            assert time.monotonic() < deadline, (sold, fills)
            await asyncio.sleep(0.1)
        fill = mine[0]
        # Core subjects: a snapshot at least every 5 s, so 7 s see one.
        book = [types["book"].FromString(m.data) for m in await _drain(core["book"], began + 7)]
        snapshots = [b.snapshot for b in book if b.WhichOneof("kind") == "snapshot"]
        assert snapshots, f"no snapshot on md.{MARKET}.book in 7 s ({len(book)} messages)"
        assert all(s.market == MARKET for s in snapshots)
        assert all(len(s.bids) <= 100 and len(s.asks) <= 100 for s in snapshots)  # depth 100
        held = None
        for message in book:  # deltas chain by prev_seq from what a client holds
            kind = message.WhichOneof("kind")
            part = message.snapshot if kind == "snapshot" else message.delta
            if kind == "delta" and held is not None:
                assert message.delta.prev_seq == held, (held, message)
            held = part.seq
        tickers = [types["ticker"].FromString(m.data) for m in await _drain(core["ticker"], 0)]
        deadline = time.monotonic() + 5
        while not any(t.last_price == fill.price for t in tickers):
            assert time.monotonic() < deadline, tickers
            tickers += [
                types["ticker"].FromString(m.data)
                for m in await _drain(core["ticker"], time.monotonic() + 1)
            ]
        assert all(t.market == MARKET for t in tickers)
        # The stream: replayable, one documented payload per message, the documented id.
        js = nc.jetstream()
        for suffix, stream in streams.items():
            subject = f"md.{MARKET}.{suffix}"
            info = await js.stream_info(stream)
            assert any(
                re.fullmatch(s.replace(".", r"\.").replace("*", r"[^.]+").replace(">", ".+"),
                             subject)
                for s in info.config.subjects or []
            ), info.config.subjects  # fmt: skip
            sub = await js.subscribe(subject, ordered_consumer=True)
            want = msg_id.replace("<market>", MARKET).replace("<trade_id>", fill.trade_id)
            deadline = time.monotonic() + 10
            seen = []
            while True:
                try:
                    message = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
                except nats.errors.TimeoutError:
                    state = (await js.stream_info(stream)).state
                    raise AssertionError(
                        f"trade {fill.trade_id} not on {subject}: {seen}, {state}"
                    ) from None
                trade = types[suffix].FromString(message.data)
                seen.append(trade.trade_id)
                if trade.trade_id == fill.trade_id:
                    break
            await sub.unsubscribe()
            assert message.headers is not None and message.headers.get("Nats-Msg-Id") == want
            assert (trade.market, trade.price, trade.quantity) == (
                MARKET,
                fill.price,
                fill.quantity,
            )
    finally:
        await nc.close()
