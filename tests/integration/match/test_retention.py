"""Journal retention on a real PostgreSQL (and JetStream for the service): the journal
stays bounded, restarts, replays and standbys recover the same group after
compaction, ReplayEvents says clearly what is gone, and a projection behind holds
compaction back (ADR 0013, "Retention")."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest

from cex.match.v1 import match_pb2
from services.chassis import ErrorDetails, FailedPrecondition, postgres
from services.chassis.db import migrate
from services.chassis.markets import DEFAULT_CATALOG
from services.ledger.store import MIGRATIONS as LEDGER_MIGRATIONS
from services.ledger.store import Store as LedgerStore
from services.match.config import MatchSettings
from services.match.engine import decode
from services.match.funds import Funds
from services.match.publisher import STREAM, subject
from services.match.retention import Retention
from services.match.server import MIGRATIONS
from services.match.store import Journal
from services.match.writer import Sequencer, _Replay
from services.order.server import MIGRATIONS as ORDER_MIGRATIONS
from tests.conftest import Trust
from tests.integration.match.match_client import random_commands
from tests.integration.match.test_match_service import Running

BTC = DEFAULT_CATALOG.markets["BTC-USDT"]
ETH = DEFAULT_CATALOG.markets["ETH-USDT"]
MARKETS = {BTC.symbol: BTC, ETH.symbol: ETH}


async def _migrated(url: str, schema: str, folder: Path) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, schema, folder)
    finally:
        await conn.close()


@pytest.fixture
async def pool(fresh_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await _migrated(fresh_database_url, "ledger", LEDGER_MIGRATIONS)
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        yield pool


def _writer(pool: asyncpg.Pool, snapshot_every: int = 10) -> Sequencer:
    funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
    return Sequencer(
        list(MARKETS.values()), Journal(pool, "main"), funds, clock=time.time_ns,
        snapshot_every=snapshot_every,
    )  # fmt: skip


def _retention(pool: asyncpg.Pool, **kwargs: object) -> Retention:
    options: dict[str, object] = {"retain": 5, "retain_s": 0.0, "readers": ()} | kwargs
    return Retention(Journal(pool, "main"), list(MARKETS), **options)  # type: ignore[arg-type]


async def _load(writer: Sequencer, n: int, *, seed: int, prefix: str) -> None:
    """`n` commands per market, a few at a time (several batches, several snapshots)."""
    btc = random_commands(BTC.symbol, n, seed=seed, prefix=f"{prefix}b")
    eth = random_commands(ETH.symbol, n, seed=seed + 1, prefix=f"{prefix}e")
    commands = [c for pair in zip(btc, eth, strict=True) for c in pair]
    for start in range(0, len(commands), 7):
        futures = [writer.submit(decode(MARKETS[c.market], c)) for c in commands[start : start + 7]]
        for result in await asyncio.gather(*futures):
            assert result.status.code == 0, result.status


async def _snapshots_written(writer: Sequencer, journal: Journal) -> None:
    """The snapshot task has written the last one due."""
    for _ in range(200):
        saving = writer._saving
        if saving is None or saving.done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the snapshot was not written")


async def _count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM journal"))


async def test_the_journal_stays_bounded_and_a_restart_and_a_replay_agree(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Many commands with a small retention, compacted while the writer commits: the
    journal holds no more than the snapshots kept and the retained rows; every
    deleted row is in the archive, in order; the replay from the latest snapshot and
    a restart give the group the writer holds (`verify`), byte for byte."""
    writer = _writer(pool)
    retention = _retention(pool, archive_dir=tmp_path)
    await writer.start()
    try:
        sizes = []
        for round_ in range(8):
            await asyncio.gather(
                _load(writer, 30, seed=round_, prefix=f"r{round_}"), retention.once()
            )
            await _snapshots_written(writer, writer._journal)
            await retention.once()
            sizes.append(await _count(pool))
        total = writer.group_seq
        assert total >= 400
        # 3 snapshots kept 10 commands apart, and the rows after the oldest of them.
        assert max(sizes[2:]) <= 100 and sizes[-1] <= 100, sizes
        through = await writer._journal.compacted_through()
        assert through > 0 and await _count(pool) == total - through
        await writer.verify()
        hash_before = writer.state_hash()
    finally:
        await writer.stop()

    archived = []
    for path in sorted((tmp_path / "main").glob("journal-*.jsonl.gz")):
        with gzip.open(path) as lines:
            archived += [json.loads(line) for line in lines]
    assert [row["group_seq"] for row in archived] == list(range(1, through + 1))
    first = archived[0]
    assert match_pb2.Command.FromString(base64.b64decode(first["command"])).command_id

    again = _writer(pool)
    await again.start()
    try:
        assert again.serving and again.group_seq == total
        assert again.state_hash() == hash_before
        assert await again.replayed() == again.document()
    finally:
        await again.stop()


