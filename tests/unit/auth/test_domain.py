"""auth's rules without I/O: secrets, ownership, issuing and key rotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.auth import domain
from services.auth.domain import Account, ApiKey, KeyState, SigningKey
from services.chassis import AuthContext, ExchangeError

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ACCOUNT = Account("acc_1", "A", "", 1, domain.AccountState.ACTIVE, "default", NOW, NOW)


def _key(**changes: object) -> ApiKey:
    fields: dict[str, object] = {
        "api_key_id": "ak_1",
        "account_id": "acc_1",
        "label": "",
        "scopes": ("read", "trade"),
        "allowed_cidrs": (),
        "state": KeyState.ACTIVE,
        "secret_prefix": "sk_abcd",
        "secret_hash": "",
        "create_time": NOW,
    }
    fields.update(changes)
    return ApiKey(**fields)  # type: ignore[arg-type]


def _ctx(
    account: str = "acc_1", scopes: tuple[str, ...] = ("read",), service: str = ""
) -> AuthContext:
    return AuthContext(account, "ak_1", frozenset(scopes), service=service)


def _reason(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ExchangeError) as refused:
        fn(*args, **kwargs)  # type: ignore[operator]
    return refused.value.reason


def test_secrets_are_stored_as_salted_scrypt_hashes() -> None:
    stored = domain.hash_secret("sk_secret", b"s" * 16, n=2**4)
    assert stored.startswith("scrypt$16$8$1$") and "sk_secret" not in stored
    assert domain.secret_matches("sk_secret", stored)
    assert not domain.secret_matches("sk_secreT", stored)
    assert domain.hash_secret("sk_secret", b"t" * 16, n=2**4) != stored
    assert not domain.secret_matches("x", "md5$whatever")


def test_issue_checks_state_account_allow_list_and_scopes() -> None:
    issue = domain.check_issue
    ok = {"secret_ok": True, "client_ip": "10.0.0.1", "requested": (), "now": NOW}
    assert issue(_key(), ACCOUNT, **ok) == ("read", "trade")  # type: ignore[arg-type]
    assert issue(_key(), ACCOUNT, **{**ok, "requested": ("read",)}) == ("read",)  # type: ignore[arg-type]
    assert _reason(issue, None, None, **ok) == "AUTH_INVALID_CREDENTIALS"
    assert (
        _reason(issue, _key(), ACCOUNT, **{**ok, "secret_ok": False}) == "AUTH_INVALID_CREDENTIALS"
    )
    assert _reason(issue, _key(state=KeyState.REVOKED), ACCOUNT, **ok) == "AUTH_KEY_REVOKED"
    expired = _key(expire_time=NOW - timedelta(seconds=1))
    assert _reason(issue, expired, ACCOUNT, **ok) == "AUTH_KEY_EXPIRED"
    frozen = Account("acc_1", "A", "", 1, domain.AccountState.SUSPENDED, "d", NOW, NOW)
    assert issue(_key(), frozen, **ok) == ("read",)  # type: ignore[arg-type]
    trade_only = _key(scopes=("trade",))
    assert _reason(issue, trade_only, frozen, **ok) == "AUTH_ACCOUNT_SUSPENDED"
    closed = Account("acc_1", "A", "", 1, domain.AccountState.CLOSED, "d", NOW, NOW)
    assert _reason(issue, _key(), closed, **ok) == "AUTH_ACCOUNT_NOT_ACTIVE"
    fenced = _key(allowed_cidrs=("192.0.2.0/24",))
    assert _reason(issue, fenced, ACCOUNT, **ok) == "AUTH_ADDRESS_NOT_ALLOWED"
    with pytest.raises(ExchangeError) as refused:
        issue(fenced, ACCOUNT, **ok)  # type: ignore[arg-type]
    assert refused.value.metadata == {"client_address": "10.0.0.1"}  # the address seen
    assert "10.0.0.1" in refused.value.message
    assert issue(fenced, ACCOUNT, **{**ok, "client_ip": "192.0.2.7"})  # type: ignore[arg-type]
    assert _reason(issue, _key(), ACCOUNT, **{**ok, "requested": ("withdraw",)}) == (
        "AUTH_SCOPE_MISSING"
    )


def test_callers_act_on_their_own_account_unless_admin_or_service() -> None:
    assert domain.owned_account(_ctx(), "") == "acc_1"
    assert domain.owned_account(_ctx(), "acc_1") == "acc_1"
    assert _reason(domain.owned_account, _ctx(), "acc_2") == "AUTH_ACCOUNT_NOT_FOUND"
    assert domain.owned_account(_ctx(scopes=("admin",)), "acc_2") == "acc_2"
    assert domain.owned_account(_ctx("", ("internal",), "cli"), "acc_2") == "acc_2"
    assert _reason(domain.owned_account, _ctx("", ("internal",), "cli"), "") == (
        "AUTH_ACCOUNT_REQUIRED"
    )


def test_a_new_key_grants_no_more_than_its_creator_holds() -> None:
    check = domain.validate_new_key
    check(_ctx(scopes=("read", "trade")), ("trade",), (), None, NOW)
    assert _reason(check, _ctx(), ("trade",), (), None, NOW) == "AUTH_SCOPE_MISSING"
    check(_ctx(scopes=("admin",)), ("trade",), (), None, NOW)
    assert _reason(check, _ctx(), (), (), None, NOW) == "AUTH_SCOPE_REQUIRED"
    admin = _ctx(scopes=("admin",))
    assert _reason(check, admin, ("withdraw",), (), None, NOW) == "AUTH_ALLOW_LIST_REQUIRED"
    assert _reason(check, admin, ("read",), (), NOW, NOW) == "AUTH_INVALID_EXPIRE_TIME"
    assert domain.validate_cidrs([" 10.0.0.1", "192.0.2.0/24"]) == ("10.0.0.1/32", "192.0.2.0/24")
    assert _reason(domain.validate_cidrs, ["nope"]) == "AUTH_INVALID_CIDR"


def test_token_lifetimes_are_capped() -> None:
    assert domain.token_ttl(0, default_s=300, max_s=900) == 300
    assert domain.token_ttl(60, default_s=300, max_s=900) == 60
    assert domain.token_ttl(86400, default_s=300, max_s=900) == 900
    assert _reason(domain.token_ttl, -1, default_s=300, max_s=900) == "AUTH_INVALID_TTL"


def test_rotation_prepublishes_the_next_key_and_keeps_the_old_one_until_its_tokens_expire() -> None:
    week = timedelta(days=7)
    old = SigningKey("k1", b"", NOW - week, NOW - week, None)
    assert domain.rotation_due([], NOW, rotate_after=week)
    assert domain.rotation_due([old], NOW, rotate_after=week)
    assert not domain.rotation_due([old], NOW - timedelta(seconds=1), rotate_after=week)
    # What the store does on rotation: next key active in 10 min, old retired 16 min after that.
    retired = SigningKey("k1", b"", old.create_time, old.activate_time, NOW + timedelta(minutes=26))
    new = SigningKey("k2", b"", NOW, NOW + timedelta(minutes=10), None)
    keys = [retired, new]
    assert domain.signing_key(keys, NOW) == retired  # still signs: k2 is not in every cache yet
    assert {k.kid for k in domain.published(keys, NOW)} == {"k1", "k2"}  # both valid
    later = NOW + timedelta(minutes=11)
    assert domain.signing_key(keys, later) == new
    assert {k.kid for k in domain.published(keys, NOW + timedelta(minutes=27))} == {"k2"}
