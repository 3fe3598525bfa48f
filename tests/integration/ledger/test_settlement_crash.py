"""Settlement survives kill -9: a real ledger process consumes a market's events
from JetStream (some of them never published: filled from ReplayEvents) and is
killed twice mid-stream; every trade is settled exactly once and every hold
ends resolved."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import nats

from cex.ledger.v1 import ledger_pb2 as K
from cex.ledger.v1 import ledger_pb2_grpc
from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2
from services.chassis import ensure_stream
from tests.conftest import Trust
from tests.integration.ledger.support import deposit, hold
from tests.integration.ledger.test_crash import ledger_process
from tests.integration.ledger.test_settlement import FakeMatch, fake_match  # noqa: F401

MARKET = "BTC-USDT"
LOST = set(range(150, 156))  # never published: the ledger must ask match


def _events(
    rng: random.Random, buyers: int, sellers: int, trades: int
) -> list[match_pb2.MatchEvent]:
    events = []
    for n in range(1, trades + 1):
        b, s = rng.randrange(buyers), rng.randrange(sellers)
        events.append(
            match_pb2.MatchEvent(
                market=MARKET,
                seq=n,
                trade=match_pb2.Trade(
                    trade_id=str(n),
                    price="100",
                    quantity="0.001",
                    quote_quantity="0.1",
                    taker_side=types_pb2.SIDE_BUY,
                    maker_order_id=f"sell-{s}",
                    maker_account_id=f"seller-{s}",
                    maker_remaining_quantity="1",
                    taker_order_id=f"buy-{b}",
                    taker_account_id=f"buyer-{b}",
                    taker_remaining_quantity="1",
                    taker_fee="0.00001",
                    taker_fee_asset="BTC",
                ),
            )
        )
    seq = trades
    for side, count in (("buy", buyers), ("sell", sellers)):
        for i in range(count):
            seq += 1
            events.append(
                match_pb2.MatchEvent(
                    market=MARKET,
                    seq=seq,
                    cancelled=match_pb2.OrderCancelled(
                        order_id=f"{side}-{i}", remaining_quantity="0"
                    ),
                )
            )
    return events


async def _cursor(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval(
        "SELECT last_seq FROM ledger.market_cursors WHERE market = $1", MARKET
    )
    return value or 0


async def test_settlement_is_exactly_once_across_kill_9(
    fresh_database_url: str,
    private_nats: str,
    fake_match: tuple[FakeMatch, str],  # noqa: F811
    trust: Trust,
) -> None:
    fake, target = fake_match
    rng = random.Random(5)
    buyers, sellers, trades = 10, 10, 400
    events = _events(rng, buyers, sellers, trades)
    fake.events = events
    env = {"NATS_URL": private_nats, "LEDGER_MATCH_TARGET": target, "LEDGER_SETTLEMENT": "on"}
    async with ledger_process(fresh_database_url, trust, env) as ledger:
        async with trust.channel(f"127.0.0.1:{ledger.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            setup = [deposit(f"d-b{i}", f"buyer-{i}", "1000") for i in range(buyers)]
            setup += [deposit(f"d-s{i}", f"seller-{i}", "10", "BTC") for i in range(sellers)]
            setup += [hold(f"hold:buy-{i}", f"buyer-{i}", "100") for i in range(buyers)]
            setup += [hold(f"hold:sell-{i}", f"seller-{i}", "1", "BTC") for i in range(sellers)]
            reply = await stub.CreateTransfers(K.CreateTransfersRequest(transfers=setup))
            assert all(r.status.code == 0 for r in reply.results)
        nc = await nats.connect(private_nats)
        js = nc.jetstream()
        await ensure_stream(js, "MATCH_EVENTS", ["match.events.>"])

        async def publish(chunk: list[match_pb2.MatchEvent]) -> None:
            for event in chunk:
                if event.seq not in LOST:
                    await js.publish(
                        f"match.events.{MARKET}",
                        match_pb2.EventBatch(events=[event]).SerializeToString(),
                        headers={"Nats-Msg-Id": f"{MARKET}:{event.seq}-{event.seq}"},
                    )

        conn = await asyncpg.connect(fresh_database_url)
        try:
            await publish(events[:200])
            # kill -9 twice while it settles; events keep arriving meanwhile
            for threshold, more in ((60, events[200:320]), (250, events[320:])):
                for _ in range(6000):
                    if await _cursor(conn) >= threshold:
                        break
                    await asyncio.sleep(0.002)
                await ledger.kill()
                await publish(more)
                await ledger.start()
            for _ in range(600):
                if await _cursor(conn) == len(events):
                    break
                await asyncio.sleep(0.05)
            assert await _cursor(conn) == len(events)
            assert await conn.fetchval("SELECT count(*) FROM ledger.settled_trades") == trades
            legs = await conn.fetchval(
                "SELECT count(*) FROM ledger.transfers WHERE id LIKE 'trade:%'"
            )
            assert legs == trades * 5  # two hold uses, two payouts, one fee each
            assert await conn.fetchval("SELECT count(*) FROM ledger.settlement_anomalies") == 0
            open_holds = await conn.fetchval(
                "SELECT count(*) FROM ledger.transfers WHERE op = 2 AND state = 1"
            )
            assert open_holds == 0
            bought = await conn.fetch(
                "SELECT account_id, credits_posted - debits_posted AS total"
                " FROM ledger.accounts WHERE asset = 'BTC' AND account_id LIKE 'buyer-%'"
            )
        finally:
            await conn.close()
            await nc.close()
        per_buyer = {f"buyer-{i}": 0 for i in range(buyers)}
        for event in events[:trades]:
            per_buyer[event.trade.taker_account_id] += 100_000 - 1_000
        assert {r["account_id"]: r["total"] for r in bought} == {
            k: v for k, v in per_buyer.items() if v
        }
        async with trust.channel(f"127.0.0.1:{ledger.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            audit = await stub.AuditLedger(K.AuditLedgerRequest())
            assert audit.balanced
            assert all(a.pending_transfer_count == 0 for a in audit.results)
    assert ledger.kills == 2
