"""Withdrawal request validation (pure): assets, networks, amounts, addresses, fees."""

from __future__ import annotations

import pytest

from services.chassis import ExchangeError
from services.chassis.markets import DEFAULT_CATALOG
from services.funding.config import DEFAULT_ASSETS
from services.funding.domain import parse_withdrawal

ETH = "0x" + "ab" * 20
BTC = "bcrt1q" + "0" * 38


def parse(**overrides: str):  # type: ignore[no-untyped-def]
    fields = {
        "request_id": "r1", "asset_code": "USDT", "network": "", "amount": "10",
        "address": ETH, "memo": "", "max_fee": "",
    }  # fmt: skip
    fields.update(overrides)
    return parse_withdrawal(**fields, assets=DEFAULT_CATALOG.assets, rules=DEFAULT_ASSETS)


def test_a_good_request_is_in_minor_units_with_the_asset_fee() -> None:
    spec = parse()
    assert (spec.asset, spec.network, spec.amount, spec.fee) == (
        "USDT",
        "ethereum",
        10 * 10**8,
        1 * 10**8,
    )
    assert spec.required_confirmations == 3
    btc = parse(asset_code="BTC", amount="0.0001", address=BTC)
    assert (btc.amount, btc.fee, btc.network) == (10_000, 2_000, "bitcoin")


def test_the_fingerprint_follows_the_body() -> None:
    assert parse().fingerprint == parse(request_id="other").fingerprint
    assert parse().fingerprint != parse(amount="10.5").fingerprint
    assert parse().fingerprint != parse(address="0x" + "cd" * 20).fingerprint


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"asset_code": "DOGE"}, "FUNDING_ASSET_UNSUPPORTED"),
        ({"network": "bitcoin"}, "FUNDING_NETWORK_UNSUPPORTED"),
        ({"amount": "0.99999999"}, "FUNDING_AMOUNT_BELOW_MINIMUM"),
        ({"amount": "0"}, "FUNDING_AMOUNT_INVALID"),
        ({"amount": "10.000000001"}, "FUNDING_AMOUNT_INVALID"),
        ({"amount": " 10"}, "FUNDING_AMOUNT_INVALID"),
        ({"amount": "NaN"}, "FUNDING_AMOUNT_INVALID"),
        ({"address": BTC}, "FUNDING_ADDRESS_INVALID"),
        ({"address": ETH + "0"}, "FUNDING_ADDRESS_INVALID"),
        ({"asset_code": "BTC", "address": ETH}, "FUNDING_ADDRESS_INVALID"),
        ({"memo": "x"}, "FUNDING_MEMO_NOT_SUPPORTED"),
        ({"request_id": ""}, "FUNDING_REQUEST_ID_INVALID"),
        ({"request_id": "x" * 129}, "FUNDING_REQUEST_ID_INVALID"),
        ({"max_fee": "0.5"}, "FUNDING_FEE_TOO_HIGH"),
        ({"max_fee": "abc"}, "FUNDING_MAX_FEE_INVALID"),
    ],
)
def test_bad_requests_name_their_reason(overrides: dict[str, str], reason: str) -> None:
    with pytest.raises(ExchangeError) as refused:
        parse(**overrides)
    assert refused.value.reason == reason
    if reason != "FUNDING_FEE_TOO_HIGH":
        assert refused.value.violations
