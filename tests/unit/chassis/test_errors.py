import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.chassis import (
    ErrorDetails,
    ExchangeError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    invalid_field,
)
from services.chassis.errors import STATUS_DETAILS_KEY, status_metadata


def test_invalid_argument_carries_error_info_and_field_violations() -> None:
    error = InvalidArgument(
        "ORDER_INVALID_PRICE",
        "price must be a positive decimal",
        violations=[FieldViolation("price", "not a decimal: '1e5'", "NOT_DECIMAL")],
        metadata={"market": "BTC-USDT"},
    )
    status = error.to_status("order")

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "price must be a positive decimal"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "ORDER_INVALID_PRICE",
        "order",
        {"market": "BTC-USDT"},
    )
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.reason) for v in bad.field_violations] == [("price", "NOT_DECIMAL")]


def test_client_decodes_what_the_server_encodes() -> None:
    error = ResourceExhausted("RISK_RATE_LIMITED", "slow down", retry_after_s=1.5, domain="risk")
    trailers = status_metadata(error.to_status("ignored"))

    details = ErrorDetails.from_trailers(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", trailers)

    assert details.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "RISK_RATE_LIMITED"
    assert details.domain == "risk"
    assert details.retry_after_s == pytest.approx(1.5)
    assert details.violations == ()


def test_trailers_without_details_still_decode_the_code() -> None:
    details = ErrorDetails.from_trailers(grpc.StatusCode.UNAVAILABLE, "gone", [("x", "y")])
    assert (details.code, details.message, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "gone",
        "",
    )


def test_status_round_trips_through_bytes() -> None:
    status = NotFound("LEDGER_ACCOUNT_NOT_FOUND", "no such account").to_status("ledger")
    key, raw = status_metadata(status)[0]
    assert key == STATUS_DETAILS_KEY
    again = ErrorDetails.from_status(status_pb2.Status.FromString(raw))
    assert (again.code, again.reason) == (grpc.StatusCode.NOT_FOUND, "LEDGER_ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize("reason", ["insufficient_funds", "FUNDS", "LEDGER-NSF", ""])
def test_reason_must_be_prefixed_upper_snake(reason: str) -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        ExchangeError(reason, "x")


def test_explicit_code_overrides_the_class_default() -> None:
    error = ExchangeError("MATCH_HALTED", "halted", code=grpc.StatusCode.UNAVAILABLE)
    assert error.to_status("match").code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_invalid_field_keeps_a_message_of_its_own() -> None:
    default = invalid_field("AUTH_X", "display_name", "must not be empty")
    own = invalid_field(
        "AUTH_X", "display_name", "must not be empty", message="display_name is required"
    )
    assert default.message == "display_name: must not be empty"
    assert own.message == "display_name is required"
    assert (
        own.violations
        == default.violations
        == (FieldViolation("display_name", "must not be empty", ""),)
    )
    assert (own.reason, own.code) == ("AUTH_X", grpc.StatusCode.INVALID_ARGUMENT)
