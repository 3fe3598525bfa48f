"""The match service on real PostgreSQL and JetStream: journal, dedupe, books, replay, restart."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import nats
import pytest

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t
from services.chassis import ChassisSettings, ErrorDetails, Server, ensure_stream
from services.match.config import MatchSettings
from services.match.server import build_server
from tests.conftest import Trust
from tests.integration.match.match_client import Client, limit, place


class Running:
    def __init__(self, database_url: str, nats_url: str, snapshot_every: int, trust: Trust) -> None:
        self.trust = trust
        self.settings = ChassisSettings(
            service="match",
            database_url=database_url,
            nats_url=nats_url,
            shutdown_grace_s=1,
            jwks_url=trust.jwks_url,
        )
        self.match_settings = MatchSettings(
            markets=("BTC-USDT", "ETH-USDT"), snapshot_every=snapshot_every
        )
        self.server: Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> Client:
        self.server = await build_server(self.settings, match_settings=self.match_settings)
        port = await self.server.start()
        self.channel = self.trust.channel(f"127.0.0.1:{port}")
        return Client(match_pb2_grpc.MatchServiceStub(self.channel))

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0.5)


@pytest.fixture
async def running(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> AsyncIterator[Running]:
    r = Running(fresh_database_url, private_nats, snapshot_every=7, trust=trust)
    yield r
    await r.stop()


async def test_commands_are_journaled_answered_in_order_and_deduplicated(running: Running) -> None:
    client = await running.start()
    sell = limit("s1", "maker", t.SIDE_SELL, "0.5", "65000")
    buy = limit("b1", "taker", t.SIDE_BUY, "0.2", "65000")
    (r1, r2) = await client.submit([place("c1", sell), place("c2", buy)])
    assert (r1.status.code, r1.command_seq, r1.duplicate) == (0, 1, False)
    assert [e.WhichOneof("kind") for e in r2.events] == ["accepted", "trade", "level_changed"]
    assert r2.events[1].trade.quantity == "0.2"
    assert [e.seq for e in [*r1.events, *r2.events]] == list(range(1, 6))
    # The same command again: the original result, not a second order.
    (again,) = await client.submit([place("c2", buy)])
    assert again.duplicate and again.command_seq == 2
    assert list(again.events) == list(r2.events)
    # The same id with another body is refused and journals nothing.
    other = limit("b2", "taker", t.SIDE_BUY, "0.3", "65000")
    (reused,) = await client.submit([place("c2", other)])
    assert reused.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert ErrorDetails.from_status(reused.status).reason == "MATCH_COMMAND_ID_REUSED"
    book = await client.book("BTC-USDT")
    assert book.seq == 5
    assert [(a.price, a.quantity, a.order_count) for a in book.asks] == [("65000", "0.3", 1)]


async def test_a_client_order_is_placed_once_whatever_its_order_id(running: Running) -> None:
    """(account, client_order_id) is a place's key in the journal, across markets and
    restarts: a gateway that retries with a new order id gets the first outcome."""
    client = await running.start()
    first = limit("o-1", "alice", t.SIDE_BUY, "0.1", "60000")
    (placed,) = await client.submit([place("place:o-1", first)])
    retry = limit("o-2", "alice", t.SIDE_BUY, "0.1", "60000")
    retry.client_order_id = first.client_order_id
    (again,) = await client.submit([place("place:o-2", retry)])
    assert again.duplicate and list(again.events) == list(placed.events)
    assert again.events[0].accepted.order_id == "o-1"
    # Other fields under the same key: refused, naming the first order.
    other = limit(
        "o-3",
        "alice",
        t.SIDE_BUY,
        "0.2",
        "60000",
    )
    other.client_order_id = first.client_order_id
    (refused,) = await client.submit([place("place:o-3", other, "ETH-USDT")])
    details = ErrorDetails.from_status(refused.status)
    assert (refused.status.code, details.reason) == (
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        "MATCH_DUPLICATE_CLIENT_ORDER_ID",
    )
    assert details.metadata["order_id"] == "o-1"
    # Another account's key is its own; and a restart keeps the keys.
    mallory = limit("o-4", "mallory", t.SIDE_BUY, "0.1", "60000")
    mallory.client_order_id = first.client_order_id
    (own,) = await client.submit([place("place:o-4", mallory)])
    assert not own.duplicate and own.events[0].accepted.order_id == "o-4"
    await running.stop()
    client = await running.start()
    (after,) = await client.submit([place("place:o-5", retry)])
    assert after.duplicate and after.events[0].accepted.order_id == "o-1"
    # The journaled place travels in its accepted event (a read model builds the order).
    assert after.events[0].accepted.place == first


async def test_a_retry_is_the_same_order_when_its_request_fingerprint_is(
    running: Running,
) -> None:
    """A gateway's retry of a market order may carry another protection price: with
    fingerprints, those decide, not the command's fields."""
    client = await running.start()
    first = limit("f-1", "alice", t.SIDE_BUY, "0.1", "60000")
    first.request_fingerprint = "same-request"
    (placed,) = await client.submit([place("place:f-1", first)])
    assert placed.events[0].accepted.place.request_fingerprint == "same-request"
    moved = limit("f-2", "alice", t.SIDE_BUY, "0.1", "60100")
    moved.client_order_id, moved.request_fingerprint = first.client_order_id, "same-request"
    (again,) = await client.submit([place("place:f-2", moved)])
    assert again.duplicate and again.events[0].accepted.order_id == "f-1"
    moved.order_id, moved.request_fingerprint = "f-3", "another-request"
    (refused,) = await client.submit([place("place:f-3", moved)])
    assert ErrorDetails.from_status(refused.status).reason == "MATCH_DUPLICATE_CLIENT_ORDER_ID"


