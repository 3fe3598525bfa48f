"""Kill switch changes reach JetStream through the outbox, even those made while
risk could not publish."""

from __future__ import annotations

import nats

from cex.risk.v1 import risk_pb2 as R
from tests.integration.risk.support import running_risk


async def events(url: str, n: int) -> list[R.KillSwitchEvent]:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        sub = await js.pull_subscribe("risk.events.kill_switch", stream="RISK_EVENTS")
        got: list[R.KillSwitchEvent] = []
        while len(got) < n:
            for message in await sub.fetch(n - len(got), timeout=10):
                got.append(R.KillSwitchEvent.FromString(message.data))
                await message.ack()
        return got
    finally:
        await client.close()


async def test_every_change_is_published_once_in_order(
    fresh_database_url: str, redis_url: str, private_nats: str
) -> None:
    # Made by a risk that has no NATS: recorded, not yet published.
    async with running_risk(fresh_database_url, redis_url) as offline:
        await offline.kill(
            request_id="k1",
            scope=R.KILL_SWITCH_SCOPE_MARKET,
            market="BTC-USDT",
            engaged=True,
            cancel_open_orders=True,
            reason="bad prints",
        )
    async with running_risk(fresh_database_url, redis_url, nats_url=private_nats) as risk:
        await risk.kill(
            request_id="k2", scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_x", engaged=True
        )
        await risk.kill(  # a retry: no new event
            request_id="k2", scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_x", engaged=True
        )
        await risk.kill(
            request_id="k3", scope=R.KILL_SWITCH_SCOPE_MARKET, market="BTC-USDT", engaged=False
        )
        got = await events(private_nats, 3)
    assert [e.request_id for e in got] == ["k1", "k2", "k3"]
    assert [e.event_id for e in got] == sorted(e.event_id for e in got)
    first = got[0]
    assert first.cancel_open_orders and first.kill_switch.engaged
    assert (first.kill_switch.scope, first.kill_switch.market) == (
        R.KILL_SWITCH_SCOPE_MARKET,
        "BTC-USDT",
    )
    assert first.kill_switch.reason == "bad prints"
    assert not got[2].kill_switch.engaged and not got[2].cancel_open_orders
    client = await nats.connect(private_nats)
    try:
        info = await client.jetstream().stream_info("RISK_EVENTS")
        assert info.state.messages == 3
    finally:
        await client.close()
