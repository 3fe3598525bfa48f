"""Fee schedules on the real stack (issue 21, ADR 0016): an operator sets the
schedule over REST and assigns a market maker a rebate tier with the `cex` CLI;
two accounts on different tiers trade and each is charged its own tier's rate,
in the asset it receives, in execution reports and fills; the rebate is paid
from the fee account; measured 30-day volume moves a taker to the next tier,
whose rate its next trade pays; bad input is INVALID_ARGUMENT with field
violations and a trader's token is refused; the ledger audit passes.

The stack is this module's own: the fee schedule is exchange-wide, and the
session's stack charges the default rates other tests expect.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import grpc
import pytest
from google.protobuf import timestamp_pb2

from cex.auth.v1 import auth_pb2
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from tests.cli import cex
from tests.e2e.order.support import BUY, SELL, Exchange, error_of, uid
from tests.e2e.order.test_streams import Client, R, place
from tests.metrics import sample
from tests.rest import rest

FILLED = t.ORDER_STATE_FILLED
TIERS = [
    {"name": "default", "maker_fee_bps": "10", "taker_fee_bps": "20", "min_volume": "0"},
    {"name": "vip1", "maker_fee_bps": "5", "taker_fee_bps": "15", "min_volume": "550"},
    {"name": "mm", "maker_fee_bps": "-2", "taker_fee_bps": "10", "min_volume": "1000000000"},
]


pytestmark = pytest.mark.own_stack


def _order_seq(stack: Stack) -> int:
    """The fee-tier change sequence order's copy is complete up to (its metric)."""
    seq = sample(stack, "order", "fee_tiers_change_seq")
    return -1 if seq is None else int(seq)


async def _order_follows(stack: Stack, exchange: Exchange, within_s: float = 10.0) -> None:
    """Wait until order prices orders with auth's latest fee tiers."""
    latest = await exchange.auth.GetFeeTiers(
        auth_pb2.GetFeeTiersRequest(), metadata=exchange.svc, timeout=10
    )
    for _ in range(int(within_s / 0.05)):
        if await asyncio.to_thread(_order_seq, stack) >= latest.change_seq:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"order's fee tiers stay behind auth's {latest.change_seq}")


async def _fills(trader: object, order_id: str) -> list[order_pb2.Fill]:
    for _ in range(100):
        reply = await trader.orders.ListFills(  # type: ignore[attr-defined]
            order_pb2.ListFillsRequest(order_id=order_id),
            metadata=trader.md,  # type: ignore[attr-defined]
            timeout=10,
        )
        if reply.fills:
            return list(reply.fills)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no fills of {order_id}")