async def test_a_standby_behind_the_horizon_reloads_from_the_snapshot(
    pool: asyncpg.Pool,
) -> None:
    """A standby whose position was compacted away starts again from the latest
    snapshot (not JournalMismatch) and reaches the writer's state; a real standby
    follows through compactions and takes over with the same state."""
    writer = _writer(pool)
    await writer.start()
    standby = _writer(pool)
    await standby.start()
    try:
        assert writer.serving and not standby.serving
        await _load(writer, 10, seed=1, prefix="a")
        behind = await _Replay.latest(writer._journal, MARKETS, None)
        await behind.advance(writer._journal)
        position = behind.group_seq
        assert position == writer.group_seq
        await _load(writer, 40, seed=2, prefix="b")
        await _snapshots_written(writer, writer._journal)
        await _retention(pool).once()
        assert await writer._journal.compacted_through() > position
        await behind.advance(writer._journal)  # the rows after `position` are gone
        assert behind.group_seq == writer.group_seq
        assert behind.snapshot_seq > position
        async with writer.view(BTC.symbol):
            books = {s: e.document() for s, e in writer.engines.items()}
        assert {s: e.document() for s, e in behind.engines.items()} == books

        # (A gap that retention did not make is still a mismatch: test_writer's
        # replay test deletes a row and expects JournalMismatch.)
        # The real standby followed all along; stopped, the writer hands over to it.
        last = writer.group_seq
        await _until(lambda: standby.following is not None
                     and standby.following.group_seq == last)  # fmt: skip
        await writer.stop()
        await _until(lambda: standby.serving)
        assert standby.group_seq == last
        await standby.verify()
    finally:
        await writer.stop()
        await standby.stop()


async def test_a_projection_behind_holds_compaction_back(pool: asyncpg.Pool, database: str) -> None:
    """Order's cursors (its real table): compaction stops at the first row with events
    the projection has not applied, a market it has no cursor for holds all its rows,
    and a reader whose table does not exist (not migrated yet) holds everything."""
    await _migrated(database, "order", ORDER_MIGRATIONS)
    writer = _writer(pool)
    await writer.start()
    try:
        await _load(writer, 60, seed=4, prefix="p")
        await _snapshots_written(writer, writer._journal)
        btc, eth = writer.logs[BTC.symbol].committed_seq, writer.logs[ETH.symbol].committed_seq
        cursor = btc // 3
        await pool.execute(
            'INSERT INTO "order".market_cursors (market, seq) VALUES ($1, $2)', BTC.symbol, cursor
        )
        assert await _retention(pool, readers=("nowhere.cursors",)).once() == 0
        assert await writer._journal.compacted_through() == 0
        retention = _retention(pool, readers=("order.market_cursors",))
        first_eth = await pool.fetchval(
            "SELECT min(group_seq) FROM journal WHERE market = $1 AND last_seq > 0", ETH.symbol
        )
        await retention.once()  # ETH has no cursor: nothing of it was applied
        assert await writer._journal.compacted_through() == first_eth - 1
        await pool.execute(
            'INSERT INTO "order".market_cursors (market, seq) VALUES ($1, $2)', ETH.symbol, eth
        )
        assert await retention.once() > 0
        # Every BTC event after the cursor is still journaled: a gap fill works.
        events = await writer.logs[BTC.symbol].events(cursor + 1, btc)
        assert events[0].seq == cursor + 1
        needed = await pool.fetchval(
            "SELECT min(group_seq) FROM journal WHERE market = $1 AND last_seq > $2",
            BTC.symbol,
            cursor,
        )
        assert await writer._journal.compacted_through() == needed - 1
        # The projection catches up: compaction follows, up to the oldest snapshot.
        await pool.execute('UPDATE "order".market_cursors SET seq = $1', max(btc, eth))
        await retention.once()
        oldest, _ = await writer._journal.retention_bounds()
        assert await writer._journal.compacted_through() == oldest
    finally:
        await writer.stop()


