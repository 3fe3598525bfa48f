"""Zero is a balance, through Envoy (issue 18): a new account's balances are zeros over
gRPC and REST, and an order it cannot pay is FAILED_PRECONDITION
LEDGER_INSUFFICIENT_FUNDS (HTTP 400), never NOT_FOUND (it was a 404)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cex.ledger.v1 import ledger_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails, load_catalog
from tests.e2e.order.support import BUY, SELL, Exchange, uid
from tests.rest import rest


async def test_a_new_accounts_balances_are_zero_over_grpc_and_rest(
    stack: Stack, exchange: Exchange
) -> None:
    trader = await exchange.trader(name="newcomer")
    stub = exchange.ledger
    reply = await stub.GetBalances(ledger_pb2.GetBalancesRequest(), metadata=trader.md, timeout=10)
    assert [b.asset for b in reply.balances] == sorted(load_catalog().assets)
    assert all(b.available == b.held == b.total == "0" for b in reply.balances)
    status, body = await asyncio.to_thread(rest, stack, "/v1/balances?assets=USDT", trader.token)
    assert status == 200, body
    assert [(b["asset"], b["available"], b["held"]) for b in body["balances"]] == [
        ("USDT", "0", "0")
    ]


@pytest.mark.parametrize(("side", "asset"), [(BUY, "USDT"), (SELL, "BTC")])
async def test_an_order_an_unfunded_account_cannot_pay_is_insufficient_funds(
    stack: Stack, exchange: Exchange, side: int, asset: str
) -> None:
    trader = await exchange.trader(name="unfunded")
    order = {"market": "BTC-USDT", "price": "100", "quantity": "0.1"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await trader.place(side=side, **order)
    details = ErrorDetails.from_rpc_error(refused.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEDGER_INSUFFICIENT_FUNDS",
    ), details
    body = {
        "client_order_id": uid(),
        "side": t.Side.Name(side),
        "type": "ORDER_TYPE_LIMIT",
        **order,
    }
    status, reply = await asyncio.to_thread(rest, stack, "/v1/orders", trader.token, body)
    assert status == 400, (status, reply)
    assert reply["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0], reply
    reasons = [d.get("reason") for d in reply.get("details", [])]
    assert "LEDGER_INSUFFICIENT_FUNDS" in reasons, reply
    # the same refusal for an account that held the asset and has none left
    spent = await exchange.trader({asset: "1"}, name="spent")
    await exchange.deposit(spent.account_id, "USDT" if asset == "BTC" else "BTC", "1")
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await spent.place(side=side, market="BTC-USDT", price="100", quantity="1000")
    same = ErrorDetails.from_rpc_error(again.value)
    assert (same.code, same.reason) == (details.code, details.reason), same