async def test_open_order_limits_are_counted_by_the_writer(running: Running) -> None:
    """The limits a place carries hold against the writer's own count of the account's
    working orders (across the group's markets, and in one), also after a restart."""
    client = await running.start()

    def capped(order_id: str, side: int, price: str, market_cap: int = 0) -> match_pb2.PlaceCommand:
        command = limit(order_id, "capped", side, "0.1", price)
        command.max_open_orders, command.max_market_open_orders = 3, market_cap
        return command

    results = await client.submit(
        [
            place("l-1", capped("l-1", t.SIDE_BUY, "60000")),
            place("l-2", capped("l-2", t.SIDE_BUY, "1900"), "ETH-USDT"),
            place("l-3", capped("l-3", t.SIDE_BUY, "59000", market_cap=1)),  # 1 in BTC already
            place("l-4", capped("l-4", t.SIDE_BUY, "59000")),
            place("l-5", capped("l-5", t.SIDE_SELL, "1950"), "ETH-USDT"),  # the 4th
        ]
    )
    reasons = [ErrorDetails.from_status(r.status).reason for r in results]
    assert reasons == ["", "", "RISK_OPEN_ORDERS_LIMIT_EXCEEDED", "",
                       "RISK_OPEN_ORDERS_LIMIT_EXCEEDED"]  # fmt: skip
    assert ErrorDetails.from_status(results[2].status).metadata == {
        "limit": "1",
        "market": "BTC-USDT",
    }
    assert not results[4].events  # refused before the book: not journaled
    # A fill frees its place; so does a restart not forget the others.
    await client.submit([place("t-1", limit("t-1", "taker", t.SIDE_SELL, "0.1", "60000"))])
    await running.stop()
    client = await running.start()
    (fourth, fifth) = await client.submit(
        [
            place("l-6", capped("l-6", t.SIDE_SELL, "1950"), "ETH-USDT"),
            place("l-7", capped("l-7", t.SIDE_SELL, "1960"), "ETH-USDT"),
        ]
    )
    assert (fourth.status.code, ErrorDetails.from_status(fifth.status).reason) == (
        0,
        "RISK_OPEN_ORDERS_LIMIT_EXCEEDED",
    )


async def test_bad_input_is_refused_before_the_journal(running: Running) -> None:
    client = await running.start()
    off_tick = limit("o1", "a", t.SIDE_BUY, "1", "100.001")
    unknown = place("c2", limit("o2", "a", t.SIDE_BUY, "1", "100"), market="DOGE-USDT")
    (bad, missing) = await client.submit([place("c1", off_tick), unknown])
    details = ErrorDetails.from_status(bad.status)
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert details.reason == "MATCH_INVALID_TICK"
    assert [v.field for v in details.violations] == ["command.place.price"]
    assert bad.command_seq == 0 and not bad.events
    assert missing.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert ErrorDetails.from_status(missing.status).reason == "MATCH_UNKNOWN_MARKET"
    # A well-formed order the book refuses is journaled as a rejection.
    tiny = limit("o3", "a", t.SIDE_BUY, "0.00001", "100")  # notional 0.001 < 5 USDT
    (rejected,) = await client.submit([place("c3", tiny)])
    assert rejected.status.code == 0 and rejected.command_seq == 1
    assert rejected.events[0].rejected.reason == "MATCH_NOTIONAL_BELOW_MIN"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.book("DOGE-USDT")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert ErrorDetails.from_rpc_error(err.value).reason == "MATCH_UNKNOWN_MARKET"
    assert (await client.book("BTC-USDT")).seq == 1
    # More commands in one request than the writer takes: each is refused, unjournaled.
    crowd = [place(f"x{i}", limit(f"x{i}", "a", t.SIDE_BUY, "1", "100")) for i in range(1001)]
    results = await client.submit(crowd)
    assert len(results) == 1001 and all(r.command_seq == 0 for r in results)
    details = ErrorDetails.from_status(results[0].status)
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MATCH_BATCH_TOO_LARGE",
    )
    assert [v.field for v in details.violations] == ["commands"]
    assert (await client.book("BTC-USDT")).seq == 1


