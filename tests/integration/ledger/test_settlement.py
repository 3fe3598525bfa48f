"""Settlement from match events on a private NATS, with a fake match for ReplayEvents:
the same trade delivered twice, out of order and after a gap settles once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import nats
import pytest

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2
from services.chassis import ensure_stream
from tests.conftest import Trust
from tests.integration.ledger.support import Ledger, deposit, hold, running_ledger

MARKET = "BTC-USDT"


class FakeMatch(match_pb2_grpc.MatchServiceServicer):
    """ReplayEvents from a list; records what was asked."""

    def __init__(self, events: Sequence[match_pb2.MatchEvent]) -> None:
        self.events = list(events)
        self.calls: list[tuple[str, int, int]] = []

    async def ReplayEvents(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append((request.market, request.from_seq, request.to_seq))
        wanted = [
            e
            for e in self.events
            if e.market == request.market
            and e.seq >= request.from_seq
            and (not request.to_seq or e.seq <= request.to_seq)
        ]
        for i in range(0, len(wanted), 2):
            yield match_pb2.ReplayEventsResponse(events=wanted[i : i + 2])


@pytest.fixture
async def fake_match() -> AsyncIterator[tuple[FakeMatch, str]]:
    fake = FakeMatch([])
    server = grpc.aio.server()
    match_pb2_grpc.add_MatchServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


def accepted(seq: int, order_id: str) -> match_pb2.MatchEvent:
    return match_pb2.MatchEvent(
        market=MARKET, seq=seq, accepted=match_pb2.OrderAccepted(order_id=order_id)
    )


def trade(
    seq: int,
    trade_id: str,
    quantity: str,
    quote: str,
    maker_remaining: str,
    taker_remaining: str,
    maker_fee: str,
    taker_fee: str,
) -> match_pb2.MatchEvent:
    return match_pb2.MatchEvent(
        market=MARKET,
        seq=seq,
        trade=match_pb2.Trade(
            trade_id=trade_id,
            price="100",
            quantity=quantity,
            quote_quantity=quote,
            taker_side=types_pb2.SIDE_BUY,
            maker_order_id="o-sell",
            maker_account_id="seller",
            maker_remaining_quantity=maker_remaining,
            maker_fee=maker_fee,
            maker_fee_asset="USDT",
            taker_order_id="o-buy",
            taker_account_id="buyer",
            taker_remaining_quantity=taker_remaining,
            taker_fee=taker_fee,
            taker_fee_asset="BTC",
        ),
    )


EVENTS = [
    accepted(1, "o-sell"),
    accepted(2, "o-buy"),
    trade(3, "t1", "0.2", "20", "0.3", "0.3", "0.02", "0.0002"),
    trade(4, "t2", "0.3", "30", "0", "0", "0.03", "0.0003"),
    match_pb2.MatchEvent(
        market=MARKET,
        seq=5,
        cancelled=match_pb2.OrderCancelled(order_id="o-ghost", remaining_quantity="0"),
    ),
]


async def _cursor(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT coalesce(max(last_seq), 0) FROM ledger.market_cursors WHERE market = $1",
            MARKET,
        )
    finally:
        await conn.close()


async def _wait_cursor(url: str, seq: int) -> None:
    for _ in range(200):
        if await _cursor(url) == seq:
            return
        await asyncio.sleep(0.05)
    assert await _cursor(url) == seq


async def _publish(url: str, events: Sequence[tuple[match_pb2.MatchEvent, str | None]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, "MATCH_EVENTS", ["match.events.>"])
        for event, msg_id in events:
            headers = {"Nats-Msg-Id": msg_id} if msg_id else None
            await js.publish(
                f"match.events.{event.market}",
                match_pb2.EventBatch(events=[event]).SerializeToString(),
                headers=headers,
            )
    finally:
        await nc.close()


async def test_trades_settle_once_through_duplicates_reordering_and_gaps(
    fresh_database_url: str, private_nats: str, fake_match: tuple[FakeMatch, str], trust: Trust
) -> None:
    fake, target = fake_match
    fake.events = EVENTS
    async with running_ledger(
        fresh_database_url, trust, nats_url=private_nats, match_target=target
    ) as ledger:
        await _setup(ledger)
        # seq 2 is lost; 4 arrives before 3; 3 arrives twice (the second copy with
        # another message id, so JetStream's duplicate window does not drop it).
        e = {ev.seq: ev for ev in EVENTS}
        await _publish(private_nats, [(e[1], f"{MARKET}:1"), (e[4], f"{MARKET}:4")])
        await _wait_cursor(fresh_database_url, 4)
        assert fake.calls == [(MARKET, 2, 3)]
        await _publish(private_nats, [(e[3], f"{MARKET}:3"), (e[3], None), (e[5], f"{MARKET}:5")])
        await _wait_cursor(fresh_database_url, 5)
        await _check(ledger, fresh_database_url)
    # A restart re-reads the stream from its durable position; the replay of
    # everything from 1 (e.g. a recreated consumer) settles nothing again.
    async with running_ledger(
        fresh_database_url, trust, nats_url=private_nats, match_target=target
    ) as ledger:
        await _publish(private_nats, [(ev, None) for ev in EVENTS])
        await asyncio.sleep(1.0)
        await _check(ledger, fresh_database_url)


async def _setup(ledger: Ledger) -> None:
    await ledger.ok(
        deposit("d-buyer", "buyer", "1000", "USDT"),
        deposit("d-seller", "seller", "1", "BTC"),
        hold("hold:o-buy", "buyer", "500", "USDT", reference="o-buy"),
        hold("hold:o-sell", "seller", "0.5", "BTC", reference="o-sell"),
    )


async def _check(ledger: Ledger, url: str) -> None:
    buyer_usdt = await ledger.balance("buyer", "USDT")
    assert (buyer_usdt.available, buyer_usdt.held) == ("950", "0")
    assert await ledger.available("buyer", "BTC") == "0.4995"
    seller_btc = await ledger.balance("seller", "BTC")
    assert (seller_btc.available, seller_btc.held, seller_btc.total) == ("0.5", "0", "0.5")
    assert await ledger.available("seller", "USDT") == "49.95"
    assert await ledger.available("sys:fees", "USDT") == "0.05"
    assert await ledger.available("sys:fees", "BTC") == "0.0005"
    assert await ledger.available("sys:orders", "USDT") == "0"
    audit = await ledger.audit()
    assert audit.balanced, audit
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM ledger.settled_trades") == 2
        kinds = await conn.fetch("SELECT kind, order_id FROM ledger.settlement_anomalies")
        assert [(r["kind"], r["order_id"]) for r in kinds] == [("HOLD_MISSING", "o-ghost")]
        holds = await conn.fetch(
            "SELECT id, state, remaining FROM ledger.transfers WHERE op = 2 ORDER BY id"
        )
        # The buyer's hold was used for 50 and its rest (450) released; the
        # seller's was used up exactly.
        assert [(r["id"], r["state"], r["remaining"]) for r in holds] == [
            ("hold:o-buy", 3, 0),
            ("hold:o-sell", 2, 0),
        ]
    finally:
        await conn.close()