async def test_tiers_rebates_and_volume_on_the_running_stack(
    own_stack: Stack, exchange: Exchange
) -> None:
    maker = await exchange.trader({"BTC": "10", "USDT": "100"}, "maker")
    taker = await exchange.trader({"USDT": "2000"}, "taker")
    seller = await exchange.trader({"BTC": "10"}, "seller")
    await exchange.lift_limits(maker, taker, seller)

    # A trader's token may not touch the schedule: gRPC and REST.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await exchange.auth.SetAccountFeeTier(
            auth_pb2.SetAccountFeeTierRequest(
                request_id=uid("t"), account_id=taker.account_id, fee_tier="default"
            ),
            metadata=taker.md,
            timeout=10,
        )
    assert error_of(denied.value).code == grpc.StatusCode.PERMISSION_DENIED
    assert error_of(denied.value).reason == "AUTH_SCOPE_MISSING"
    status, body = await asyncio.to_thread(
        rest, own_stack, "/v1/admin/feeSchedule", taker.token, {"request_id": "x", "tiers": TIERS}
    )
    assert status == 403 and "AUTH_SCOPE_MISSING" in json.dumps(body), body

    # Bad input: 400 with a violation per bad field.
    bad = [{**TIERS[0], "maker_fee_bps": "-150"}, {**TIERS[1], "name": "VIP 1"}]
    status, body = await asyncio.to_thread(
        rest,
        own_stack,
        "/v1/admin/feeSchedule",
        exchange.service_token,
        {"request_id": "b", "tiers": bad},
    )
    assert status == 400 and "AUTH_INVALID_FEE_SCHEDULE" in json.dumps(body), body
    assert "tiers[0].maker_fee_bps" in json.dumps(body) and "tiers[1].name" in json.dumps(body), (
        body
    )

    # The operator sets the schedule over REST, and gives the maker the rebate tier
    # with the CLI.
    status, body = await asyncio.to_thread(
        rest,
        own_stack,
        "/v1/admin/feeSchedule",
        exchange.service_token,
        {"request_id": uid("s"), "tiers": TIERS, "reason": "launch"},
    )
    assert status == 200, body
    assert [t["name"] for t in body["schedule"]["tiers"]] == ["default", "vip1", "mm"]
    assert cex(own_stack, "fees", "assign", maker.account_id, "mm", "--reason", "mm program") == (
        f"{maker.account_id} mm (assigned)"
    )
    shown = await asyncio.to_thread(cex, own_stack, "fees", "schedule")
    assert shown.splitlines()[2].split()[:7] == ["mm", "maker", "-2", "bps", "taker", "10", "bps"]
    await _order_follows(own_stack, exchange)

    # Two tiers trade: the maker (mm, on its stream session) sells 1 BTC at 100 and
    # is paid 2 bps of the 100 USDT it receives; the taker (default) pays 20 bps of
    # the 1 BTC it receives.
    session = Client(maker)
    await session.send(R(subscribe=order_pb2.StreamSubscribe()))
    await session.next("subscribed")
    await session.send(place(side=SELL, price="100", quantity="1"))
    ask = (await session.next("ack")).ack.place.order
    hit = await taker.place(side=BUY, price="100", quantity="1")
    assert hit.state == FILLED, hit
    assert (Decimal(hit.cumulative_fee), hit.fee_asset) == (Decimal("0.002"), "BTC")
    made = await maker.settled(ask.order_id, FILLED)
    assert (Decimal(made.cumulative_fee), made.fee_asset) == (Decimal("-0.02"), "USDT")
    (fill,) = await _fills(maker, ask.order_id)
    assert (Decimal(fill.fee), fill.fee_asset) == (Decimal("-0.02"), "USDT")
    assert fill.liquidity == t.LIQUIDITY_MAKER
    while not any(r.execution_type == 2 for r in session.reports()):  # TRADE
        await session.next("execution_report")
    (report,) = [r for r in session.reports() if r.execution_type == 2]
    assert (report.fee, report.fee_asset, report.liquidity) == ("-0.02", "USDT", t.LIQUIDITY_MAKER)
    await session.send(None)
    balances = await exchange.hold_settles(
        maker.account_id, {"USDT": ("200.02", "0"), "BTC": ("9", "0")}
    )
    assert balances == {"USDT": (Decimal("200.02"), 0), "BTC": (Decimal(9), 0)}
    taker_has = await exchange.hold_settles(taker.account_id, {"BTC": ("0.998", "0")})
    assert taker_has["BTC"] == (Decimal("0.998"), 0)
    await exchange.assert_balanced()

    # Volume: the taker has bought 100 USDT; 500 more (from a default-tier seller)
    # crosses vip1's 550. The seller's 500 does not.
    await seller.place(side=SELL, price="100", quantity="5")
    more = await taker.place(side=BUY, price="100", quantity="5")
    assert more.state == FILLED and Decimal(more.cumulative_fee) == Decimal("0.01")
    moved = ""
    async with asyncio.timeout(20):  # the fills reach order's read model after the ack
        while f"{taker.account_id} -> vip1" not in moved:
            moved = await asyncio.to_thread(cex, own_stack, "fees", "evaluate")
            await asyncio.sleep(0.2)
    assert seller.account_id not in moved and maker.account_id not in moved
    account = await exchange.auth.GetAccount(
        auth_pb2.GetAccountRequest(account_id=taker.account_id), metadata=exchange.svc, timeout=10
    )
    assert (account.account.fee_tier, account.account.fee_tier_assigned) == ("vip1", False)
    assert Decimal(account.account.traded_volume_30d) == Decimal(600)
    fees = await exchange.auth.GetFees(auth_pb2.GetFeesRequest(), metadata=taker.md, timeout=10)
    assert (fees.fee_tier, fees.taker_fee_rate) == ("vip1", "0.0015")
    await _order_follows(own_stack, exchange)

    # The taker's next trade pays vip1's 15 bps.
    await seller.place(side=SELL, price="100", quantity="0.5")
    vip = await taker.place(side=BUY, price="100", quantity="0.5")
    assert vip.state == FILLED and Decimal(vip.cumulative_fee) == Decimal("0.00075"), vip
    await exchange.assert_balanced()


async def test_traded_volumes_page_by_account_for_services_only(
    own_stack: Stack, exchange: Exchange
) -> None:
    buyer = await exchange.trader({"USDT": "100"}, "buyer")
    seller = await exchange.trader({"BTC": "1"}, "seller")
    await seller.place(side=SELL, price="100", quantity="0.1")
    assert (await buyer.place(side=BUY, price="100", quantity="0.1")).state == FILLED
    since = timestamp_pb2.Timestamp()
    since.FromSeconds(int(time.time()) - 3600)
    found: dict[str, str] = {}
    async with asyncio.timeout(20):  # the fills reach order's read model after the ack
        while buyer.account_id not in found or seller.account_id not in found:
            found, token, pages = {}, "", 0
            while True:
                page = await buyer.orders.ListTradedVolumes(
                    order_pb2.ListTradedVolumesRequest(
                        start_time=since, quote_asset="USDT", page_size=1, page_token=token
                    ),
                    metadata=exchange.svc,
                    timeout=10,
                )
                found |= {v.account_id: v.volume for v in page.volumes}
                pages, token = pages + 1, page.next_page_token
                if not token:
                    break
            assert pages >= len(found)
            await asyncio.sleep(0.1)
    assert list(found) == sorted(found)
    assert found[buyer.account_id] == found[seller.account_id] == "10"
    btc = await buyer.orders.ListTradedVolumes(
        order_pb2.ListTradedVolumesRequest(start_time=since, quote_asset="BTC"),
        metadata=exchange.svc,
        timeout=10,
    )
    assert buyer.account_id not in {v.account_id for v in btc.volumes}  # ETH-BTC only
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await buyer.orders.ListTradedVolumes(
            order_pb2.ListTradedVolumesRequest(start_time=since, quote_asset="DOGE"),
            metadata=exchange.svc,
            timeout=10,
        )
    assert error_of(bad.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_of(bad.value).violations] == ["quote_asset"]
    with pytest.raises(grpc.aio.AioRpcError) as user:
        await buyer.orders.ListTradedVolumes(
            order_pb2.ListTradedVolumesRequest(start_time=since, quote_asset="USDT"),
            metadata=buyer.md,
            timeout=10,
        )
    assert error_of(user.value).code == grpc.StatusCode.PERMISSION_DENIED
