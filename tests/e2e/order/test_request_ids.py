"""One rule for idempotency keys on mutating calls (ADR 0003, issue 18): required;
empty is INVALID_ARGUMENT with a BadRequest field violation naming the field, in
auth, funding, the ledger and order alike, over gRPC through Envoy and over REST."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.funding.v1 import funding_pb2, funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.order.v1 import order_pb2
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails, ServiceCredentials
from tests.e2e.order.support import Exchange
from tests.rest import rest

ETH = "0x" + "b" * 40


def _md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _refused(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return ErrorDetails.from_rpc_error(failure.value)


async def test_an_empty_request_id_is_refused_naming_the_field_in_every_service(
    stack: Stack, exchange: Exchange, service_credentials: ServiceCredentials
) -> None:
    operator = _md(await service_credentials.token())
    user = await exchange.trader({"USDT": "100"}, name="keys")
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "auth.CreateAccount": lambda: auth.CreateAccount(
                auth_pb2.CreateAccountRequest(display_name="x"), metadata=operator, timeout=10
            ),
            "auth.CreateApiKey": lambda: auth.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(
                    account_id=user.account_id, scopes=[auth_pb2.API_KEY_SCOPE_READ]
                ),
                metadata=operator,
                timeout=10,
            ),
            "auth.SetAccountState": lambda: auth.SetAccountState(
                auth_pb2.SetAccountStateRequest(
                    account_id=user.account_id, state=auth_pb2.ACCOUNT_STATE_SUSPENDED
                ),
                metadata=operator,
                timeout=10,
            ),
            "auth.RevokeApiKey": lambda: auth.RevokeApiKey(
                auth_pb2.RevokeApiKeyRequest(api_key_id="ak_none"), metadata=operator, timeout=10
            ),
            "funding.RequestWithdrawal": lambda: funding.RequestWithdrawal(
                funding_pb2.RequestWithdrawalRequest(
                    account_id=user.account_id, asset="USDT", amount="10", address=ETH
                ),
                metadata=operator,
                timeout=10,
            ),
            "funding.CancelWithdrawal": lambda: funding.CancelWithdrawal(
                funding_pb2.CancelWithdrawalRequest(
                    account_id=user.account_id, withdrawal_id="wd_none"
                ),
                metadata=operator,
                timeout=10,
            ),
            "ledger.PostPendingTransfer": lambda: ledger.PostPendingTransfer(
                ledger_pb2.PostPendingTransferRequest(pending_id="p_none"),
                metadata=operator,
                timeout=10,
            ),
            "ledger.VoidPendingTransfer": lambda: ledger.VoidPendingTransfer(
                ledger_pb2.VoidPendingTransferRequest(pending_id="p_none"),
                metadata=operator,
                timeout=10,
            ),
            "order.CancelOrder": lambda: user.orders.CancelOrder(
                order_pb2.CancelOrderRequest(order_id="o_none"), metadata=user.md, timeout=10
            ),
            "order.AmendOrder": lambda: user.orders.AmendOrder(
                order_pb2.AmendOrderRequest(order_id="o_none", quantity="1"),
                metadata=user.md,
                timeout=10,
            ),
            "order.CancelAllOrders": lambda: user.orders.CancelAllOrders(
                order_pb2.CancelAllOrdersRequest(), metadata=user.md, timeout=10
            ),
            "order.CancelAllAfter": lambda: user.orders.CancelAllAfter(
                order_pb2.CancelAllAfterRequest(timeout_seconds=5), metadata=user.md, timeout=10
            ),
        }
        fields = {"ledger.PostPendingTransfer": "id", "ledger.VoidPendingTransfer": "id"}
        for name, call in calls.items():
            details = await _refused(call())
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
            assert details.domain == name.split(".")[0], (name, details)
            assert [v.field for v in details.violations] == [fields.get(name, "request_id")], (
                name,
                details,
            )
        # A batch item without its id fails alone, naming its place in the batch.
        reply = await ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(
                transfers=[
                    ledger_pb2.Transfer(
                        id="", debit_account_id="sys:custody", credit_account_id=user.account_id,
                        asset="USDT", amount="1", kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                    )
                ]
            ),
            metadata=operator,
            timeout=10,
        )  # fmt: skip
        item = ErrorDetails.from_status(reply.results[0].status)
        assert (item.code, item.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "LEDGER_ID_INVALID")
        assert [v.field for v in item.violations] == ["transfers[0].id"]
        # and nothing moved
        balances = await ledger.GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=user.account_id, assets=["USDT"]),
            metadata=operator,
            timeout=10,
        )
        assert balances.balances[0].available == "100"


async def test_over_rest_too(stack: Stack, exchange: Exchange) -> None:
    user = await exchange.trader(name="rest-keys")
    status, body = await asyncio.to_thread(
        rest, stack, "/v1/apiKeys", user.token, {"scopes": ["API_KEY_SCOPE_READ"]}
    )
    assert status == 400, body
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = [
        v["field"]
        for d in body["details"]
        if d["@type"].endswith("google.rpc.BadRequest")
        for v in d["field_violations"]
    ]
    assert violations == ["request_id"], body
