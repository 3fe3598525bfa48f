from decimal import Decimal

import pytest

from services.chassis.markets import DEFAULT_CATALOG, Asset, Market, load_catalog
from services.chassis.money import MoneyError, from_units, to_units


@pytest.mark.parametrize(
    ("text", "unit", "units"),
    [
        ("1", "0.01", 100),
        ("0.05", "0.01", 5),
        ("-2.5", "0.5", -5),
        ("0", "1", 0),
        ("123.45000", "0.01", 12345),
    ],
)
def test_to_units_exact(text: str, unit: str, units: int) -> None:
    assert to_units(text, Decimal(unit)) == units


@pytest.mark.parametrize(
    "text", ["", " 1", "1e3", "NaN", "inf", "+1", "01", "1.", ".5", "1,5", "0x10", "1" * 60]
)
def test_malformed_is_refused(text: str) -> None:
    with pytest.raises(MoneyError) as err:
        to_units(text, Decimal("0.01"))
    assert err.value.reason == "MALFORMED"


def test_over_precise_is_refused_not_rounded() -> None:
    with pytest.raises(MoneyError) as err:
        to_units("1.005", Decimal("0.01"))
    assert err.value.reason == "OFF_GRID"


@pytest.mark.parametrize(
    ("units", "unit", "text"),
    [
        (100, "0.01", "1"),
        (5, "0.01", "0.05"),
        (0, "0.01", "0"),
        (-150, "0.01", "-1.5"),
        (12, "10", "120"),
    ],
)
def test_from_units_is_canonical_and_round_trips(units: int, unit: str, text: str) -> None:
    assert from_units(units, Decimal(unit)) == text
    assert to_units(text, Decimal(unit)) == units


def test_default_markets_are_on_exact_grids() -> None:
    btc = DEFAULT_CATALOG.market("BTC-USDT")
    assert btc is not None
    assert btc.ticks("65000.01") == 6_500_001
    assert btc.lots("0.5") == 50_000
    # 65000.01 x 0.5 = 32500.005 USDT, exactly representable in tick-lots and minor units
    tick_lots = btc.ticks("65000.01") * btc.lots("0.5")
    assert btc.quote_amount(tick_lots) == "32500.005"
    assert btc.quote_minor(tick_lots) == 3_250_000_500_000
    assert btc.base_minor(btc.lots("0.5")) == 50_000_000


def test_a_market_whose_notional_is_finer_than_its_quote_is_refused() -> None:
    usd2 = Asset("USD", 2)
    with pytest.raises(ValueError, match="minor units"):
        Market(
            "X-USD",
            Asset("X", 8),
            usd2,
            Decimal("0.01"),
            Decimal("0.001"),
            Decimal("0.001"),
            Decimal("10"),
            Decimal("1"),
        )


def test_catalog_from_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "markets.yaml"
    path.write_text(
        "assets: {SOL: {scale: 9}, USDC: {scale: 6}}\n"
        "markets:\n  SOL-USDC: {base: SOL, quote: USDC, tick_size: '0.001', lot_size: '0.01',"
        " min_quantity: '0.01', max_quantity: '1000000', min_notional: '1'}\n"
    )
    catalog = load_catalog({"CEX_MARKETS": str(path)})
    assert list(catalog.markets) == ["SOL-USDC"]
    assert catalog.assets["SOL"].to_minor("1.5") == 1_500_000_000