async def test_l3_book_shows_orders_in_priority(running: Running) -> None:
    client = await running.start()
    await client.submit(
        [
            place("c1", limit("b1", "a", t.SIDE_BUY, "1", "100")),
            place("c2", limit("b2", "b", t.SIDE_BUY, "2", "100")),
            place("c3", limit("b3", "a", t.SIDE_BUY, "1", "101")),
            place("c4", limit("s1", "c", t.SIDE_SELL, "1", "105")),
        ]
    )
    book = await client.book("BTC-USDT", l3=True)
    assert [(o.order_id, o.account_id, o.price, o.quantity) for o in book.bid_orders] == [
        ("b3", "a", "101", "1"),
        ("b1", "a", "100", "1"),
        ("b2", "b", "100", "2"),
    ]
    assert [o.order_id for o in book.ask_orders] == ["s1"]
    assert len((await client.book("BTC-USDT", l3=True, depth=1)).bid_orders) == 1


async def test_replay_events_reads_the_journal_and_follows(running: Running) -> None:
    client = await running.start()
    results = await client.random_load("BTC-USDT", 60, seed=3)
    produced = [e for r in results for e in r.events]
    assert [e.seq for e in produced] == list(range(1, len(produced) + 1))
    assert await client.replay("BTC-USDT") == produced
    middle = len(produced) // 2
    assert await client.replay("BTC-USDT", middle, middle + 3) == produced[middle - 1 : middle + 3]
    follower = client.follow("BTC-USDT", len(produced) + 1)
    more = await client.random_load("BTC-USDT", 5, seed=4, prefix="x")
    fresh = [e for r in more for e in r.events]
    assert [await anext(follower) for _ in fresh] == fresh
    await follower.aclose()


async def test_events_reach_jetstream_with_their_sequence(
    running: Running, private_nats: str
) -> None:
    client = await running.start()
    results = await client.random_load("ETH-USDT", 40, seed=5)
    produced = [e for r in results for e in r.events]
    received = await _drain(private_nats, "match.events.ETH-USDT", len(produced))
    assert [m.seq for m in received] == [e.seq for e in produced]
    assert received == produced


async def _drain(url: str, subject: str, count: int) -> list[match_pb2.MatchEvent]:
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
        out = []
        while len(out) < count:
            msg = await sub.next_msg(timeout=10)
            events = list(match_pb2.EventBatch.FromString(msg.data).events)
            assert events, "an EventBatch carries at least one event"
            assert msg.headers is not None
            first, last = events[0], events[-1]
            assert msg.headers["Nats-Msg-Id"] == f"{first.market}:{first.seq}-{last.seq}"
            out += events
        return out
    finally:
        await nc.close()


async def test_restart_recovers_the_same_book_and_republishes_lost_events(
    running: Running, private_nats: str
) -> None:
    client = await running.start()
    results = await client.random_load("BTC-USDT", 50, seed=9)
    before = await client.book("BTC-USDT", l3=True)
    await running.stop()
    # JetStream loses the stream (its storage is gone; acknowledged writes with it).
    nc = await nats.connect(private_nats)
    await nc.jetstream().delete_stream("MATCH_EVENTS")
    await nc.close()
    client = await running.start()
    after = await client.book("BTC-USDT", l3=True)
    assert after == before
    assert after.seq == sum(len(r.events) for r in results)
    produced = [e for r in results for e in r.events]
    assert await _drain(private_nats, "match.events.BTC-USDT", len(produced)) == produced
    (next_result,) = await client.submit([place("n1", limit("n1", "z", t.SIDE_BUY, "1", "1"))])
    assert next_result.command_seq == 51
    assert next_result.events[0].seq == after.seq + 1


async def test_the_event_stream_keeps_a_day_and_consumers_leave_that_alone(
    running: Running, private_nats: str
) -> None:
    await running.start()
    nc = await nats.connect(private_nats)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("MATCH_EVENTS")).config.max_age == 86_400.0
        # A consumer starting (ledger, order, risk) creates the stream only if missing.
        await ensure_stream(js, "MATCH_EVENTS", ["match.events.>"], update=False)
        assert (await js.stream_info("MATCH_EVENTS")).config.max_age == 86_400.0
    finally:
        await nc.close()
