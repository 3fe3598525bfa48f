"""Stream sessions shared by several order replicas, on a real PostgreSQL: the lease
claim (two claimers at once, each session to one of them; a live owner's sessions to
nobody), reports numbered once per session whichever replica stores the events, and
resuming a detached session."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from services.chassis import postgres
from services.chassis.markets import DEFAULT_CATALOG
from services.order.consumer import EventConsumer
from services.order.server import MIGRATIONS
from services.order.store import Store
from tests.integration.order.test_consumer import _accepted, _trade


async def test_two_claimers_take_each_lapsed_session_once(fresh_database_url: str) -> None:
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)
        await store.renew_lease("dead/1", 0.01)
        await store.renew_lease("alive/1", 60)
        dead = [f"d{i}" for i in range(40)]
        for i, session_id in enumerate(dead):
            await store.open_session(session_id, f"acc{i}", i % 2 == 0, (), "dead/1")
        await store.open_session("kept", "acc0", True, (), "alive/1")
        await store.open_session("detached", "acc0", True, ())  # owned by nobody
        await asyncio.sleep(0.05)  # dead/1's lease lapses
        await store.renew_lease("b/1", 60)
        await store.renew_lease("c/1", 60)

        b, c = await asyncio.gather(store.claim_lapsed("b/1"), store.claim_lapsed("c/1"))
        b_ids, c_ids = {row[0] for row in b}, {row[0] for row in c}
        assert not b_ids & c_ids  # never both
        assert b_ids | c_ids == set(dead)  # every one, and only the dead replica's
        assert {row for row in b + c if row[0] == "d0"} == {("d0", "acc0", True)}
        # A second round finds nothing: the claimers hold them under a live lease.
        assert await store.claim_lapsed("b/1") == []
        assert await store.claim_lapsed("c/1") == []
        assert await store.not_owned("b/1", sorted(b_ids)) == []
        assert await store.not_owned("alive/1", ["kept", "d1"]) == ["d1"]


async def test_a_claimer_that_dies_too_leaves_them_to_the_next(fresh_database_url: str) -> None:
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)
        await store.renew_lease("dead/1", 0.01)
        await store.open_session("s1", "acc", True, (), "dead/1")
        await asyncio.sleep(0.05)
        await store.renew_lease("b/1", 0.01)
        assert await store.claim_lapsed("b/1") == [("s1", "acc", True)]
        await asyncio.sleep(0.05)  # b dies before it detached s1
        await store.renew_lease("c/1", 60)
        assert await store.claim_lapsed("c/1") == [("s1", "acc", True)]
        await store.detach_session("s1", "b/1")  # too late: not b's any more
        assert await store.not_owned("c/1", ["s1"]) == []


def _consumer(store: Store, delivered: list[object]) -> EventConsumer:
    async def no_gaps(market: str, first: int, last: int) -> Sequence[match_pb2.MatchEvent]:
        raise AssertionError(f"a gap in {market}: {first}..{last}")

    return EventConsumer(
        store=store, catalog=DEFAULT_CATALOG, js=None,  # type: ignore[arg-type]
        replay=no_gaps, sink=delivered.append, durable="test",
    )  # fmt: skip


async def test_reports_are_numbered_once_per_session_and_resume(fresh_database_url: str) -> None:
    async with postgres(fresh_database_url, schema="order", migrations=MIGRATIONS) as pool:
        store = Store(pool)
        await store.renew_lease("a/1", 60)
        await store.open_session("all", "acc", False, (), "a/1")
        await store.open_session("eth", "acc", False, ["ETH-USDT"], "a/1")
        await store.open_session("other", "acc2", False, (), "a/1")
        woken: list[object] = []
        first, second = _consumer(store, woken), _consumer(store, woken)
        events = [_accepted(1, "o1", side=2), _trade(2, "0.2")]
        await first.handle(events)
        await second.handle(events)  # another replica: stored already, only wakes
        assert len(woken) == 2
        kept = await store.reports_after([("all", 0), ("eth", 0), ("other", 0)])
        assert [(s, n) for s, n, _ in kept] == [("all", 1), ("all", 2)]
        reports = [order_pb2.ExecutionReport.FromString(r) for _, _, r in kept]
        assert [(r.sequence, r.order_id, r.execution_type) for r in reports] == [
            (1, "o1", 1),
            (2, "o1", 2),
        ]

        # The stream ends: detached, resumable from the client's last sequence.
        assert (await store.resume_session("all", "acc", "b/1", False, 1))[0] == "attached"
        await store.detach_session("all", "a/1")
        await first.handle([_trade(3, "0.1")])  # reported while detached
        assert (await store.resume_session("all", "acc2", "b/1", False, 1))[0] == "unknown"
        assert (await store.resume_session("all", "acc", "b/1", False, 9))[0] == "ahead"
        assert await store.resume_session("all", "acc", "b/1", True, 1) == ("resumed", [])
        assert [n for _, n, _ in await store.reports_after([("all", 1)])] == [2, 3]
        assert (await store.resume_session("eth", "acc", "b/1", False, 0))[0] == "attached"

        # Detached too long: closed, its reports dropped, no longer resumable.
        await store.detach_session("all", "b/1")
        await store.expire_sessions(0.0, 600.0)
        assert await store.reports_after([("all", 0)]) == []
        assert (await store.resume_session("all", "acc", "b/1", False, 3))[0] == "unknown"
