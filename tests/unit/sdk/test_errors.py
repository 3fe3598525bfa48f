"""The SDK decodes what the services' one error model encodes (services.chassis.errors)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2

from cex_sdk import errors
from services.chassis.errors import (
    ExchangeError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)


def test_error_info_bad_request_and_retry_info_land_on_the_exception() -> None:
    status = InvalidArgument(
        "ORDER_INVALID_PRICE",
        "price is not on the tick grid",
        metadata={"market": "BTC-USDT", "tick": "0.01"},
        violations=[FieldViolation("price", "must be a multiple of 0.01", "TICK")],
        retry_after_s=0.25,
    ).to_status("order")
    error = errors.from_status(status)
    assert type(error) is errors.InvalidArgumentError
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.domain) == ("ORDER_INVALID_PRICE", "order")
    assert error.metadata == {"market": "BTC-USDT", "tick": "0.01"}
    assert error.violations == (
        errors.FieldViolation("price", "must be a multiple of 0.01", "TICK"),
    )
    assert error.retry_after_s == 0.25
    assert error.message == "price is not on the tick grid"
    assert "ORDER_INVALID_PRICE" in str(error)


@pytest.mark.parametrize(
    ("code", "family"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, errors.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.ABORTED, errors.FailedPreconditionError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.RateLimitedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, errors.CancelledError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.UNKNOWN, errors.InternalError),
        (grpc.StatusCode.DATA_LOSS, errors.InternalError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.InternalError),
    ],
)
def test_each_code_maps_to_its_family(code: grpc.StatusCode, family: type[errors.CexError]) -> None:
    error = errors.from_status(ExchangeError("TEST_REASON", "m", code=code).to_status("test"))
    assert type(error) is family
    assert isinstance(error, errors.CexError)
    assert (error.code, error.reason, error.domain) == (code, "TEST_REASON", "test")


def test_a_status_without_details_still_has_its_code() -> None:
    error = errors.from_status(status_pb2.Status(code=8, message="too big"))
    assert type(error) is errors.RateLimitedError
    assert (error.reason, error.domain, error.retry_after_s) == ("", "", None)
    assert error.violations == ()


def test_rpc_errors_from_the_wire_decode_the_same() -> None:
    status = NotFound("LEDGER_ACCOUNT_NOT_FOUND", "no balances").to_status("ledger")
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        details="no balances",
    )
    error = errors.from_rpc_error(rpc_error)
    assert type(error) is errors.NotFoundError
    assert (error.reason, error.domain) == ("LEDGER_ACCOUNT_NOT_FOUND", "ledger")
    # Without the trailer (a proxy's own reply) only the code and text remain.
    bare = errors.from_rpc_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="reset"
        )
    )
    assert type(bare) is errors.UnavailableError
    assert (bare.reason, bare.message) == ("", "reset")


def test_a_retry_hint_survives_as_seconds() -> None:
    status = ResourceExhausted("RISK_RATE_LIMITED", "slow down", retry_after_s=1.5).to_status(
        "risk"
    )
    assert errors.from_status(status).retry_after_s == 1.5
