"""Fees have one source, the market catalog: order's rates, funding's withdrawal terms
and what auth's GetFees shows all read it, so changing it changes all three at once."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from services.auth.server import _fees
from services.chassis.markets import DEFAULT_CATALOG, load_catalog
from services.funding.config import DEFAULT_ASSETS, FundingConfig
from services.order.config import OrderConfig


def test_the_defaults_are_what_every_service_applies_and_shows() -> None:
    shown = _fees(DEFAULT_CATALOG)
    order = OrderConfig.from_env({})
    assert (shown.maker_fee_rate, shown.taker_fee_rate) == ("0.001", "0.002")
    assert (order.maker_fee_rate, order.taker_fee_rate) == ("0.001", "0.002")
    assert (OrderConfig().maker_fee_rate, OrderConfig().taker_fee_rate) == ("0.001", "0.002")
    by_asset = {a.asset: a for a in shown.assets}
    assert set(by_asset) == set(DEFAULT_CATALOG.assets)
    for symbol, rule in DEFAULT_ASSETS.items():
        assert (by_asset[symbol].withdrawal_fee, by_asset[symbol].min_withdrawal) == (
            rule.withdrawal_fee,
            rule.min_withdrawal,
        )
        assert by_asset[symbol].network == rule.network
    assert (by_asset["USDT"].withdrawal_fee, by_asset["BTC"].withdrawal_fee) == ("1", "0.00002")
    btc = next(m for m in shown.markets if m.market == "BTC-USDT")
    assert (btc.buy_fee_asset, btc.sell_fee_asset) == ("BTC", "USDT")


def test_one_catalog_file_changes_every_service(tmp_path: Path) -> None:
    path = tmp_path / "markets.yaml"
    path.write_text(
        """
assets:
  BTC: {scale: 8}
  USDT: {scale: 8, withdrawal_fee: "2.5", min_withdrawal: "10"}
markets:
  BTC-USDT: {base: BTC, quote: USDT, tick_size: "0.01", lot_size: "0.00001",
             min_quantity: "0.00001", max_quantity: "9000", min_notional: "5"}
fees: {tier: default, maker_rate: "0.0005", taker_rate: "0.0015"}
"""
    )
    env = {"CEX_MARKETS": str(path)}
    catalog = load_catalog(env)
    assert catalog.fees.maker_rate == Decimal("0.0005")
    order = OrderConfig.from_env(env)
    assert (order.maker_fee_rate, order.taker_fee_rate) == ("0.0005", "0.0015")
    rules = FundingConfig.from_env(env).assets
    assert (rules["USDT"].withdrawal_fee, rules["USDT"].min_withdrawal) == ("2.5", "10")
    assert rules["BTC"].withdrawal_fee == "0.00002"  # left out: the built-in value
    assert set(rules) == {"BTC", "USDT"}
    shown = _fees(catalog)
    assert (shown.maker_fee_rate, shown.taker_fee_rate) == ("0.0005", "0.0015")
    assert {a.asset: a.withdrawal_fee for a in shown.assets} == {"BTC": "0.00002", "USDT": "2.5"}
