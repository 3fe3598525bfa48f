"""The rest of the order API through Envoy: amend, mass cancel, the dead man's
switch, batches, queries, bad input, risk refusals and account isolation."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import grpc
import pytest

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.order.v1 import order_pb2
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from services.chassis import ErrorDetails
from tests.e2e.order.support import BUY, MARKET, SELL, Exchange, Trader, error_of, fields, uid
from tests.rest import rest_ok

D = Decimal


async def _amend(trader: Trader, order_id: str, **changes: str) -> order_pb2.Order:
    reply = await trader.orders.AmendOrder(
        order_pb2.AmendOrderRequest(request_id=uid("a"), order_id=order_id, **changes),
        metadata=trader.md,
        timeout=20,
    )
    return reply.order


@pytest.mark.replicas
async def test_amend_down_keeps_priority_and_an_amend_beyond_the_hold_is_refused(
    exchange: Exchange,
) -> None:
    first = await exchange.trader({"BTC": "1"}, "first")
    second = await exchange.trader({"BTC": "1"}, "second")
    taker = await exchange.trader({"USDT": "100"}, "taker")
    a = await first.place(side=SELL, price="103", quantity="0.3")
    b = await second.place(side=SELL, price="103", quantity="0.2")
    smaller = await _amend(first, a.order_id, quantity="0.2")
    assert (smaller.quantity, smaller.remaining_quantity, smaller.state) == (
        "0.2",
        "0.2",
        t.ORDER_STATE_OPEN,
    )
    with pytest.raises(grpc.aio.AioRpcError) as beyond:
        await _amend(second, b.order_id, quantity="0.5")
    refused = error_of(beyond.value)
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_AMEND_EXCEEDS_HOLD",
    )

    bought = await taker.place(side=BUY, price="103", quantity="0.2")
    assert bought.state == t.ORDER_STATE_FILLED
    # The amended order kept its place ahead of the later one at the same price.
    assert (await first.settled(a.order_id, t.ORDER_STATE_FILLED)).state == t.ORDER_STATE_FILLED
    assert (await second.get(b.order_id)).state == t.ORDER_STATE_OPEN
    # What the first seller held beyond the amended quantity is released.
    assert await exchange.hold_settles(first.account_id, {"BTC": ("0.8", "0")}) == {
        "BTC": (D("0.8"), D(0))
    }


@pytest.mark.replicas
async def test_an_amend_refused_by_match_keeps_the_working_orders_hold(
    exchange: Exchange,
) -> None:
    seller = await exchange.trader({"BTC": "1"}, "seller")
    buyer = await exchange.trader({"USDT": "100"}, "buyer")
    ask = await seller.place(side=SELL, price="104", quantity="0.3")
    # An amend the engine itself refuses (a quantity above the market's maximum),
    # sent straight to match as a service would.
    submit = match_pb2_grpc.MatchServiceStub(exchange.channel).SubmitCommands(
        metadata=exchange.svc, timeout=20
    )
    amend = match_pb2.AmendCommand(
        order_id=ask.order_id, account_id=seller.account_id, quantity="999999"
    )
    await submit.write(
        match_pb2.SubmitCommandsRequest(
            commands=[match_pb2.Command(command_id=uid("amend"), market=MARKET, amend=amend)]
        )
    )
    await submit.done_writing()
    refused = (await submit.read()).results[0].events
    assert [e.WhichOneof("kind") for e in refused] == ["rejected"]
    # A later order of the seller's in the same market, cancelled: once its hold
    # is released, settlement has read the refusal too (it reads in sequence).
    later = await seller.place(side=SELL, price="105", quantity="0.1")
    await seller.cancel(later.order_id)
    assert await exchange.hold_settles(seller.account_id, {"BTC": ("0.7", "0.3")}) == {
        "BTC": (D("0.7"), D("0.3"))
    }
    # The ask still trades against its hold, and the books still balance.
    await buyer.place(side=BUY, price="104", quantity="0.3")
    assert (await seller.settled(ask.order_id, t.ORDER_STATE_FILLED)).state == t.ORDER_STATE_FILLED
    assert await exchange.hold_settles(seller.account_id, {"BTC": ("0.7", "0")}) == {
        "BTC": (D("0.7"), D(0))
    }
    assert (await exchange.audit()).balanced


@pytest.mark.replicas
async def test_mass_cancel_by_market_then_everything(exchange: Exchange) -> None:
    mm = await exchange.trader({"USDT": "1000", "ETH": "5"}, "mm")  # ETH-USDT near 2000
    btc = [await mm.place(side=BUY, price=p, quantity="0.1") for p in ("95", "96")]
    eth = await mm.place(market="ETH-USDT", side=SELL, price="2100", quantity="0.1")
    reply = await mm.orders.CancelAllOrders(
        order_pb2.CancelAllOrdersRequest(request_id=uid("m"), market="BTC-USDT"),
        metadata=mm.md,
        timeout=20,
    )
    assert sorted(o.order_id for o in reply.orders) == sorted(o.order_id for o in btc)
    assert {o.state for o in reply.orders} == {t.ORDER_STATE_CANCELLED}
    assert (await mm.get(eth.order_id)).state == t.ORDER_STATE_OPEN
    everything = await mm.orders.CancelAllOrders(
        order_pb2.CancelAllOrdersRequest(request_id=uid("m")), metadata=mm.md, timeout=20
    )
    assert [o.order_id for o in everything.orders] == [eth.order_id]
    assert await exchange.hold_settles(
        mm.account_id, {"USDT": ("1000", "0"), "ETH": ("5", "0")}
    ) == {"USDT": (D(1000), D(0)), "ETH": (D(5), D(0))}
    still_open = await mm.orders.ListOrders(
        order_pb2.ListOrdersRequest(status=order_pb2.ORDER_STATUS_FILTER_OPEN),
        metadata=mm.md,
        timeout=10,
    )
    assert list(still_open.orders) == []


@pytest.mark.replicas
async def test_cancel_all_after_cancels_everything_unless_renewed(exchange: Exchange) -> None:
    mm = await exchange.trader({"USDT": "1000"}, "mm")
    kept = await mm.place(market="ETH-USDT", side=BUY, price="1900", quantity="0.1")
    order = await mm.place(side=BUY, price="95", quantity="0.1")
    # A switch that is disarmed never fires.
    disarm = await mm.orders.CancelAllAfter(
        order_pb2.CancelAllAfterRequest(request_id=uid("dm"), timeout_seconds=1, market="ETH-USDT"),
        metadata=mm.md,
        timeout=10,
    )
    assert disarm.HasField("trigger_time")
    off = await mm.orders.CancelAllAfter(
        order_pb2.CancelAllAfterRequest(request_id=uid("dm"), timeout_seconds=0, market="ETH-USDT"),
        metadata=mm.md,
        timeout=10,
    )
    assert not off.HasField("trigger_time")
    armed = await mm.orders.CancelAllAfter(
        order_pb2.CancelAllAfterRequest(request_id=uid("dm"), timeout_seconds=1, market="BTC-USDT"),
        metadata=mm.md,
        timeout=10,
    )
    assert armed.HasField("trigger_time")
    fired = await mm.settled(order.order_id, t.ORDER_STATE_CANCELLED, within_s=15)
    assert (fired.state, fired.cancel_reason) == (
        t.ORDER_STATE_CANCELLED,
        t.CANCEL_REASON_CANCEL_ALL_AFTER,
    )
    assert (await mm.get(kept.order_id)).state == t.ORDER_STATE_OPEN


@pytest.mark.replicas
async def test_batch_place_answers_each_item(exchange: Exchange) -> None:
    mm = await exchange.trader({"USDT": "100"}, "mm")
    items = [
        order_pb2.PlaceOrderRequest(
            client_order_id=uid(), market="BTC-USDT", side=BUY, type=t.ORDER_TYPE_LIMIT,
            price="95", quantity="0.1",
        ),
        order_pb2.PlaceOrderRequest(
            client_order_id=uid(), market="BTC-USDT", side=BUY, type=t.ORDER_TYPE_LIMIT,
            price="95.001", quantity="0.1",
        ),
        order_pb2.PlaceOrderRequest(
            client_order_id=uid(), market="BTC-USDT", side=BUY, type=t.ORDER_TYPE_LIMIT,
            price="96", quantity="5",
        ),
    ]  # fmt: skip
    call = mm.orders.BatchPlaceOrders(
        order_pb2.BatchPlaceOrdersRequest(requests=items), metadata=mm.md, timeout=20
    )
    reply = await call
    # The budget after the batch: the two orders that reached the checks took from it.
    headers = dict(await call.initial_metadata())
    assert headers["x-cex-order-limit-1s"] == "100"
    assert int(headers["x-cex-order-count-1s"]) >= 2
    codes = [r.status.code for r in reply.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 9]  # 9: FAILED_PRECONDITION
    assert [r.client_order_id for r in reply.results] == [i.client_order_id for i in items]
    assert reply.results[0].order.state == t.ORDER_STATE_OPEN
    assert ErrorDetails.from_status(reply.results[2].status).reason == "LEDGER_INSUFFICIENT_FUNDS"
    # The unfunded one was refused before the book, like a risk refusal: nothing of it
    # is recorded, and the same client_order_id is checked again once it is funded.
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await mm.orders.GetOrder(
            order_pb2.GetOrderRequest(client_order_id=items[2].client_order_id),
            metadata=mm.md,
            timeout=10,
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    await exchange.deposit(mm.account_id, "USDT", "480")
    again = await mm.orders.PlaceOrder(items[2], metadata=mm.md, timeout=10)
    assert again.order.state == t.ORDER_STATE_OPEN
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await mm.orders.BatchPlaceOrders(
            order_pb2.BatchPlaceOrdersRequest(requests=[items[0]] * 21), metadata=mm.md, timeout=10
        )
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(too_many.value).reason == "ORDER_BATCH_SIZE"
    assert [v.field for v in error_of(too_many.value).violations] == ["requests"]


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"price": "95", "quantity": "0.01"}, "quantity", "ORDER_NOTIONAL_TOO_SMALL"),
        ({"price": "95.001"}, "price", "ORDER_PRICE_OFF_TICK"),
        ({"market": "DOGE-USDT"}, "market", "ORDER_UNKNOWN_MARKET"),
        ({"price": "9e1"}, "price", "ORDER_INVALID_PRICE"),
        ({"quantity": "0x10"}, "quantity", "ORDER_INVALID_QUANTITY"),
        ({"quantity": "1" * 30}, "quantity", "ORDER_QUANTITY_TOO_LARGE"),
        ({"quantity": "NaN"}, "quantity", "ORDER_INVALID_QUANTITY"),
        ({"client_order_id": "has space"}, "client_order_id", "ORDER_INVALID_CLIENT_ORDER_ID"),
        ({"side": 0}, "side", "ORDER_INVALID_SIDE"),
    ],
)
async def test_bad_input_is_invalid_argument_with_field_violations_and_moves_no_money(
    exchange: Exchange, changes: dict[str, object], field: str, reason: str
) -> None:
    bob = await exchange.trader({"USDT": "10000"}, "bob")
    request: dict[str, object] = {"side": BUY, "price": "95", "quantity": "1", **changes}
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await bob.place(**request)
    details = error_of(failure.value)
    assert (details.code, details.domain) == (grpc.StatusCode.INVALID_ARGUMENT, "order")
    assert field in fields(details) and reason in [v.reason for v in details.violations]
    assert await exchange.balances(bob.account_id) == {"USDT": (D(10000), D(0))}
    listed = await bob.orders.ListOrders(order_pb2.ListOrdersRequest(), metadata=bob.md, timeout=10)
    assert list(listed.orders) == []


async def _refused_in_time(trader: Trader, order: dict[str, object], what: str) -> ErrorDetails:
    """Place `order` until it is refused (a rule or a price reaching the checks takes a
    moment), cancelling what was placed meanwhile; the refusal."""
    for _ in range(100):
        try:
            placed = await trader.place(**order)
        except grpc.aio.AioRpcError as error:
            return error_of(error)
        await trader.cancel(placed.order_id)
        await asyncio.sleep(0.05)
    pytest.fail(f"no {what} refusal")


async def test_every_risk_refusal_has_its_reason(exchange: Exchange) -> None:
    risk = risk_pb2_grpc.RiskServiceStub(exchange.channel)
    seller = await exchange.trader({"ETH": "1"}, "seller")
    buyer = await exchange.trader({"USDT": "1000"}, "buyer")
    await seller.place(market="ETH-USDT", side=SELL, price="2000", quantity="0.1")
    await buyer.place(market="ETH-USDT", side=BUY, price="2000", quantity="0.1")

    # A price far from the last trade (risk follows trades from JetStream).
    band = await _refused_in_time(
        buyer, dict(market="ETH-USDT", side=BUY, price="2400", quantity="0.1"), "price band"
    )
    assert (band.code, band.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                        "RISK_PRICE_OUT_OF_BAND")  # fmt: skip

    # An account kill switch.
    switch = risk_pb2.SetKillSwitchRequest(
        request_id=uid("k"),
        scope=risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT,
        account_id=buyer.account_id,
        engaged=True,
        reason="e2e",
    )
    await risk.SetKillSwitch(switch, metadata=exchange.svc, timeout=10)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as killed:
            await buyer.place(market="ETH-USDT", side=BUY, price="1990", quantity="0.1")
        assert error_of(killed.value).reason == "RISK_KILL_SWITCH_ENGAGED"
    finally:
        switch.request_id, switch.engaged = uid("k"), False
        await risk.SetKillSwitch(switch, metadata=exchange.svc, timeout=10)

    # An open-order limit, counted by the writer.
    await risk.SetLimits(
        risk_pb2.SetLimitsRequest(
            request_id=uid("l"),
            limits=risk_pb2.Limits(account_id=buyer.account_id, max_open_orders=1),
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    first = await buyer.place(market="ETH-USDT", side=BUY, price="1990", quantity="0.1")
    limited = await _refused_in_time(  # once the limit reaches order's copy of the rules
        buyer, dict(market="ETH-USDT", side=BUY, price="1980", quantity="0.1"), "limit"
    )
    assert limited.reason == "RISK_OPEN_ORDERS_LIMIT_EXCEEDED"
    # An order answered a moment ago counts before the read model stores it.
    await buyer.cancel(first.order_id)
    await buyer.place(market="ETH-USDT", side=BUY, price="1990", quantity="0.1")
    with pytest.raises(grpc.aio.AioRpcError) as at_once:
        await buyer.place(market="ETH-USDT", side=BUY, price="1980", quantity="0.1")
    assert error_of(at_once.value).reason == "RISK_OPEN_ORDERS_LIMIT_EXCEEDED"
    # Refusals hold nothing: 200 spent on the trade, 199 held by the one open order.
    assert await exchange.hold_settles(buyer.account_id, {"USDT": ("601", "199")}) == {
        "USDT": (D(601), D(199))
    }


@pytest.mark.replicas
async def test_a_user_acts_only_on_their_own_account(exchange: Exchange) -> None:
    alice = await exchange.trader({"USDT": "100"}, "alice")
    mallory = await exchange.trader({"USDT": "100"}, "mallory")
    order = await alice.place(side=BUY, price="95", quantity="0.1")

    async def answer(call) -> tuple[grpc.StatusCode, str, str]:  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        details = error_of(refused.value)
        return refused.value.code(), details.reason, details.message

    # Another account, and an account that does not exist: the same answer.
    for account in (alice.account_id, f"acc_{uid()}"):
        placed = await answer(
            mallory.place(account_id=account, side=BUY, price="95", quantity="0.1")
        )
        listed = await answer(
            mallory.orders.ListOrders(
                order_pb2.ListOrdersRequest(account_id=account), metadata=mallory.md, timeout=10
            )
        )
        assert (
            placed
            == listed
            == (
                grpc.StatusCode.NOT_FOUND,
                "ORDER_ACCOUNT_NOT_FOUND",
                "no such account for this caller",
            )
        )
    # Another account's order, and an order that does not exist: the same answer but the id.
    for order_id in (order.order_id, f"o{uid()}"):
        amend = order_pb2.AmendOrderRequest(order_id=order_id, request_id=uid("r"), quantity="0.2")
        for call in (
            mallory.get(order_id),
            mallory.cancel(order_id),
            mallory.orders.AmendOrder(amend, metadata=mallory.md, timeout=10),
        ):
            code, reason, message = await answer(call)
            assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")
            assert message == f"no order {order_id!r} for this account"
    assert (await alice.get(order.order_id)).state == t.ORDER_STATE_OPEN
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await alice.orders.GetOrder(order_pb2.GetOrderRequest(order_id=order.order_id), timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.replicas
async def test_list_orders_pages_and_filters(exchange: Exchange) -> None:
    mm = await exchange.trader({"USDT": "1000"}, "mm")
    placed = [await mm.place(side=BUY, price="95", quantity="0.1") for _ in range(5)]
    await mm.cancel(placed[0].order_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await mm.orders.ListOrders(
            order_pb2.ListOrdersRequest(page_size=2, page_token=token), metadata=mm.md, timeout=10
        )
        seen += [o.order_id for o in page.orders]
        token = page.next_page_token
        if not token:
            break
    assert seen == [o.order_id for o in reversed(placed)]
    closed = await mm.orders.ListOrders(
        order_pb2.ListOrdersRequest(status=order_pb2.ORDER_STATUS_FILTER_CLOSED),
        metadata=mm.md,
        timeout=10,
    )
    assert [o.order_id for o in closed.orders] == [placed[0].order_id]
    with pytest.raises(grpc.aio.AioRpcError) as bad_token:
        await mm.orders.ListOrders(
            order_pb2.ListOrdersRequest(page_token="garbage"), metadata=mm.md, timeout=10
        )
    assert error_of(bad_token.value).reason == "ORDER_INVALID_PAGE_TOKEN"


@pytest.mark.replicas
async def test_rest_place_lookup_and_cancel_through_envoy(exchange: Exchange) -> None:
    bob = await exchange.trader({"USDT": "100"}, "bob")

    def call(path: str, body: dict[str, object] | None = None) -> Any:
        return rest_ok(exchange.stack, path, bob.token, body)

    body = {
        "client_order_id": "rest-1",
        "market": "BTC-USDT",
        "side": "SIDE_BUY",
        "type": "ORDER_TYPE_LIMIT",
        "price": "95",
        "quantity": "0.1",
    }
    placed = await asyncio.to_thread(call, "/v1/orders", body)
    again = await asyncio.to_thread(call, "/v1/orders", body)
    assert placed["order"]["order_id"] == again["order"]["order_id"]
    assert placed["order"]["state"] == "ORDER_STATE_OPEN"
    found = await asyncio.to_thread(call, "/v1/orders:lookup?client_order_id=rest-1")
    assert found["order"]["order_id"] == placed["order"]["order_id"]
    cancelled = await asyncio.to_thread(
        call, "/v1/orders:cancel", {"client_order_id": "rest-1", "request_id": "x-1"}
    )
    assert cancelled["order"]["state"] == "ORDER_STATE_CANCELLED"


@pytest.mark.replicas
async def test_a_kill_switch_that_cancels_open_orders_cancels_them(exchange: Exchange) -> None:
    risk = risk_pb2_grpc.RiskServiceStub(exchange.channel)
    mm = await exchange.trader({"USDT": "500"}, "mm")
    order = await mm.place(market="ETH-USDT", side=BUY, price="1900", quantity="0.1")
    switch = risk_pb2.SetKillSwitchRequest(
        request_id=uid("k"),
        scope=risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT,
        account_id=mm.account_id,
        engaged=True,
        cancel_open_orders=True,
        reason="e2e: runaway algo",
    )
    await risk.SetKillSwitch(switch, metadata=exchange.svc, timeout=10)
    try:
        gone = await mm.settled(order.order_id, t.ORDER_STATE_CANCELLED, within_s=20)
        assert (gone.state, gone.cancel_reason) == (
            t.ORDER_STATE_CANCELLED,
            t.CANCEL_REASON_KILL_SWITCH,
        )
    finally:
        switch.request_id, switch.engaged, switch.cancel_open_orders = uid("k"), False, False
        await risk.SetKillSwitch(switch, metadata=exchange.svc, timeout=10)
    assert await exchange.hold_settles(mm.account_id, {"USDT": ("500", "0")}) == {
        "USDT": (D(500), D(0))
    }
