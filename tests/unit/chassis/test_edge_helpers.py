"""The edge helpers every service shares (issue 19): page tokens, field
violations, timestamps and resource ownership, each in one place in chassis."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from cex.auth.v1 import auth_pb2
from services.chassis import (
    AuthContext,
    ExchangeError,
    FieldViolation,
    NotFound,
    Violations,
    batch_size,
    from_timestamp,
    invalid_field,
    optional_time,
    owned_resource,
    page_size,
    page_token,
    parse_page_token,
    read_page_token,
    timestamp,
    timestamp_ns,
)
from services.chassis.where import Where

REASON = "TEST_INVALID_PAGE_TOKEN"


@given(kind=st.text(min_size=1), parts=st.lists(st.text(), max_size=4))
def test_a_page_token_gives_back_what_it_was_made_of(kind: str, parts: list[str]) -> None:
    token = page_token(kind, *parts)
    assert read_page_token(token, kind, parts=len(parts), reason=REASON) == tuple(parts)


def test_no_token_is_the_first_page() -> None:
    assert read_page_token("", "trades", parts=1, reason=REASON) is None


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",  # not base64
        base64.urlsafe_b64encode(b"nope").decode(),  # not JSON
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),  # not a list
        page_token("candles", "1"),  # another query's token
        page_token("trades", "1", "2"),  # the wrong number of parts
        base64.urlsafe_b64encode(b'["trades", 1]').decode(),  # not strings
    ],
)
def test_a_token_not_of_this_query_is_a_field_violation(token: str) -> None:
    with pytest.raises(ExchangeError) as raised:
        read_page_token(token, "trades", parts=1, reason=REASON)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason == REASON
    assert [v.field for v in raised.value.violations] == ["page_token"]


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert page_size(0, default=50, maximum=500, reason="TEST_BAD_SIZE") == 50
    assert page_size(7, default=50, maximum=500, reason="TEST_BAD_SIZE") == 7
    assert page_size(9999, default=50, maximum=500, reason="TEST_BAD_SIZE") == 500
    with pytest.raises(ExchangeError) as raised:
        page_size(-1, default=50, maximum=500, reason="TEST_BAD_SIZE")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in raised.value.violations] == ["page_size"]


def test_a_token_gives_back_its_parsed_position() -> None:
    assert parse_page_token("", "transfers", int, parts=1, reason=REASON) is None
    token = page_token("transfers", str(12345))
    assert parse_page_token(token, "transfers", int, parts=1, reason=REASON) == 12345
    moment = datetime(2026, 12, 7, tzinfo=UTC)
    fill = page_token("fills", moment.isoformat(), "7", "o1")

    def position(t: str, s: str, i: str) -> tuple[datetime, int, str]:
        return datetime.fromisoformat(t), int(s), i

    assert parse_page_token(fill, "fills", position, parts=3, reason=REASON) == (moment, 7, "o1")
    for bad in (
        page_token("transfers", "x1"),
        page_token("transfers", ""),
        page_token("fills", "1"),
    ):
        with pytest.raises(ExchangeError) as raised:
            parse_page_token(bad, "transfers", int, parts=1, reason=REASON)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.reason == REASON
        assert [v.field for v in raised.value.violations] == ["page_token"]


@pytest.mark.parametrize(
    ("count", "minimum", "ok"),
    [(0, 1, False), (1, 1, True), (20, 1, True), (21, 1, False), (0, 0, True), (21, 0, False)],
)
def test_a_batch_holds_minimum_to_maximum_items(count: int, minimum: int, ok: bool) -> None:
    if ok:
        assert (
            batch_size(count, minimum=minimum, maximum=20, field="requests", reason="TEST_BATCH")
            == count
        )
        return
    with pytest.raises(ExchangeError) as raised:
        batch_size(count, minimum=minimum, maximum=20, field="requests", reason="TEST_BATCH")
    error = raised.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TEST_BATCH")
    assert [v.field for v in error.violations] == ["requests"]
    assert "20" in error.violations[0].description and f"got {count}" in error.message


def test_violations_collect_every_problem_under_a_prefix() -> None:
    v = Violations("requests[2].")
    assert not v
    v.raise_if_any("TEST_INVALID")  # nothing collected: nothing raised
    v.add("price", "must be positive", "TEST_PRICE")
    v.add("quantity", "required")
    with pytest.raises(ExchangeError) as raised:
        v.raise_if_any("TEST_INVALID")
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "TEST_INVALID"
    assert error.violations == (
        FieldViolation("requests[2].price", "must be positive", "TEST_PRICE"),
        FieldViolation("requests[2].quantity", "required"),
    )
    assert error.message == "requests[2].price: must be positive; requests[2].quantity: required"


def test_one_bad_field() -> None:
    error = invalid_field("TEST_INVALID", "market", "not a market", "TEST_UNKNOWN_MARKET")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == (FieldViolation("market", "not a market", "TEST_UNKNOWN_MARKET"),)


@given(st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(UTC)))
def test_timestamps_round_trip(when: datetime) -> None:
    assert from_timestamp(timestamp(when)) == when
    ns = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    assert timestamp_ns(ns) == timestamp(when)


def test_an_unset_time_is_none_not_the_epoch() -> None:
    request = auth_pb2.CreateApiKeyRequest()
    assert optional_time(request, "expire_time") is None
    request.expire_time.CopyFrom(Timestamp(seconds=0))
    assert optional_time(request, "expire_time") == datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Thing:
    account_id: str


ALICE = AuthContext("acc_a", "ak_a", frozenset({"read"}))
ADMIN = AuthContext("acc_x", "ak_x", frozenset({"admin"}))
SERVICE = AuthContext("", "", frozenset({"internal"}), service="order")


def test_a_resource_of_another_account_is_not_found_like_a_made_up_id() -> None:
    mine = _Thing("acc_a")
    assert owned_resource(ALICE, mine, component="TEST", resource="API key") is mine
    answers = []
    for found in (_Thing("acc_b"), None):
        with pytest.raises(NotFound) as raised:
            owned_resource(ALICE, found, component="TEST", resource="API key")
        answers.append((raised.value.code, raised.value.reason, raised.value.message))
    assert (
        answers[0]
        == answers[1]
        == (
            grpc.StatusCode.NOT_FOUND,
            "TEST_API_KEY_NOT_FOUND",
            "no such API key",
        )
    )


def test_admins_and_services_see_every_account() -> None:
    theirs = _Thing("acc_b")
    assert owned_resource(ADMIN, theirs, component="TEST", resource="order") is theirs
    assert owned_resource(SERVICE, theirs, component="TEST", resource="order") is theirs
    with pytest.raises(NotFound):
        owned_resource(ADMIN, None, component="TEST", resource="order")


def test_a_where_clause_numbers_only_the_filters_that_are_set() -> None:
    where = Where("account_id = $1", "acc_a")
    where.compare("market", "=", "BTC-USDT")
    where.compare("side", "=", None)  # unset: no condition
    where.after("create_time, order_id", ("2026-12-07", "o9"))
    assert where.sql == (
        " WHERE account_id = $1 AND market = $2 AND (create_time, order_id) < ($3, $4)"
    )
    assert f"LIMIT {where.arg(100)}" == "LIMIT $5"
    assert where.args == ["acc_a", "BTC-USDT", "2026-12-07", "o9", 100]
    assert Where().sql == ""
