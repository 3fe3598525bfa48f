"""Failed calls as typed exceptions, one class per family of gRPC codes.

Every error the exchange returns carries a `google.rpc.Status` in the
`grpc-status-details-bin` trailer with an `ErrorInfo` (reason, domain,
metadata), and where they apply `BadRequest` field violations and a
`RetryInfo` delay. `from_rpc_error` decodes them onto the exception, so
callers branch on the class and the reason, never on message text::

    try:
        await client.orders.place("BTC-USDT", SIDE_BUY, "0.1", price="99.5")
    except FailedPreconditionError as error:
        if error.reason == "LEDGER_INSUFFICIENT_FUNDS": ...
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "CexError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_class",
    "from_rpc_error",
    "from_status",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str
    reason: str = ""


class CexError(Exception):
    """A failed call: its gRPC code and what the exchange said about it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {reason + ': ' if reason else ''}{message}")
        self.code = code
        self.message = message
        #: The ErrorInfo reason, UPPER_SNAKE with a component prefix
        #: (LEDGER_INSUFFICIENT_FUNDS, EDGE_RATE_LIMITED); "" if none was sent.
        self.reason = reason
        #: Who answered: a service ("ledger", "auth") or "envoy" for the edge.
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.violations = violations
        #: The server's RetryInfo delay in seconds, if it sent one.
        self.retry_after_s = retry_after_s


class InvalidArgumentError(CexError):
    """INVALID_ARGUMENT, OUT_OF_RANGE: fix the request (see `violations`)."""


class NotFoundError(CexError):
    """NOT_FOUND (also another account's resource: ids cannot be probed)."""


class AlreadyExistsError(CexError):
    """ALREADY_EXISTS: an idempotency id was reused with a different request."""


class FailedPreconditionError(CexError):
    """FAILED_PRECONDITION, ABORTED: the state does not allow it (funds, market halted)."""


class PermissionDeniedError(CexError):
    """PERMISSION_DENIED: the key lacks a scope, or the account is frozen."""


class UnauthenticatedError(CexError):
    """UNAUTHENTICATED: bad credentials or an expired/invalid token."""


class RateLimitedError(CexError):
    """RESOURCE_EXHAUSTED: a rate limit (wait `retry_after_s`) or an oversized message."""


class UnavailableError(CexError):
    """UNAVAILABLE: the service or the edge could not be reached; retried for safe calls."""


class DeadlineExceededError(CexError):
    """DEADLINE_EXCEEDED: the call's deadline passed; a mutating call may have happened."""


class CancelledError(CexError):
    """CANCELLED: the call was cancelled (usually by the caller)."""


class InternalError(CexError):
    """INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED: a server-side fault or a wrong method."""


_FAMILIES: dict[grpc.StatusCode, type[CexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[CexError]:
    """The exception class for a gRPC code (InternalError for the rest)."""
    return _FAMILIES.get(code, InternalError)


def from_status(status: status_pb2.Status) -> CexError:
    """Decode a google.rpc.Status (as sent in grpc-status-details-bin)."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(
                FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return error_class(code)(
        code,
        status.message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=tuple(violations),
        retry_after_s=retry_after,
    )


def _from_trailers(
    code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, str | bytes]] | None
) -> CexError:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return from_status(status)
    return error_class(code)(code, message)


def from_rpc_error(error: grpc.RpcError) -> CexError:
    """The typed exception for a failed grpc (sync or asyncio) call."""
    call: grpc.Call = error  # type: ignore[assignment]
    return _from_trailers(call.code(), call.details() or "", call.trailing_metadata())
