"""Price bands from the last trade, followed on JetStream and kept in PostgreSQL."""

from __future__ import annotations

import asyncio

import nats

from cex.match.v1 import match_pb2 as M
from cex.type.v1 import types_pb2 as T
from services.chassis import ensure_stream
from services.chassis.markets import DEFAULT_CATALOG
from services.risk.prices import last_trades
from tests.integration.risk.support import Risk, denial, order, running_risk


def trade(market: str, seq: int, price: str) -> M.MatchEvent:
    return M.MatchEvent(market=market, seq=seq, trade=M.Trade(trade_id=f"t{seq}", price=price))


async def reference(risk: Risk, market: str, want: str) -> None:
    """Wait until risk bands `market` around `want` (the consumer runs in the background)."""
    for _ in range(200):
        reply = await risk.check(order(f"acc_poll_{market}", market=market, price="1"))
        if reply.reference_price == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{market}: reference price never became {want}")


async def publish(url: str, events: list[M.MatchEvent]) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await ensure_stream(js, "MATCH_EVENTS", ["match.events.>"])
        for event in events:
            await js.publish(
                f"match.events.{event.market}",
                M.EventBatch(events=[event]).SerializeToString(),
                headers={"Nats-Msg-Id": f"{event.market}:{event.seq}-{event.seq}"},
            )
    finally:
        await client.close()


async def test_bands_follow_the_last_trade_and_survive_a_restart(
    fresh_database_url: str, redis_url: str, private_nats: str
) -> None:
    level = M.MatchEvent(market="BTC-USDT", seq=2, level_changed=M.LevelChanged())
    await publish(private_nats, [trade("BTC-USDT", 1, "100"), level])
    async with running_risk(fresh_database_url, redis_url, nats_url=private_nats) as risk:
        await reference(risk, "BTC-USDT", "100")
        out = denial(await risk.check(order("acc_1", price="110.01")))
        assert out.reason == "RISK_PRICE_OUT_OF_BAND"
        assert (out.metadata["min_price"], out.metadata["max_price"]) == ("90", "110")
        assert (await risk.check(order("acc_1", price="110"))).allowed
        assert (await risk.check(order("acc_1", price="90"))).allowed
        assert not (await risk.check(order("acc_1", price="89.99"))).allowed
        # ETH-USDT has not traded: no band there.
        eth = await risk.check(order("acc_1", market="ETH-USDT", price="99999"))
        assert eth.allowed and eth.reference_price == ""
        await publish(private_nats, [trade("BTC-USDT", 3, "200.5"), trade("ETH-USDT", 1, "10")])
        await reference(risk, "BTC-USDT", "200.5")
        await reference(risk, "ETH-USDT", "10")
        assert denial(await risk.check(order("acc_1", price="110"))).reason == (
            "RISK_PRICE_OUT_OF_BAND"
        )
        # Stop orders are not banded.
        stop = order("acc_1", type=T.ORDER_TYPE_STOP_LIMIT, price="110", stop_price="111")
        assert (await risk.check(stop)).allowed
    # Without NATS, a restarted risk bands with the prices it saved.
    async with running_risk(fresh_database_url, redis_url) as again:
        reply = await again.check(order("acc_1", price="200.5"))
        assert reply.allowed and reply.reference_price == "200.5"


def test_only_the_newest_readable_trade_of_a_batch_counts() -> None:
    found = last_trades(
        DEFAULT_CATALOG,
        [
            trade("BTC-USDT", 7, "101"),
            trade("BTC-USDT", 5, "99"),
            trade("BTC-USDT", 8, "1.001"),  # off the tick grid: ignored
            trade("NOPE-USDT", 9, "1"),
            M.MatchEvent(market="ETH-USDT", seq=3, level_changed=M.LevelChanged()),
        ],
    )
    assert {m: (p, s) for m, (p, s, _) in found.items()} == {"BTC-USDT": (101_00, 7)}
