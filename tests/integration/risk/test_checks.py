"""CheckOrder and CheckWithdrawal against real PostgreSQL and Redis (an in-process
risk on a fresh database)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from cex.risk.v1 import risk_pb2 as R
from cex.type.v1 import types_pb2 as T
from services.chassis import ErrorDetails
from tests.integration.risk.support import (
    SERVICE,
    Risk,
    bearer,
    denial,
    order,
    rpc_error,
    running_risk,
    token,
    withdrawal,
)


@pytest.fixture
async def risk(fresh_database_url: str, redis_url: str) -> AsyncIterator[Risk]:
    async with running_risk(fresh_database_url, redis_url) as running:
        yield running


def account() -> str:
    return f"acc_{uuid.uuid4().hex[:10]}"


async def test_an_order_within_limits_is_allowed_and_reports_its_budget(risk: Risk) -> None:
    call = risk.stub.CheckOrder(order(account()), metadata=SERVICE)
    reply = await call
    assert reply.allowed and not reply.HasField("denial")
    assert (reply.rate_limit.limit, reply.rate_limit.used, reply.rate_limit.remaining) == (
        100,
        1,
        99,
    )
    metadata = dict(await call.initial_metadata())
    assert metadata["x-cex-order-limit-1s"] == "100"
    assert metadata["x-cex-order-count-1s"] == "1"
    assert reply.reference_price == ""  # no trade yet: no band


async def test_malformed_orders_are_invalid_argument_with_every_field(risk: Risk) -> None:
    bad = await rpc_error(
        risk.stub.CheckOrder(
            R.CheckOrderRequest(market="BTC-USDT", type=T.ORDER_TYPE_LIMIT), metadata=SERVICE
        )
    )
    assert (bad.code, bad.reason, bad.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "RISK_ORDER_INVALID",
        "risk",
    )
    assert {v.field for v in bad.violations} == {"account_id", "side"}
    grid = await rpc_error(risk.check(order(account(), price="100.001", quantity="1e3")))
    assert grid.reason == "RISK_ORDER_INVALID"
    assert {(v.field, v.reason) for v in grid.violations} == {
        ("price", "OFF_GRID"),
        ("quantity", "MALFORMED"),
    }
    negative = await rpc_error(risk.check(order(account(), price="-5", quantity="0")))
    assert {v.field for v in negative.violations} == {"price", "quantity"}
    market = await rpc_error(
        risk.check(order(account(), type=T.ORDER_TYPE_MARKET, price="100", quantity="1"))
    )
    assert [(v.field, v.reason) for v in market.violations] == [("price", "NOT_ALLOWED")]
    unknown = await rpc_error(risk.check(order(account(), market="DOGE-USDT")))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "RISK_MARKET_NOT_FOUND")
    # A market buy by quote budget needs no quantity; quantity and budget together are refused.
    budget = order(account(), type=T.ORDER_TYPE_MARKET, price="", quantity="", quote_quantity="50")
    assert (await risk.check(budget)).allowed
    both = order(account(), type=T.ORDER_TYPE_MARKET, price="", quote_quantity="50")
    assert (await rpc_error(risk.check(both))).violations[0].reason == "CONFLICT"


async def test_quantity_and_notional_limits_per_market(risk: Risk) -> None:
    acc = account()
    await risk.set_limits(
        R.Limits(
            account_id=acc,
            markets=[
                R.MarketLimits(market="BTC-USDT", max_order_quantity="2", max_order_notional="1000")
            ],
        )
    )
    too_big = denial(await risk.check(order(acc, price="1", quantity="2.00001")))
    assert (too_big.code, too_big.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RISK_QUANTITY_LIMIT_EXCEEDED",
    )
    too_much = denial(await risk.check(order(acc, price="500.01", quantity="2")))
    assert too_much.reason == "RISK_NOTIONAL_LIMIT_EXCEEDED"
    assert too_much.metadata["limit"] == "1000"
    assert (await risk.check(order(acc, price="500", quantity="2"))).allowed
    # Other markets and other accounts keep the defaults (no quantity limit).
    assert (await risk.check(order(acc, market="ETH-USDT", price="500", quantity="50"))).allowed
    assert (await risk.check(order(account(), price="500", quantity="50"))).allowed
    # A stop-limit's notional is its limit price; a market sell with no reference has none.
    stop = order(acc, type=T.ORDER_TYPE_STOP_LIMIT, price="600", stop_price="550", quantity="2")
    assert denial(await risk.check(stop)).reason == "RISK_NOTIONAL_LIMIT_EXCEEDED"
    sell = order(acc, side=T.SIDE_SELL, type=T.ORDER_TYPE_MARKET, price="", quantity="2")
    assert (await risk.check(sell)).allowed


async def test_open_order_limits_count_what_the_order_service_reports(risk: Risk) -> None:
    acc = account()
    await risk.set_limits(
        R.Limits(
            account_id=acc,
            max_open_orders=3,
            markets=[R.MarketLimits(market="ETH-USDT", max_open_orders=2)],
        )
    )
    assert (await risk.check(order(acc, open_orders=2, market_open_orders=2))).allowed
    full = denial(await risk.check(order(acc, open_orders=3)))
    assert full.reason == "RISK_OPEN_ORDERS_LIMIT_EXCEEDED" and full.metadata["limit"] == "3"
    eth = order(acc, market="ETH-USDT", open_orders=2, market_open_orders=2)
    assert denial(await risk.check(eth)).metadata["market"] == "ETH-USDT"
    # An amend adds no order.
    amend = order(acc, open_orders=3, action=R.ORDER_ACTION_AMEND)
    assert (await risk.check(amend)).allowed


async def test_rate_limit_is_a_token_bucket_with_retry_info(risk: Risk) -> None:
    acc = account()
    await risk.set_limits(R.Limits(account_id=acc, max_orders_per_second=5))
    started = time.monotonic()
    replies = [await risk.check(order(acc)) for _ in range(20)]
    elapsed = time.monotonic() - started
    allowed = sum(r.allowed for r in replies)
    # A bucket of 5 refilled at 5/s cannot have let through more than this.
    assert 5 <= allowed <= 5 + int(elapsed * 5) + 1
    limited = [denial(r) for r in replies if not r.allowed]
    assert limited, "nothing was rate limited"
    first = limited[0]
    assert (first.code, first.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RISK_RATE_LIMITED")
    assert first.retry_after_s is not None and 0 < first.retry_after_s <= 0.2
    assert replies[-1].rate_limit.limit == 5
    # Another account has its own bucket.
    assert (await risk.check(order(account()))).allowed
    # SREs see the denials by reason.
    assert risk.metric("risk_checks_total", method="CheckOrder", outcome="RISK_RATE_LIMITED") == (
        len(limited)
    )
    assert risk.metric("risk_ratelimit_local_fallbacks_total") == 0


async def test_kill_switches_put_their_scope_in_cancel_only(risk: Risk) -> None:
    acc, other = account(), account()
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_MARKET, market="ETH-USDT", engaged=True)
    halted = denial(await risk.check(order(acc, market="ETH-USDT")))
    assert (halted.reason, halted.metadata["scope"]) == ("RISK_KILL_SWITCH_ENGAGED", "MARKET")
    amend = order(acc, market="ETH-USDT", action=R.ORDER_ACTION_AMEND)
    assert denial(await risk.check(amend)).reason == "RISK_KILL_SWITCH_ENGAGED"
    assert (await risk.check(order(acc))).allowed
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id=acc, engaged=True)
    assert denial(await risk.check(order(acc))).metadata["scope"] == "ACCOUNT"
    assert (await risk.check(order(other))).allowed
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=True, reason="incident 42")
    stopped = denial(await risk.check(order(other)))
    assert stopped.metadata["scope"] == "GLOBAL" and "incident 42" in stopped.message
    for scope, fields in (
        (R.KILL_SWITCH_SCOPE_GLOBAL, {}),
        (R.KILL_SWITCH_SCOPE_MARKET, {"market": "ETH-USDT"}),
    ):
        await risk.kill(scope=scope, engaged=False, **fields)
    assert (await risk.check(order(other, market="ETH-USDT"))).allowed
    assert denial(await risk.check(order(acc))).reason == "RISK_KILL_SWITCH_ENGAGED"


async def test_withdrawal_limits_over_a_rolling_day(risk: Risk) -> None:
    acc = account()
    await risk.set_limits(
        R.Limits(
            account_id=acc,
            withdrawals=[
                R.WithdrawalLimits(
                    asset="BTC", max_amount="2", max_amount_per_day="3", max_count_per_day=3
                )
            ],
        )
    )
    assert (await risk.withdraw(withdrawal("w1", acc, amount="1.5"))).allowed
    single = denial(await risk.withdraw(withdrawal("w2", acc, amount="2.00000001")))
    assert (single.reason, single.metadata["limit"]) == (
        "RISK_WITHDRAWAL_LIMIT_EXCEEDED",
        "max_amount",
    )
    assert (await risk.withdraw(withdrawal("w3", acc, amount="1.5"))).allowed
    day = denial(await risk.withdraw(withdrawal("w4", acc, amount="0.00000001")))
    assert day.metadata["limit"] == "max_amount_per_day"
    # A retried check gives its first answer and counts once.
    assert (await risk.withdraw(withdrawal("w1", acc, amount="1.5"))).allowed
    assert not (await risk.withdraw(withdrawal("w2", acc, amount="2.00000001"))).allowed
    reused = await rpc_error(risk.withdraw(withdrawal("w1", acc, amount="1")))
    assert (reused.code, reused.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "RISK_WITHDRAWAL_ID_REUSED",
    )
    # Other assets are not limited by default; the count limit applies on its own.
    await risk.set_limits(
        R.Limits(account_id=acc, withdrawals=[R.WithdrawalLimits(asset="*", max_count_per_day=1)])
    )
    assert (await risk.withdraw(withdrawal("e1", acc, asset="ETH", amount="1000"))).allowed
    count = denial(await risk.withdraw(withdrawal("e2", acc, asset="ETH", amount="1")))
    assert count.metadata["limit"] == "max_count_per_day"


async def test_withdrawal_kill_switches_and_validation(risk: Risk) -> None:
    acc, other = account(), account()
    await risk.kill(
        scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id=acc, engaged=True, block_withdrawals=True
    )
    frozen = denial(await risk.withdraw(withdrawal("f1", acc)))
    assert (frozen.code, frozen.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RISK_ACCOUNT_FROZEN",
    )
    assert (await risk.withdraw(withdrawal("f2", other))).allowed
    # A trading-only global switch does not stop withdrawals; one that blocks them does.
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=True)
    assert (await risk.withdraw(withdrawal("f3", other))).allowed
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=True, block_withdrawals=True)
    assert denial(await risk.withdraw(withdrawal("f4", other))).reason == "RISK_WITHDRAWALS_HALTED"
    bad = await rpc_error(risk.withdraw(R.CheckWithdrawalRequest(asset="BTC", amount="0.1.2")))
    assert bad.reason == "RISK_WITHDRAWAL_INVALID"
    assert {v.field for v in bad.violations} == {"withdrawal_id", "account_id"}
    grid = await rpc_error(risk.withdraw(withdrawal("g1", acc, amount="0.000000001")))
    assert [(v.field, v.reason) for v in grid.violations] == [("amount", "OFF_GRID")]
    unknown = await rpc_error(risk.withdraw(withdrawal("g2", acc, asset="DOGE")))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "RISK_ASSET_NOT_FOUND")


async def test_only_services_may_check(risk: Risk) -> None:
    missing = await rpc_error(risk.stub.CheckOrder(order(account())))
    assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, "AUTH_TOKEN_MISSING")
    as_user = bearer(token("acc_1", "trade", "read", "withdraw"))
    for call in (
        risk.stub.CheckOrder(order("acc_1"), metadata=as_user),
        risk.stub.CheckWithdrawal(withdrawal("x", "acc_1"), metadata=as_user),
    ):
        refused = await rpc_error(call)
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_INTERNAL_ONLY",
        )


async def test_concurrent_checks_never_overshoot_the_limits(risk: Risk) -> None:
    acc = account()
    await risk.set_limits(
        R.Limits(
            account_id=acc,
            max_orders_per_second=10,
            withdrawals=[R.WithdrawalLimits(asset="ETH", max_amount_per_day="1")],
        )
    )
    started = time.monotonic()
    replies = await asyncio.gather(*(risk.check(order(acc)) for _ in range(40)))
    elapsed = time.monotonic() - started
    # One Lua script per check: concurrent takes cannot both spend the last token.
    assert 10 <= sum(r.allowed for r in replies) <= 10 + int(elapsed * 10) + 1
    # Withdrawals of one account and asset are decided one at a time.
    checks = await asyncio.gather(
        *(
            risk.withdraw(withdrawal(f"c{i}-{acc}", acc, asset="ETH", amount="0.3"))
            for i in range(10)
        )
    )
    assert sum(c.allowed for c in checks) == 3


async def test_check_orders_answers_each_check_as_check_order_would(risk: Risk) -> None:
    acc, limited = account(), account()
    await risk.set_limits(R.Limits(account_id=limited, max_orders_per_second=3))
    checks = [
        order(acc),
        R.CheckOrderRequest(market="BTC-USDT", type=T.ORDER_TYPE_LIMIT),  # malformed
        order(acc, market="DOGE-USDT"),  # unknown market
        order(acc, price="100.001"),  # off the grid
        *(order(limited) for _ in range(5)),  # one account's bucket, taken in order
    ]
    reply = await risk.stub.CheckOrders(R.CheckOrdersRequest(checks=checks), metadata=SERVICE)
    results = list(reply.results)
    assert len(results) == len(checks)
    ok = results[0]
    assert ok.status.code == 0 and ok.response.allowed and ok.response.rate_limit.used == 1
    # Errors are the item's own, with CheckOrder's reasons and field violations.
    malformed = ErrorDetails.from_status(results[1].status)
    assert (malformed.code, malformed.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "RISK_ORDER_INVALID",
    )
    assert {v.field for v in malformed.violations} == {"account_id", "side"}
    unknown = ErrorDetails.from_status(results[2].status)
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "RISK_MARKET_NOT_FOUND")
    grid = ErrorDetails.from_status(results[3].status)
    assert [(v.field, v.reason) for v in grid.violations] == [("price", "OFF_GRID")]
    assert not any(r.HasField("response") for r in results[1:4])
    # Denials are answers: the bucket of 3 lets the first three through, in order.
    bucket = [r.response for r in results[4:]]
    assert [r.allowed for r in bucket] == [True, True, True, False, False]
    assert [r.rate_limit.used for r in bucket[:3]] == [1, 2, 3]
    late = denial(bucket[3])
    assert (late.code, late.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RISK_RATE_LIMITED")
    assert risk.metric("risk_checks_total", method="CheckOrder", outcome="RISK_RATE_LIMITED") == 2
    # The same service-only rule, and a bounded batch.
    refused = await rpc_error(
        risk.stub.CheckOrders(
            R.CheckOrdersRequest(checks=[order("acc_1")]),
            metadata=bearer(token("acc_1", "trade")),
        )
    )
    assert refused.reason == "AUTH_INTERNAL_ONLY"
    empty = await rpc_error(risk.stub.CheckOrders(R.CheckOrdersRequest(), metadata=SERVICE))
    assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RISK_REQUEST_INVALID")
