"""WatchRules and the order gateway's copy of the rules, against a real risk (PostgreSQL
and Redis): checks run on the followed copy answer what risk's CheckOrder answers,
changes arrive within a heartbeat, and a copy that hears nothing goes stale."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from cex.risk.v1 import risk_pb2 as R
from services.chassis import ExchangeError, load_catalog
from services.order.risk_checks import RULES_HEARD, RiskChecks, RulesFollower
from services.risk.bucket import RateLimiter
from services.risk.config import RiskConfig
from tests.integration.risk.support import SERVICE, Risk, denial, order, running_risk

HEARTBEAT_S = 0.2


class _Bearer(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """The follower's service token, as order's mesh channel carries it."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        details = details._replace(metadata=grpc.aio.Metadata(*SERVICE))
        return await continuation(details, request)


@pytest.fixture
async def risk(fresh_database_url: str, redis_url: str) -> AsyncIterator[tuple[Risk, str]]:
    prefix = f"risk:test:{uuid.uuid4().hex[:8]}:"
    config = RiskConfig(
        reload_interval_s=0.1, prices=False, redis_prefix=prefix, rules_heartbeat_s=HEARTBEAT_S
    )
    async with running_risk(fresh_database_url, redis_url, config=config) as running:
        yield running, prefix


@pytest.fixture
async def gateway(
    risk: tuple[Risk, str], redis_url: str
) -> AsyncIterator[tuple[RulesFollower, RiskChecks]]:
    """What order builds: a follower of risk's rules and the checks run on it."""
    import redis.asyncio

    running, prefix = risk
    catalog = load_catalog()
    client = redis.asyncio.from_url(redis_url)
    async with grpc.aio.insecure_channel(running.target, interceptors=[_Bearer()]) as channel:
        follower = RulesFollower(channel, catalog)
        task = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.ready.wait(), 10)
            yield follower, RiskChecks(follower, RateLimiter(client, prefix=prefix), catalog)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()


async def _reason(checks: RiskChecks, request: R.CheckOrderRequest) -> str:
    """ALLOWED or the denial's reason, from the checks run in this process."""
    try:
        await checks.check(request)
    except ExchangeError as error:
        return error.reason
    return "ALLOWED"


async def _eventually(checks: RiskChecks, request: Callable[[], R.CheckOrderRequest], want: str):
    for _ in range(50):
        if (got := await _reason(checks, request())) == want:
            return got
        await asyncio.sleep(HEARTBEAT_S / 4)
    return got


async def test_checks_on_the_followed_rules_answer_as_risk_does(
    risk: tuple[Risk, str], gateway: tuple[RulesFollower, RiskChecks]
) -> None:
    running, _ = risk
    follower, checks = gateway
    account, other = f"acc_{uuid.uuid4().hex[:8]}", f"acc_{uuid.uuid4().hex[:8]}"
    await running.set_limits(
        R.Limits(
            account_id=account,
            max_open_orders=5,
            markets=[R.MarketLimits(market="BTC-USDT", max_order_quantity="2")],
        )
    )
    cases = [
        order(account, quantity="1"),
        order(account, quantity="3"),  # over the market's max quantity
        order(account, quantity="1", open_orders=5),  # at the open-order limit
        order(other, quantity="3"),  # another account: the defaults
    ]
    await _eventually(checks, lambda: cases[1], "RISK_QUANTITY_LIMIT_EXCEEDED")
    for request in cases:
        answer = await running.check(request)
        want = "ALLOWED" if answer.allowed else denial(answer).reason
        assert await _reason(checks, request) == want, request
    assert follower.current().change_seq > 0
    # Nothing changes for a few heartbeats: they only say so, and the copy stays
    # the same object, fresh.
    copy = follower.current()
    await asyncio.sleep(HEARTBEAT_S * 5)
    assert follower.current() is copy

    # A kill switch reaches the copy within a heartbeat; so does its release.
    await running.kill(
        scope=R.KILL_SWITCH_SCOPE_MARKET, market="ETH-USDT", engaged=True, reason="incident"
    )
    eth = lambda: order(account, market="ETH-USDT", price="2000", quantity="1")  # noqa: E731
    assert await _eventually(checks, eth, "RISK_KILL_SWITCH_ENGAGED") == "RISK_KILL_SWITCH_ENGAGED"
    await running.kill(scope=R.KILL_SWITCH_SCOPE_MARKET, market="ETH-USDT", engaged=False)
    assert await _eventually(checks, eth, "ALLOWED") == "ALLOWED"


async def test_the_rate_buckets_are_shared_with_risk(
    risk: tuple[Risk, str], gateway: tuple[RulesFollower, RiskChecks]
) -> None:
    running, _ = risk
    follower, checks = gateway
    account = f"acc_{uuid.uuid4().hex[:8]}"
    await running.set_limits(R.Limits(account_id=account, max_orders_per_second=4))
    for _ in range(50):  # the new limit reached the copy (no check made: no token taken)
        if follower.current().limits(account).max_orders_per_second == 4:
            break
        await asyncio.sleep(HEARTBEAT_S / 4)
    here = [await _reason(checks, order(account)) for _ in range(2)]
    there = [(await running.check(order(account))).allowed for _ in range(2)]
    assert here == ["ALLOWED", "ALLOWED"] and there == [True, True]
    # The fifth within the second, whichever process checks it, is refused.
    assert await _reason(checks, order(account)) == "RISK_RATE_LIMITED"
    assert denial(await running.check(order(account))).reason == "RISK_RATE_LIMITED"


async def test_a_copy_that_hears_nothing_goes_stale(
    risk: tuple[Risk, str], gateway: tuple[RulesFollower, RiskChecks]
) -> None:
    running, _ = risk
    follower, checks = gateway
    assert await _reason(checks, order()) == "ALLOWED"
    heard = RULES_HEARD.collect()[0].samples[0].value
    assert time.time() - HEARTBEAT_S * 2 < heard <= time.time()
    await running.server.stop(0)
    await asyncio.sleep(HEARTBEAT_S * 4)
    # What the alert OrderRiskRulesStale watches.
    assert time.time() - RULES_HEARD.collect()[0].samples[0].value >= HEARTBEAT_S * 4
    with pytest.raises(ExchangeError) as stale:
        await checks.check(order())
    assert stale.value.reason == "ORDER_RISK_RULES_STALE"
    assert stale.value.code == grpc.StatusCode.UNAVAILABLE
    assert follower.rules is not None  # the copy is kept, only not used