async def test_compaction_keeps_the_young_and_a_stale_round_deletes_nothing(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Rows younger than retain_s stay whatever else allows; a round that read an old
    horizon (another compaction went first: a takeover mid-round) deletes nothing;
    an archive written by a round that died before its delete is written again."""
    writer = _writer(pool)
    await writer.start()
    try:
        await _load(writer, 30, seed=5, prefix="y")
        await _snapshots_written(writer, writer._journal)
        assert await _retention(pool, retain_s=3600.0).once() == 0
        journal = writer._journal
        assert await journal.compact(5, 10) == 0  # the horizon is 0, not 5
        # A round that archived, then died before its delete: the next one rewrites it.
        archive = _retention(pool, archive_dir=tmp_path)
        bound = await archive.bound()
        rows = await journal.compactable(0, bound, time.time_ns())
        from services.match.retention import _archive

        path = _archive(tmp_path / "main", "main", rows)
        assert await journal.compacted_through() == 0
        deleted = await archive.once()
        assert deleted == len(rows) and path.is_file()
        with gzip.open(path) as lines:
            assert len(lines.readlines()) == len(rows)
        await writer.verify()
    finally:
        await writer.stop()


@pytest.fixture
def database(fresh_database_url: str) -> str:
    return fresh_database_url


@pytest.fixture
async def compacting(
    fresh_database_url: str, private_nats: str, trust: Trust
) -> AsyncIterator[Running]:
    r = Running(fresh_database_url, private_nats, snapshot_every=5, trust=trust)
    r.match_settings = MatchSettings(
        markets=("BTC-USDT", "ETH-USDT"),
        snapshot_every=5,
        journal_retain=3,
        journal_retain_s=0.0,
        journal_retention_every_s=0.1,
        journal_readers=(),  # no projection in this database
    )
    yield r
    await r.stop()


async def test_replay_events_for_a_compacted_range_is_a_clear_error(compacting: Running) -> None:
    """The serving writer's retention task compacts; after a restart (nothing in
    memory) ReplayEvents for a compacted range is FAILED_PRECONDITION
    MATCH_EVENTS_COMPACTED naming the first event still journaled, from which a
    replay works."""
    client = await compacting.start()
    produced = await client.random_load("BTC-USDT", 60, seed=9)
    committed = max(e.seq for r in produced for e in r.events)
    url = compacting.settings.database_url
    assert url is not None
    conn = await asyncpg.connect(url)
    try:
        for _ in range(200):
            through = await conn.fetchval("SELECT compacted_through FROM match.journal_retention")
            if through:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the retention task did not compact")
    finally:
        await conn.close()
    await compacting.stop()
    client = await compacting.start()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.replay("BTC-USDT", 1, committed)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = ErrorDetails.from_rpc_error(raised.value)
    assert info.reason == "MATCH_EVENTS_COMPACTED"
    first = int(info.metadata["first_seq"])
    assert 1 < first <= committed
    tail = await client.replay("BTC-USDT", first, committed)
    assert [e.seq for e in tail] == list(range(first, committed + 1))


async def test_the_log_raises_the_error_for_a_compacted_range(pool: asyncpg.Pool) -> None:
    writer = _writer(pool, snapshot_every=5)
    await writer.start()
    try:
        await _load(writer, 20, seed=6, prefix="l")
        await _snapshots_written(writer, writer._journal)
        await _retention(pool).once()
    finally:
        await writer.stop()
    again = _writer(pool, snapshot_every=5)  # nothing in memory
    await again.start()
    try:
        with pytest.raises(FailedPrecondition) as raised:
            await again.logs[BTC.symbol].events(1, 5)
        assert raised.value.reason == "MATCH_EVENTS_COMPACTED"
    finally:
        await again.stop()


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def test_the_publisher_on_an_empty_stream_starts_at_the_first_journaled_event(
    compacting: Running, private_nats: str
) -> None:
    """JetStream lost the market's events (purged) after retention deleted their rows:
    the restarted publisher cannot republish them and publishes from the first event
    the journal still holds, instead of failing forever."""
    client = await compacting.start()
    produced = await client.random_load("BTC-USDT", 60, seed=10)
    committed = max(e.seq for r in produced for e in r.events)
    url = compacting.settings.database_url
    assert url is not None
    conn = await asyncpg.connect(url)
    try:
        await _until_async(
            lambda: conn.fetchval("SELECT compacted_through FROM match.journal_retention")
        )
    finally:
        await conn.close()
    await compacting.stop()
    nc = await nats.connect(private_nats)
    try:
        js = nc.jetstream()
        await js.purge_stream(STREAM)
        client = await compacting.start()
        tail = 0
        for _ in range(200):
            info = await js.stream_info(STREAM)
            if info.state.messages:
                last = await js.get_last_msg(STREAM, subject("BTC-USDT"))
                tail = match_pb2.EventBatch.FromString(last.data or b"").events[-1].seq
                if tail == committed:
                    break
            await asyncio.sleep(0.05)
        assert tail == committed
        first = await js.get_msg(STREAM, info.state.first_seq)
        published_from = match_pb2.EventBatch.FromString(first.data or b"").events[0].seq
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.replay("BTC-USDT", published_from - 1, published_from - 1)
        assert ErrorDetails.from_rpc_error(raised.value).reason == "MATCH_EVENTS_COMPACTED"
    finally:
        await nc.close()


async def _until_async(condition: Callable[[], Awaitable[object]], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_a_real_standby_asleep_past_the_horizon_reloads_and_takes_over(
    pool: asyncpg.Pool,
) -> None:
    """A standby that polls rarely (asleep while the writer commits, snapshots and
    compacts past its position) reloads from the latest snapshot on its next poll,
    reaches the writer's position and takes over with the writer's state."""
    writer = _writer(pool)
    await writer.start()
    funds = Funds(LedgerStore(pool, DEFAULT_CATALOG.assets), DEFAULT_CATALOG)
    slow = Sequencer(
        list(MARKETS.values()), Journal(pool, "main"), funds, clock=time.time_ns,
        snapshot_every=10, follow_s=6.0,
    )  # fmt: skip
    try:
        await _load(writer, 10, seed=7, prefix="s")
        await slow.start()  # follows at once, then sleeps 6 s between polls
        position = writer.group_seq
        await _until(lambda: slow.following is not None and slow.following.group_seq == position)
        following = slow.following
        assert following is not None
        first_snapshot = following.snapshot_seq
        await _load(writer, 40, seed=8, prefix="t")
        await _snapshots_written(writer, writer._journal)
        await _retention(pool).once()
        assert await writer._journal.compacted_through() > position
        assert following.group_seq == position, "the test's timing: the standby polled"
        await _until(lambda: following.group_seq == writer.group_seq, within_s=15.0)
        assert following.snapshot_seq > first_snapshot  # reloaded, not JournalMismatch
        hash_before = writer.state_hash()
        await writer.stop()
        await _until(lambda: slow.serving, within_s=15.0)
        assert slow.group_seq == writer.group_seq and slow.state_hash() == hash_before
        await slow.verify()
    finally:
        await writer.stop()
        await slow.stop()
