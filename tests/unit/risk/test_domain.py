"""Risk's pure logic: merging limits, bands in basis points, the order and
withdrawal checks, and the token bucket's arithmetic."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.chassis import MoneyError
from services.chassis.markets import DEFAULT_CATALOG
from services.risk.bucket import LocalBuckets
from services.risk.domain import (
    KillSwitch,
    KillSwitches,
    Limits,
    MarketLimits,
    OrderCheck,
    Scope,
    WithdrawalCheck,
    WithdrawalLimits,
    band_bps,
    check_order,
    check_withdrawal,
    market_rule,
    merge,
)

BTC = DEFAULT_CATALOG.markets["BTC-USDT"]
DEFAULTS = Limits(
    max_orders_per_second=100,
    max_open_orders=1000,
    markets=(
        MarketLimits("*", price_band="0.1"),
        MarketLimits("BTC-USDT", max_order_quantity="10", max_open_orders=50),
    ),
    withdrawals=(WithdrawalLimits("*", max_amount="100"),),
)


def test_the_most_specific_set_value_wins() -> None:
    override = Limits(
        account_id="acc",
        max_open_orders=5,
        markets=(
            MarketLimits("*", max_order_quantity="1"),
            MarketLimits("ETH-USDT", "", "", "0.02"),
        ),
        withdrawals=(WithdrawalLimits("BTC", max_count_per_day=3),),
    )
    merged = merge(DEFAULTS, override)
    assert (merged.max_orders_per_second, merged.max_open_orders) == (100, 5)
    btc = market_rule(merged, "BTC-USDT")
    # The account's "*" beats the defaults' own BTC-USDT entry; unset fields inherit.
    assert (btc.max_quantity, btc.band_bps, btc.max_open_orders) == (Decimal(1), 1000, 50)
    eth = market_rule(merged, "ETH-USDT")
    assert (eth.max_quantity, eth.band_bps) == (Decimal(1), 200)
    assert market_rule(merged, "ETH-BTC").band_bps == 1000
    by_asset = {w.asset: w for w in merged.withdrawals}
    assert (by_asset["BTC"].max_amount, by_asset["BTC"].max_count_per_day) == ("100", 3)
    assert merge(DEFAULTS, None) == DEFAULTS
    assert Limits.from_json("acc", override.to_json()) == override


@pytest.mark.parametrize(
    ("text", "bps"), [("0.05", 500), ("0.0001", 1), ("1", 10_000), ("0.1000", 1000)]
)
def test_bands_are_whole_basis_points(text: str, bps: int) -> None:
    assert band_bps(text) == bps


@pytest.mark.parametrize("text", ["0.00005", "0", "-0.01", "5%", "1e-2"])
def test_other_bands_are_refused(text: str) -> None:
    with pytest.raises(MoneyError):
        band_bps(text)


def _order(price: int | None, lots: int | None = 100_000, **kw: object) -> OrderCheck:
    fields: dict[str, object] = {
        "account_id": "acc",
        "market": BTC,
        "amend": False,
        "band_price_ticks": price,
        "price_ticks": price,
        "lots": lots,
        "quote_budget": None,
        "open_orders": 0,
        "market_open_orders": 0,
    }
    fields.update(kw)
    return OrderCheck(**fields)  # type: ignore[arg-type]


def test_the_band_is_inclusive_at_its_edges() -> None:
    ref = 10_000_00  # 10,000.00 in ticks of 0.01; a 10 % band: 9,000.00 .. 11,000.00
    for price, ok in ((9_000_00, True), (8_999_99, False), (11_000_00, True), (11_000_01, False)):
        found = check_order(
            _order(price), limits=DEFAULTS, switches=KillSwitches(), reference_ticks=ref
        )
        assert (found is None) == ok, price
    out = check_order(
        _order(8_999_99), limits=DEFAULTS, switches=KillSwitches(), reference_ticks=ref
    )
    assert out is not None and out.reason == "RISK_PRICE_OUT_OF_BAND"
    assert (out.metadata["min_price"], out.metadata["max_price"]) == ("9000", "11000")
    # No reference: no band.
    assert (
        check_order(_order(1), limits=DEFAULTS, switches=KillSwitches(), reference_ticks=None)
        is None
    )


def test_notional_uses_the_reference_for_market_orders() -> None:
    limits = Limits(markets=(MarketLimits("*", max_order_notional="1000"),))
    market = _order(None, lots=100_000)  # 1 BTC at the market
    assert (
        check_order(market, limits=limits, switches=KillSwitches(), reference_ticks=999_00) is None
    )
    over = check_order(market, limits=limits, switches=KillSwitches(), reference_ticks=1000_01)
    assert over is not None and over.reason == "RISK_NOTIONAL_LIMIT_EXCEEDED"
    assert check_order(market, limits=limits, switches=KillSwitches(), reference_ticks=None) is None
    budget = _order(None, lots=None, quote_budget=Decimal("1000.00000001"))
    found = check_order(budget, limits=limits, switches=KillSwitches(), reference_ticks=None)
    assert found is not None and found.reason == "RISK_NOTIONAL_LIMIT_EXCEEDED"


def test_kill_switch_precedence_and_withdrawal_blocks() -> None:
    switches = KillSwitches.of(
        [
            KillSwitch(Scope.MARKET, market="BTC-USDT", engaged=True, reason="halt"),
            KillSwitch(Scope.ACCOUNT, account_id="bad", engaged=True, block_withdrawals=True),
            KillSwitch(Scope.ACCOUNT, account_id="released", engaged=False),
        ]
    )
    assert switches.for_order("x", "ETH-USDT") is None
    assert switches.for_order("released", "ETH-USDT") is None
    found = switches.for_order("bad", "BTC-USDT")
    assert found is not None and found.scope is Scope.MARKET
    assert switches.for_withdrawal("x") is None
    w = WithdrawalCheck("bad", "BTC", Decimal(1), Decimal(0), 0)
    denied = check_withdrawal(w, limits=Limits(), switches=switches)
    assert denied is not None and denied.reason == "RISK_ACCOUNT_FROZEN"


def test_the_local_bucket_refills_at_its_rate() -> None:
    now = [0]
    buckets = LocalBuckets(clock=lambda: now[0])
    assert [buckets.take("a", 3)[0] for _ in range(4)] == [True, True, True, False]
    allowed, tokens, retry_us = buckets.take("a", 3)
    assert (allowed, tokens, retry_us) == (False, 0, 333_334)
    now[0] += 333_334_000  # ns: one token is back
    assert buckets.take("a", 3)[0] and not buckets.take("a", 3)[0]
    assert buckets.take("b", 3)[0]
    now[0] += 60 * 10**9  # a long pause fills the bucket, never beyond its size
    assert [buckets.take("a", 3)[0] for _ in range(4)] == [True, True, True, False]


def test_a_limit_amount_is_empty_or_a_positive_decimal_on_its_grid() -> None:
    from services.risk.domain import limit_amount_problem

    assert limit_amount_problem("", Decimal("0.001")) is None
    assert limit_amount_problem("1.5", Decimal("0.1")) is None
    assert limit_amount_problem("1.55", None) is None
    assert limit_amount_problem("0", None) == (
        "must be positive (empty means no limit)",
        "NOT_POSITIVE",
    )
    assert limit_amount_problem("1.55", Decimal("0.1")) == ("not a multiple of 0.1", "OFF_GRID")
    description, _ = limit_amount_problem("one", None) or ("", "")
    assert description


def test_a_user_lists_the_global_and_market_switches_and_only_their_own_account_switch() -> None:
    from services.risk.domain import KillSwitch, Scope, visible_switches

    switches = [
        KillSwitch(Scope.ACCOUNT, account_id="acc_b", engaged=True),
        KillSwitch(Scope.MARKET, market="BTC-USDT", engaged=False),
        KillSwitch(Scope.ACCOUNT, account_id="acc_a", engaged=True),
        KillSwitch(Scope.GLOBAL, engaged=True),
    ]
    mine = visible_switches(switches, account="acc_a", engaged_only=False, after=None)
    assert [s.key for s in mine] == [
        (int(Scope.GLOBAL), "", ""),
        (int(Scope.MARKET), "BTC-USDT", ""),
        (int(Scope.ACCOUNT), "", "acc_a"),
    ]
    everyone = visible_switches(switches, account=None, engaged_only=True, after=mine[0].key)
    assert [s.account_id for s in everyone] == ["acc_a", "acc_b"]
