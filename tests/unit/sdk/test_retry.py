"""The SDK's retry rules: which calls may be resent, and how long to wait."""

from __future__ import annotations

import grpc
import pytest

from cex.auth.v1 import auth_pb2
from cex.ledger.v1 import ledger_pb2
from cex.order.v1 import order_pb2
from cex_sdk.retry import RetryPolicy, has_idempotency_key, is_read, may_retry

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("method", "read"),
    [
        ("/cex.ledger.v1.LedgerService/GetBalances", True),
        ("/cex.auth.v1.AuthService/ListApiKeys", True),
        ("/cex.ledger.v1.LedgerService/AuditLedger", True),
        ("/cex.auth.v1.AuthService/IssueToken", True),
        ("/grpc.health.v1.Health/Check", True),
        ("/cex.order.v1.OrderService/PlaceOrder", False),
        ("/cex.order.v1.OrderService/CancelOrder", False),
        ("/cex.ledger.v1.LedgerService/CreateTransfers", False),
        ("/cex.auth.v1.AuthService/RevokeApiKey", False),
    ],
)
def test_reads_are_known_by_their_verb(method: str, read: bool) -> None:
    assert is_read(method) is read


def _transfer(tid: str) -> ledger_pb2.Transfer:
    return ledger_pb2.Transfer(id=tid, debit_account_id="a", credit_account_id="b", asset="USDT")


@pytest.mark.parametrize(
    ("request_message", "keyed"),
    [
        (order_pb2.PlaceOrderRequest(client_order_id="c1", market="BTC-USDT"), True),
        (order_pb2.PlaceOrderRequest(market="BTC-USDT"), False),
        # CancelOrder's key is its request_id; client_order_id names the target.
        (order_pb2.CancelOrderRequest(request_id="r1", order_id="o1"), True),
        (order_pb2.CancelOrderRequest(client_order_id="c1"), False),
        (auth_pb2.RevokeApiKeyRequest(request_id="r", api_key_id="ak"), True),
        (auth_pb2.RevokeApiKeyRequest(api_key_id="ak"), False),
        (ledger_pb2.PostPendingTransferRequest(id="t2", pending_id="t1"), True),
        (ledger_pb2.PostPendingTransferRequest(pending_id="t1"), False),
        (ledger_pb2.CreateTransfersRequest(transfers=[_transfer("t1"), _transfer("t2")]), True),
        (ledger_pb2.CreateTransfersRequest(transfers=[_transfer("t1"), _transfer("")]), False),
        (ledger_pb2.CreateTransfersRequest(), False),
        (
            order_pb2.BatchPlaceOrdersRequest(
                requests=[order_pb2.PlaceOrderRequest(client_order_id="a")]
            ),
            True,
        ),
        (order_pb2.BatchPlaceOrdersRequest(requests=[order_pb2.PlaceOrderRequest()]), False),
    ],
)
def test_a_mutating_request_needs_its_idempotency_key(request_message: object, keyed: bool) -> None:
    assert has_idempotency_key(request_message) is keyed  # type: ignore[arg-type]


def test_only_unavailable_and_resource_exhausted_are_retried() -> None:
    read = "/cex.ledger.v1.LedgerService/GetBalances"
    request = ledger_pb2.GetBalancesRequest()
    retried = {code for code in grpc.StatusCode if may_retry(read, request, code)}
    assert retried == {UNAVAILABLE, EXHAUSTED}


def test_a_mutating_call_is_retried_only_with_its_key() -> None:
    place = "/cex.order.v1.OrderService/PlaceOrder"
    assert may_retry(place, order_pb2.PlaceOrderRequest(client_order_id="c"), UNAVAILABLE)
    assert may_retry(place, order_pb2.PlaceOrderRequest(client_order_id="c"), EXHAUSTED)
    assert not may_retry(place, order_pb2.PlaceOrderRequest(), UNAVAILABLE)
    assert not may_retry(place, order_pb2.PlaceOrderRequest(), EXHAUSTED)
    # Even a keyed call is not resent after an answer that is not transient.
    failed = grpc.StatusCode.FAILED_PRECONDITION
    assert not may_retry(place, order_pb2.PlaceOrderRequest(client_order_id="c"), failed)


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    assert [policy.backoff_cap_s(n) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )


def test_full_jitter_spans_zero_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0)
    assert policy.delay_s(3, None, lambda: 0.0) == 0.0
    assert policy.delay_s(3, None, lambda: 0.5) == pytest.approx(0.2)
    assert policy.delay_s(3, None, lambda: 0.999) == pytest.approx(0.3996)


def test_retry_info_is_a_floor_under_the_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0)
    assert policy.delay_s(1, 1.0, lambda: 0.0) == pytest.approx(1.0)
    assert policy.delay_s(1, 1.0, lambda: 0.5) == pytest.approx(1.05)
    # A server's delay longer than max_backoff_s is honoured, not cut.
    assert policy.delay_s(1, 7.5, lambda: 0.0) == pytest.approx(7.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff_s": -1.0},
        {"initial_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"multiplier": 0.5},
    ],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
