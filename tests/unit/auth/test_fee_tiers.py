"""The pure rules of fee tiers (ADR 0016): a schedule's checks, the tier a volume
earns, which accounts a measurement moves; and the gateways' copy applying
changes only in sequence."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cex.auth.v1 import auth_pb2
from services.auth.domain import FeeTier, parse_schedule, tier_for_volume, volume_tiers
from services.chassis import InvalidArgument
from services.chassis.fee_tiers import FeeTiers, bps_rate

SCHEDULE = parse_schedule(
    [
        ("vip1", "5", "15", "100000"),
        ("default", "10", "20", "0"),
        ("mm", "-1.5", "10", "5000000"),
    ]
)


def _violations(rows: list[tuple[str, str, str, str]]) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as failure:
        parse_schedule(rows)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.reason == "AUTH_INVALID_FEE_SCHEDULE"
    return {v.field: v.reason for v in failure.value.violations}


def test_a_schedule_is_sorted_by_threshold_and_allows_a_rebate() -> None:
    assert [t.name for t in SCHEDULE] == ["default", "vip1", "mm"]
    mm = SCHEDULE[2]
    assert (mm.maker_bps, mm.maker_rate, mm.taker_rate) == (
        Decimal("-1.5"),
        Decimal("-0.00015"),
        Decimal("0.001"),
    )


def test_a_bad_schedule_names_every_bad_field() -> None:
    assert _violations([]) == {"tiers": "AUTH_FIELD_REQUIRED"}
    assert _violations([("vip", "1", "2", "10")]) == {"tiers": "AUTH_BASE_TIER_REQUIRED"}
    assert _violations(
        [
            ("default", "1", "2", "5"),
            ("a", "1", "2", "6"),
            ("a", "1", "2", "7"),
            ("b", "1", "2", "6"),
            ("c", "1001", "-1", "0"),
            ("D", "1e3", "2.001", "x"),
        ]
    ) == {
        "tiers[0].min_volume": "AUTH_INVALID_MIN_VOLUME",  # the base tier starts at 0
        "tiers[2].name": "AUTH_DUPLICATE_TIER",
        "tiers[3].min_volume": "AUTH_INVALID_MIN_VOLUME",  # a threshold twice
        "tiers[4].maker_fee_bps": "AUTH_FEE_BPS_OUT_OF_RANGE",
        "tiers[4].taker_fee_bps": "AUTH_FEE_BPS_OUT_OF_RANGE",
        "tiers[4].min_volume": "AUTH_INVALID_MIN_VOLUME",  # only the base tier starts at 0
        "tiers[5].name": "AUTH_INVALID_TIER_NAME",
        "tiers[5].maker_fee_bps": "AUTH_INVALID_DECIMAL",
        "tiers[5].taker_fee_bps": "AUTH_FEE_BPS_TOO_PRECISE",
        "tiers[5].min_volume": "AUTH_INVALID_DECIMAL",
    }
    # The rebate floor is match's (-100 bps = -1 %), and no taker pays less than
    # the largest rebate, so a trade's fees always cover its rebate.
    assert _violations([("default", "-100.01", "200", "0")]) == {
        "tiers[0].maker_fee_bps": "AUTH_FEE_BPS_OUT_OF_RANGE"
    }
    assert _violations([("default", "10", "20", "0"), ("mm", "-25", "30", "9")]) == {
        "tiers[0].taker_fee_bps": "AUTH_TAKER_FEE_BELOW_REBATE"
    }
    assert _violations([("default", "0", "0", "0")] * 33)["tiers"] == "AUTH_TOO_MANY_TIERS"


def test_a_volume_earns_the_highest_tier_it_reaches() -> None:
    assert tier_for_volume(SCHEDULE, Decimal(0)) == "default"
    assert tier_for_volume(SCHEDULE, Decimal("99999.99")) == "default"
    assert tier_for_volume(SCHEDULE, Decimal(100000)) == "vip1"
    assert tier_for_volume(SCHEDULE, Decimal(10**9)) == "mm"


@given(st.decimals(min_value=0, max_value=10**10, allow_nan=False, places=2))
def test_more_volume_never_means_a_lower_tier(volume: Decimal) -> None:
    order = [t.name for t in SCHEDULE]
    here = order.index(tier_for_volume(SCHEDULE, volume))
    assert order.index(tier_for_volume(SCHEDULE, volume + 1)) >= here


def test_a_measurement_moves_only_accounts_on_volume_tiers() -> None:
    accounts = [
        ("a", "default", False, None),  # crosses vip1
        ("b", "vip1", False, Decimal(200000)),  # quiet: back to default
        ("c", "mm", True, None),  # assigned: stays, whatever its volume
        ("d", "vip1", False, None),  # stays
    ]
    measured = {"a": Decimal(100000), "c": Decimal(0), "d": Decimal(100001)}
    changes = volume_tiers(SCHEDULE, accounts, measured)
    assert [(c.account_id, c.fee_tier) for c in changes] == [("a", "vip1"), ("b", "default")]
    # Without a measurement, the last volumes decide (a schedule change).
    assert [(c.account_id, c.fee_tier) for c in volume_tiers(SCHEDULE, accounts)] == [
        ("d", "default")
    ]


def test_basis_points_are_the_rates_match_takes() -> None:
    assert [bps_rate(b) for b in ("10", "-0.5", "0", "1000", "-100")] == [
        "0.001",
        "-0.00005",
        "0",
        "0.1",
        "-0.01",
    ]
    assert FeeTier("x", Decimal("-0.5"), Decimal(1), Decimal(0)).maker_rate == Decimal("-0.00005")


def _change(seq: int, account: str = "", tier: str = "") -> auth_pb2.FeeTierChange:
    change = auth_pb2.FeeTierChange(change_seq=seq)
    if account:
        change.account.CopyFrom(auth_pb2.AccountFeeTier(account_id=account, fee_tier=tier))
    else:
        change.schedule.CopyFrom(
            auth_pb2.FeeSchedule(
                tiers=[
                    auth_pb2.FeeTier(name="default", maker_fee_bps="8", taker_fee_bps="16"),
                    auth_pb2.FeeTier(name="mm", maker_fee_bps="-1", taker_fee_bps="5"),
                ]
            )
        )
    return change


async def test_the_copy_applies_changes_in_sequence_and_reloads_on_a_gap() -> None:
    answers: list[auth_pb2.GetFeeTiersResponse] = []

    async def load() -> auth_pb2.GetFeeTiersResponse:
        return answers[-1]

    copy = FeeTiers(load, default=(Decimal("0.001"), Decimal("0.002")))
    assert copy.rates("a") == ("0.001", "0.002")  # before any load: the catalog's
    copy.apply(_change(1))
    copy.apply(_change(2, "a", "mm"))
    assert (copy.rates("a"), copy.rates("b"), copy.change_seq) == (
        ("-0.0001", "0.0005"),
        ("0.0008", "0.0016"),
        2,
    )
    copy.apply(_change(2, "a", "default"))  # a repeat: ignored
    assert copy.tier("a") == "mm"
    copy.apply(_change(4, "b", "mm"))  # 3 was lost: not applied, a reload asked
    assert copy.tier("b") == "default" and copy._wake.is_set()
    answers.append(
        auth_pb2.GetFeeTiersResponse(
            change_seq=4,
            schedule=_change(1).schedule,
            accounts=[auth_pb2.AccountFeeTier(account_id="b", fee_tier="mm")],
        )
    )
    await copy.reload()
    assert (copy.tier("a"), copy.tier("b"), copy.change_seq) == ("default", "mm", 4)
    copy.apply(_change(5, "c", "gone"))  # a tier the copy does not know: the base's rates
    assert copy.rates("c") == ("0.0008", "0.0016")
    answers.append(auth_pb2.GetFeeTiersResponse(change_seq=3))  # older than the copy
    await copy.reload()
    assert copy.change_seq == 5 and copy.synced_at is not None
    await asyncio.sleep(0)
