"""Events leave through the outbox: written with the change, relayed to JetStream in
order with a Nats-Msg-Id, marked published."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import nats

from cex_stack.supervisor import Stack
from services.funding.outbox import STREAM
from tests.conftest import Trust
from tests.integration.funding.support import (
    chainsim,
    fresh_database,
    fund,
    funding_config,
    new_account,
    running_funding,
)
from tests.integration.ledger.support import running_ledger


async def test_withdrawal_events_are_relayed_in_order(
    stack: Stack, private_nats: str, trust: Trust
) -> None:
    async with (
        fresh_database(stack) as database_url,
        running_ledger(database_url, trust, private_nats) as ledger,
        chainsim() as chain,
        running_funding(
            stack,
            trust,
            database_url,
            funding_config(
                f"127.0.0.1:{ledger.server.port}", chain.target, outbox=True, outbox_poll_s=0.05
            ),
            nats_url=private_nats,
        ) as funding,
    ):
        acct = new_account()
        await fund(ledger, acct, "100")
        w = await funding.settle(acct, (await funding.withdraw(acct, "10")).withdrawal_id)
        client = await nats.connect(private_nats)
        try:
            js = client.jetstream()
            sub = await js.subscribe("funding.withdrawals.>", stream=STREAM, ordered_consumer=True)
            seen: list[tuple[str, dict[str, object], str]] = []
            while len(seen) < 3:
                msg = await asyncio.wait_for(sub.next_msg(), 10)
                assert msg.headers is not None
                seen.append((msg.subject, json.loads(msg.data), msg.headers["Nats-Msg-Id"]))
        finally:
            await client.close()
        assert [s for s, _, _ in seen] == [
            "funding.withdrawals.pending",
            "funding.withdrawals.broadcast",
            "funding.withdrawals.completed",
        ]
        assert {e["withdrawal_id"] for _, e, _ in seen} == {w.withdrawal_id}
        ids = [int(e["event_id"]) for _, e, _ in seen]  # type: ignore[call-overload]
        assert ids == sorted(ids) and [m for _, _, m in seen] == [f"funding:{i}" for i in ids]
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(100):
                left = await conn.fetchval(
                    "SELECT count(*) FROM funding.outbox WHERE publish_time IS NULL"
                )
                if left == 0:
                    break
                await asyncio.sleep(0.05)
            assert left == 0
        finally:
            await conn.close()
