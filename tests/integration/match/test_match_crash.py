"""kill -9 of the match process under load: nothing acknowledged is lost.

A real `python -m services.match.main` process serves several concurrent
clients that submit batches of random commands and retry a failed batch with
the same command ids. The process is killed with SIGKILL at random moments
and restarted. Afterwards every acknowledged command's events are in the
journal with the same sequence numbers, the sequence has no gap, JetStream
holds every event, and a fresh process that replays the whole journal (no
snapshot) reaches the same book hash as the one that was running.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import grpc
import nats
import pytest

from cex.match.v1 import match_pb2, match_pb2_grpc
from services.chassis.markets import DEFAULT_CATALOG
from services.match.engine import MarketEngine, decode
from tests.conftest import Trust
from tests.integration.match.match_client import Client, random_commands
from tests.process import ServiceProcess

MARKET = "BTC-USDT"


@pytest.fixture
async def match_process(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> AsyncIterator[ServiceProcess]:
    env = {
        **trust.env,
        "DATABASE_URL": fresh_database_url,
        "NATS_URL": private_nats,
        "CEX_MATCH_MARKETS": MARKET,
        "CEX_MATCH_SNAPSHOT_EVERY": "150",
    }
    async with ServiceProcess(
        "services.match.main", env, health_service="cex.match.v1.MatchService", quiet=True
    ) as process:
        yield process


async def _client_loop(
    trust: Trust, target: str, prefix: str, seed: int, stop: asyncio.Event, acked: dict[str, bytes]
) -> None:
    """Submit batches until told to stop; retry a failed batch with the same ids."""
    rng = random.Random(seed)
    commands = random_commands(MARKET, 100_000, seed=seed, prefix=prefix)
    position = 0
    async with trust.channel(target) as channel:
        client = Client(match_pb2_grpc.MatchServiceStub(channel))
        while not stop.is_set():
            batch = commands[position : position + rng.randrange(1, 20)]
            try:
                results = await client.submit(batch, rpc_timeout=5)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # (an intercepted stream's write raises InvalidStateError once the
                # server has gone away)
                await asyncio.sleep(0.05)
                continue  # the same batch again: the ids make it safe
            for result in results:
                if result.status.code == 0:
                    acked[result.command_id] = match_pb2.ReplayEventsResponse(
                        events=result.events
                    ).SerializeToString()
                else:
                    assert result.status.code == grpc.StatusCode.UNAVAILABLE.value[0], result
            if all(r.status.code == 0 for r in results):
                position += len(batch)


async def _journal_replay_hash(database_url: str) -> str:
    market = DEFAULT_CATALOG.markets[MARKET]
    engine = MarketEngine(market)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT command_seq, ts, command FROM match.journal WHERE market = $1"
            " ORDER BY command_seq",
            MARKET,
        )
    finally:
        await conn.close()
    for row in rows:
        command = match_pb2.Command.FromString(row["command"])
        engine.apply(decode(market, command), row["command_seq"], row["ts"])
    return engine.state_hash()


async def _stream_seqs(nats_url: str) -> list[int]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("MATCH_EVENTS")
        sub = await js.subscribe(f"match.events.{MARKET}", ordered_consumer=True)
        seqs = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=10)
            seqs += (e.seq for e in match_pb2.EventBatch.FromString(msg.data).events)
        return seqs
    finally:
        await nc.close()


async def _crash_loop(
    trust: Trust,
    process: ServiceProcess,
    database_url: str,
    nats_url: str,
    kills: int,
    clients: int,
) -> None:
    rng = random.Random(kills)
    stop = asyncio.Event()
    acked: dict[str, bytes] = {}
    loops = [
        asyncio.create_task(_client_loop(trust, process.target, f"k{i}", 100 + i, stop, acked))
        for i in range(clients)
    ]
    try:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            await process.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await process.start()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert len(acked) > kills * 5, "the load did not get through"

    async with trust.channel(process.target) as channel:
        client = Client(match_pb2_grpc.MatchServiceStub(channel))
        running = await client.book(MARKET, l3=True)
        journal = await client.replay(MARKET)
    # The event sequence has no gap, and every acknowledged command is in it as answered.
    assert [e.seq for e in journal] == list(range(1, running.seq + 1))
    by_command: dict[str, list[match_pb2.MatchEvent]] = {}
    for event in journal:
        by_command.setdefault(event.command_id, []).append(event)
    for command_id, events in acked.items():
        found = match_pb2.ReplayEventsResponse(events=by_command.get(command_id, []))
        assert found.SerializeToString() == events, command_id
    # JetStream caught up with the journal: every seq present (duplicates are allowed).
    for _ in range(50):
        if set(await _stream_seqs(nats_url)) == set(range(1, running.seq + 1)):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("JetStream is missing events the journal holds")
    # A fresh process replaying the whole journal (no snapshot) reaches the same book.
    await process.stop()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM match.snapshots") > 0
        await conn.execute("DELETE FROM match.snapshots")
    finally:
        await conn.close()
    await process.start()
    async with trust.channel(process.target) as channel:
        replayed = await Client(match_pb2_grpc.MatchServiceStub(channel)).book(MARKET, l3=True)
    assert replayed == running
    assert await _journal_replay_hash(database_url) == running.state_hash


async def test_kill_9_under_load_loses_nothing_acknowledged(
    match_process: ServiceProcess, fresh_database_url: str, private_nats: str, trust: Trust
) -> None:
    await _crash_loop(trust, match_process, fresh_database_url, private_nats, kills=3, clients=3)


@pytest.mark.chaos
async def test_kill_9_twenty_times_under_load(
    match_process: ServiceProcess, fresh_database_url: str, private_nats: str, trust: Trust
) -> None:
    await _crash_loop(trust, match_process, fresh_database_url, private_nats, kills=20, clients=4)
