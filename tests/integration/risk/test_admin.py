"""Limits and kill switches: admin calls, idempotency, versions, visibility."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from cex.risk.v1 import risk_pb2 as R
from services.chassis.authn import ON_BEHALF_HEADER
from tests.integration.risk.support import (
    ADMIN,
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


async def test_defaults_and_overrides_merge(risk: Risk) -> None:
    defaults = (await risk.stub.GetLimits(R.GetLimitsRequest(), metadata=ADMIN)).limits
    assert (defaults.account_id, defaults.max_orders_per_second, defaults.version) == ("", 100, 1)
    assert [(m.market, m.price_band) for m in defaults.markets] == [("*", "0.1")]
    stored = await risk.set_limits(
        R.Limits(
            account_id="acc_a",
            max_orders_per_second=7,
            markets=[R.MarketLimits(market="ETH-USDT", max_order_quantity="3.5")],
            withdrawals=[R.WithdrawalLimits(asset="BTC", max_amount_per_day="2")],
        )
    )
    assert (stored.version, stored.max_orders_per_second) == (1, 7)
    assert stored.HasField("update_time")
    got = await risk.stub.GetLimits(R.GetLimitsRequest(account_id="acc_a"), metadata=SERVICE)
    effective = got.limits
    assert (effective.max_orders_per_second, effective.max_open_orders) == (7, 1000)
    markets = {m.market: m for m in effective.markets}
    assert (markets["ETH-USDT"].max_order_quantity, markets["ETH-USDT"].price_band) == (
        "3.5",
        "0.1",
    )
    assert [(w.asset, w.max_amount_per_day) for w in effective.withdrawals] == [("BTC", "2")]
    # An account without overrides gets the defaults, version 0.
    plain = (
        await risk.stub.GetLimits(R.GetLimitsRequest(account_id="acc_b"), metadata=ADMIN)
    ).limits
    assert (plain.account_id, plain.version, plain.max_orders_per_second) == ("acc_b", 0, 100)


async def test_set_limits_is_idempotent_and_versioned(risk: Risk) -> None:
    limits = R.Limits(account_id="acc_v", max_open_orders=9)
    first = await risk.set_limits(limits, request_id="r1")
    again = await risk.set_limits(limits, request_id="r1")
    assert again == first and first.version == 1
    reused = await rpc_error(
        risk.stub.SetLimits(
            R.SetLimitsRequest(request_id="r1", limits=R.Limits(account_id="acc_v")),
            metadata=ADMIN,
        )
    )
    assert (reused.code, reused.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "RISK_REQUEST_ID_REUSED",
    )
    second = await risk.set_limits(
        R.Limits(account_id="acc_v", max_open_orders=8), expected_version=1
    )
    assert second.version == 2
    stale = await rpc_error(
        risk.stub.SetLimits(
            R.SetLimitsRequest(request_id="r3", limits=limits, expected_version=1), metadata=ADMIN
        )
    )
    assert (stale.code, stale.reason, stale.metadata["version"]) == (
        grpc.StatusCode.ABORTED,
        "RISK_VERSION_MISMATCH",
        "2",
    )
    got = await risk.stub.GetLimits(R.GetLimitsRequest(account_id="acc_v"), metadata=ADMIN)
    assert (got.limits.max_open_orders, got.limits.version) == (8, 2)


async def test_bad_limits_name_every_field(risk: Risk) -> None:
    bad = await rpc_error(
        risk.stub.SetLimits(
            R.SetLimitsRequest(
                request_id="x",
                limits=R.Limits(
                    max_orders_per_second=-1,
                    markets=[
                        R.MarketLimits(market="DOGE-USDT"),
                        R.MarketLimits(market="BTC-USDT", max_order_quantity="0.000001"),
                        R.MarketLimits(market="BTC-USDT", price_band="0.00001"),
                        R.MarketLimits(market="*", max_order_notional="0", price_band="2"),
                    ],
                    withdrawals=[R.WithdrawalLimits(asset="BTC", max_amount="1.000000001")],
                ),
            ),
            metadata=ADMIN,
        )
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RISK_LIMITS_INVALID")
    assert {(v.field, v.reason) for v in bad.violations} == {
        ("limits.max_orders_per_second", "OUT_OF_RANGE"),
        ("limits.markets[0].market", "NOT_FOUND"),
        ("limits.markets[1].max_order_quantity", "OFF_GRID"),
        ("limits.markets[2].market", "DUPLICATE"),
        ("limits.markets[2].price_band", "OFF_GRID"),
        ("limits.markets[3].max_order_notional", "NOT_POSITIVE"),
        ("limits.markets[3].price_band", "OUT_OF_RANGE"),
        ("limits.withdrawals[0].max_amount", "OFF_GRID"),
    }
    missing = await rpc_error(risk.stub.SetLimits(R.SetLimitsRequest(), metadata=ADMIN))
    assert {v.field for v in missing.violations} == {"request_id", "limits"}


async def test_kill_switch_validation_idempotency_and_listing(risk: Risk) -> None:
    bad = await rpc_error(
        risk.stub.SetKillSwitch(
            R.SetKillSwitchRequest(
                request_id="k0",
                scope=R.KILL_SWITCH_SCOPE_MARKET,
                market="DOGE-USDT",
                account_id="acc",
                block_withdrawals=True,
                engaged=True,
            ),
            metadata=ADMIN,
        )
    )
    assert {v.field for v in bad.violations} == {
        "market",
        "account_id",
        "block_withdrawals",
        "reason",
    }
    first = await risk.kill(
        request_id="k1", scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_z", engaged=True
    )
    again = await risk.kill(
        request_id="k1", scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_z", engaged=True
    )
    assert again == first and first.updated_by == "acc_admin" and first.engaged
    for i in range(3):
        await risk.kill(scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id=f"acc_{i}", engaged=True)
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_1", engaged=False)
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=False)
    seen, page_token = [], ""
    while True:
        page = await risk.stub.ListKillSwitches(
            R.ListKillSwitchesRequest(page_size=2, page_token=page_token), metadata=ADMIN
        )
        seen.extend((s.scope, s.account_id, s.engaged) for s in page.kill_switches)
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == [
        (R.KILL_SWITCH_SCOPE_GLOBAL, "", False),
        (R.KILL_SWITCH_SCOPE_ACCOUNT, "acc_0", True),
        (R.KILL_SWITCH_SCOPE_ACCOUNT, "acc_1", False),
        (R.KILL_SWITCH_SCOPE_ACCOUNT, "acc_2", True),
        (R.KILL_SWITCH_SCOPE_ACCOUNT, "acc_z", True),
    ]
    engaged = await risk.stub.ListKillSwitches(
        R.ListKillSwitchesRequest(engaged_only=True), metadata=SERVICE
    )
    assert [s.account_id for s in engaged.kill_switches] == ["acc_0", "acc_2", "acc_z"]
    bad_token = await rpc_error(
        risk.stub.ListKillSwitches(R.ListKillSwitchesRequest(page_token="nope"), metadata=ADMIN)
    )
    assert bad_token.reason == "RISK_PAGE_TOKEN_INVALID"


async def test_users_see_only_their_own(risk: Risk) -> None:
    await risk.set_limits(R.Limits(account_id="acc_me", max_open_orders=4))
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id="acc_other", engaged=True)
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_MARKET, market="BTC-USDT", engaged=True)
    me = bearer(token("acc_me", "read"))
    mine = await risk.stub.GetLimits(R.GetLimitsRequest(), metadata=me)
    assert (mine.limits.account_id, mine.limits.max_open_orders) == ("acc_me", 4)
    other = await rpc_error(
        risk.stub.GetLimits(R.GetLimitsRequest(account_id="acc_other"), metadata=me)
    )
    assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "RISK_LIMITS_NOT_FOUND")
    listed = await risk.stub.ListKillSwitches(R.ListKillSwitchesRequest(), metadata=me)
    assert [s.scope for s in listed.kill_switches] == [R.KILL_SWITCH_SCOPE_MARKET]
    # A service acting for the user sees what the user sees.
    for_me = (*SERVICE, (ON_BEHALF_HEADER, me[0][1]))
    relayed = await rpc_error(
        risk.stub.GetLimits(R.GetLimitsRequest(account_id="acc_other"), metadata=for_me)
    )
    assert relayed.reason == "RISK_LIMITS_NOT_FOUND"
    relayed_set = await rpc_error(
        risk.stub.SetLimits(
            R.SetLimitsRequest(request_id="rel", limits=R.Limits(account_id="acc_me")),
            metadata=for_me,
        )
    )
    assert (relayed_set.code, relayed_set.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RISK_ADMIN_REQUIRED",
    )
    for call in (
        risk.stub.SetLimits(
            R.SetLimitsRequest(request_id=uuid.uuid4().hex, limits=R.Limits(account_id="acc_me")),
            metadata=me,
        ),
        risk.stub.SetKillSwitch(
            R.SetKillSwitchRequest(
                request_id="u", scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=False, reason="mine"
            ),
            metadata=bearer(token("acc_me", "read", "trade", "withdraw")),
        ),
    ):
        refused = await rpc_error(call)
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_SCOPE_MISSING",
        )


async def test_limits_and_switches_survive_a_restart(risk: Risk, redis_url: str) -> None:
    await risk.set_limits(R.Limits(account_id="acc_r", max_open_orders=2))
    await risk.kill(scope=R.KILL_SWITCH_SCOPE_MARKET, market="ETH-USDT", engaged=True)
    await risk.server.stop(0)
    async with running_risk(risk.database_url, redis_url) as again:
        got = await again.stub.GetLimits(R.GetLimitsRequest(account_id="acc_r"), metadata=ADMIN)
        assert got.limits.max_open_orders == 2
        halted = denial(await again.check(order("acc_r", market="ETH-USDT")))
        assert halted.reason == "RISK_KILL_SWITCH_ENGAGED"
        full = denial(await again.check(order("acc_r", open_orders=2)))
        assert full.reason == "RISK_OPEN_ORDERS_LIMIT_EXCEEDED"


async def test_replicas_agree_on_switches(risk: Risk, redis_url: str) -> None:
    from services.risk.config import RiskConfig

    slow = RiskConfig(reload_interval_s=3600, prices=False, redis_prefix="risk:test:replica:")
    async with running_risk(risk.database_url, redis_url, config=slow) as other:
        await risk.kill(scope=R.KILL_SWITCH_SCOPE_GLOBAL, engaged=True, block_withdrawals=True)
        # A withdrawal reads the switches as PostgreSQL has them, whatever the reload tick.
        halted = denial(await other.withdraw(withdrawal("rw1", "acc_rep")))
        assert halted.reason == "RISK_WITHDRAWALS_HALTED"
        # And having reloaded, so do its order checks.
        assert denial(await other.check(order("acc_rep"))).reason == "RISK_KILL_SWITCH_ENGAGED"


async def test_a_replica_learns_a_change_at_once_not_at_its_next_reload(
    risk: Risk, redis_url: str
) -> None:
    """The writing transaction NOTIFYs; a replica polling only hourly still sees a
    kill switch at its next order check, and the lifting of it."""
    from services.risk.config import RiskConfig

    slow = RiskConfig(reload_interval_s=3600, prices=False, redis_prefix="risk:test:notify:")
    async with running_risk(risk.database_url, redis_url, config=slow) as other:
        account = f"acc_{uuid.uuid4().hex[:8]}"
        assert (await other.check(order(account))).allowed
        for engaged, wanted in ((True, "RISK_KILL_SWITCH_ENGAGED"), (False, "")):
            await risk.kill(scope=R.KILL_SWITCH_SCOPE_ACCOUNT, account_id=account, engaged=engaged)
            for _ in range(500):  # 5 s: an hour's poll would never make it
                if _reason(await other.check(order(account))) == wanted:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the other replica did not learn engaged={engaged}")


def _reason(reply: R.CheckOrderResponse) -> str:
    return "" if reply.allowed else denial(reply).reason
