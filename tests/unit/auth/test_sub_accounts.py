"""Sub-accounts' pure rules (ADR 0017): who may have one more, what a master's
token carries, what a master may read of its subs and what it may not do for
them, and the transfer between a master and a sub."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth import domain
from services.chassis import (
    AuthContext,
    ExchangeError,
    Unauthenticated,
    owned_account,
    owned_resource,
)
from services.chassis.tokens import b64url_decode, sign, verify
from services.ledger.domain import sub_transfer
from services.risk.domain import Limits, MarketLimits, WithdrawalLimits, within_master

NOW = datetime(2026, 12, 1, tzinfo=UTC)
MASTER = domain.Account(
    account_id="acc_m",
    display_name="firm",
    email="",
    type=2,
    state=domain.AccountState.ACTIVE,
    fee_tier="default",
    create_time=NOW,
    update_time=NOW,
)


def _reason(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ExchangeError) as refused:
        call(*args, **kwargs)  # type: ignore[operator]
    return refused.value.reason


def _ctx(
    account: str = "acc_m", *, subs: tuple[str, ...] = (), writes: bool = False
) -> AuthContext:
    scopes = frozenset({"read", "trade"} if writes else {"read"})
    return AuthContext(account, "ak_1", scopes, writes=writes, subs=frozenset(subs))


# -- who may have one more sub-account ------------------------------------------


def test_an_active_master_may_create_up_to_the_limit() -> None:
    domain.check_new_sub_account(MASTER, 0)
    domain.check_new_sub_account(MASTER, domain.MAX_SUB_ACCOUNTS - 1)
    assert (
        _reason(domain.check_new_sub_account, MASTER, domain.MAX_SUB_ACCOUNTS)
        == "AUTH_SUB_ACCOUNT_LIMIT"
    )


def test_a_sub_account_has_no_subs_and_a_frozen_master_creates_none() -> None:
    sub = replace(MASTER, account_id="acc_s", master_account_id="acc_m")
    assert _reason(domain.check_new_sub_account, sub, 0) == "AUTH_SUB_ACCOUNT_NESTED"
    frozen = replace(MASTER, state=domain.AccountState.SUSPENDED)
    assert _reason(domain.check_new_sub_account, frozen, 0) == "AUTH_ACCOUNT_NOT_ACTIVE"
    assert _reason(domain.check_new_sub_account, None, 0) == "AUTH_ACCOUNT_NOT_FOUND"


# -- the token's subs claim -------------------------------------------------------


KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}
T = 1_800_000_000


def _signed(**extra: object) -> str:
    return sign(
        KEY,
        "k1",
        subject="acc_m",
        key_id="ak_1",
        scopes=["read"],
        issued_at=T,
        ttl_s=300,
        token_id="t1",
        **extra,  # type: ignore[arg-type]
    )


def test_a_masters_token_lists_its_subs_and_others_carry_none() -> None:
    claims = verify(_signed(subs=["acc_b", "acc_a"]), KEYS, now=T + 1)
    assert claims.subs == frozenset({"acc_a", "acc_b"})
    plain = _signed()
    assert "subs" not in json.loads(b64url_decode(plain.split(".")[1]))
    assert verify(plain, KEYS, now=T + 1).subs == frozenset()


def test_a_malformed_subs_claim_is_refused() -> None:
    body = json.loads(b64url_decode(_signed().split(".")[1]))
    body["subs"] = "acc_a"  # a string, not a list
    token = jwt.encode(body, KEY, algorithm="EdDSA", headers={"kid": "k1", "typ": "JWT"})
    with pytest.raises(Unauthenticated) as refused:
        verify(token, KEYS, now=T + 1)
    assert refused.value.reason == "AUTH_TOKEN_MALFORMED"


# -- what a master may read of its subs -----------------------------------------


def test_a_master_reads_its_subs_and_nothing_else() -> None:
    master = _ctx(subs=("acc_a", "acc_b"))
    assert owned_account(master, "acc_a", component="LEDGER") == "acc_a"
    assert owned_account(master, "", component="LEDGER") == "acc_m"
    # Another account answers as a made-up id does.
    assert _reason(owned_account, master, "acc_x", component="LEDGER") == "LEDGER_ACCOUNT_NOT_FOUND"
    order = SimpleNamespace(account_id="acc_b")
    assert owned_resource(master, order, component="ORDER", resource="order") is order
    stranger = SimpleNamespace(account_id="acc_x")
    assert (
        _reason(owned_resource, master, stranger, component="ORDER", resource="order")
        == "ORDER_ORDER_NOT_FOUND"
    )


def test_a_master_does_not_trade_or_withdraw_for_a_sub() -> None:
    """Rules that need more than read confine the master to its own account: a
    sub trades and withdraws with its own keys."""
    master = _ctx(subs=("acc_a",), writes=True)
    assert (
        _reason(owned_account, master, "acc_a", component="FUNDING") == "FUNDING_ACCOUNT_NOT_FOUND"
    )
    order = SimpleNamespace(account_id="acc_a")
    assert (
        _reason(owned_resource, master, order, component="ORDER", resource="order")
        == "ORDER_ORDER_NOT_FOUND"
    )


def test_a_sub_sees_neither_its_master_nor_its_siblings() -> None:
    sub = _ctx("acc_a")
    for other in ("acc_m", "acc_b"):
        assert _reason(owned_account, sub, other, component="LEDGER") == "LEDGER_ACCOUNT_NOT_FOUND"
        found = SimpleNamespace(account_id=other)
        assert (
            _reason(owned_resource, sub, found, component="ORDER", resource="order")
            == "ORDER_ORDER_NOT_FOUND"
        )


# -- a transfer between a master and a sub ---------------------------------------


def test_a_transfer_goes_either_way_between_a_master_and_its_sub() -> None:
    down = sub_transfer("acc_m", {"acc_a"}, "acc_m", "acc_a", "r1")
    up = sub_transfer("acc_m", {"acc_a"}, "acc_a", "acc_m", "r1")
    # The id is the request's: the same request id is the same transfer (the
    # ledger returns the first for the same body, ALREADY_EXISTS for another).
    assert down == up == sub_transfer("acc_m", {"acc_a"}, "acc_m", "acc_a", "r1")
    assert down.startswith("sub:acc_m:")
    assert sub_transfer("acc_m", {"acc_a"}, "acc_m", "acc_a", "r2") != down
    assert sub_transfer("acc_n", {"acc_a"}, "acc_n", "acc_a", "r1") != down
    # Any request id makes a valid transfer id (printable, at most 128).
    odd = sub_transfer("acc_m", {"acc_a"}, "acc_m", "acc_a", "ré quest " * 14)
    assert len(odd) <= 128 and " " not in odd


@pytest.mark.parametrize(
    ("caller", "subs", "source", "target", "reason"),
    [
        ("acc_m", {"acc_a"}, "acc_m", "acc_x", "LEDGER_ACCOUNT_NOT_FOUND"),  # not its sub
        ("acc_m", {"acc_a", "acc_b"}, "acc_a", "acc_b", "LEDGER_ACCOUNT_NOT_FOUND"),  # sub to sub
        ("acc_a", set(), "acc_a", "acc_m", "LEDGER_ACCOUNT_NOT_FOUND"),  # a sub to its master
        ("acc_a", set(), "acc_a", "acc_b", "LEDGER_ACCOUNT_NOT_FOUND"),  # a sub to a sibling
        ("acc_m", {"acc_a"}, "acc_m", "acc_m", "LEDGER_SAME_ACCOUNT"),
        ("acc_m", {"acc_a"}, "", "acc_a", "LEDGER_ACCOUNT_REQUIRED"),
    ],
)
def test_a_transfer_names_the_master_and_one_of_its_subs(
    caller: str, subs: set[str], source: str, target: str, reason: str
) -> None:
    assert _reason(sub_transfer, caller, subs, source, target, "r1") == reason


# -- a sub's limits, within its master's --------------------------------------


def test_a_subs_limits_stay_within_its_masters() -> None:
    ceiling = Limits(
        account_id="acc_m",
        max_orders_per_second=100,
        max_open_orders=0,  # no limit
        markets=(MarketLimits("*", max_order_notional="10000", price_band="0.1"),),
        withdrawals=(WithdrawalLimits("BTC", max_amount="2"),),
    )
    asked = Limits(
        account_id="acc_a",
        max_orders_per_second=0,  # unset: the master's
        max_open_orders=5000,  # the master has no limit: any
        markets=(MarketLimits("BTC-USDT", max_order_notional="500"),),
    )
    limits, over = within_master(asked, ceiling)
    assert over == []
    assert limits.max_orders_per_second == 100 and limits.max_open_orders == 5000
    by_market = {m.market: m for m in limits.markets}
    # A market it names: its own limit, the master's where it sets none.
    assert by_market["BTC-USDT"] == MarketLimits("BTC-USDT", "", "500", "0.1", 0)
    # What the master is limited in and the request does not name: the master's.
    assert by_market["*"] == ceiling.markets[0]
    assert limits.withdrawals == ceiling.withdrawals


def test_a_limit_above_the_masters_is_named() -> None:
    ceiling = Limits(
        account_id="acc_m",
        max_orders_per_second=100,
        markets=(MarketLimits("BTC-USDT", max_order_quantity="5"),),
        withdrawals=(WithdrawalLimits("BTC", max_count_per_day=3),),
    )
    asked = Limits(
        account_id="acc_a",
        max_orders_per_second=101,
        markets=(MarketLimits("BTC-USDT", max_order_quantity="5.1"),),
        withdrawals=(WithdrawalLimits("BTC", max_count_per_day=4),),
    )
    _, over = within_master(asked, ceiling)
    assert [f for f, _ in over] == [
        "limits.markets[0].max_order_quantity",
        "limits.withdrawals[0].max_count_per_day",
        "limits.max_orders_per_second",
    ]
