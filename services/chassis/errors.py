"""The one error model: ExchangeError -> google.rpc.Status with ErrorInfo.

Handlers raise `ExchangeError` (or a subclass); the server interceptor is the
only place that turns it into a gRPC status, with `ErrorInfo` always attached,
`BadRequest` for field violations and `RetryInfo` for back-off hints.
Clients decode the same details with `ErrorDetails.from_rpc_error`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "STATUS_DETAILS_KEY",
    "AlreadyExists",
    "ErrorDetails",
    "ExchangeError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Violations",
    "batch_size",
    "invalid",
    "invalid_field",
    "require_request_id",
    "status_metadata",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_REASON = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str
    reason: str = ""


class ExchangeError(Exception):
    """A failure a client can act on. `reason` is UPPER_SNAKE with a component prefix."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after_s: float | None = None,
        domain: str | None = None,
    ) -> None:
        if not _REASON.match(reason):
            raise ValueError(f"reason {reason!r} must be UPPER_SNAKE with a component prefix")
        super().__init__(message)
        self.reason = reason
        self.message = message
        if code is not None:
            self.code = code
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s
        self.domain = domain

    def to_status(self, default_domain: str) -> status_pb2.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=self.domain or default_domain, metadata=self.metadata
            )
        ]
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description, reason=v.reason
                        )
                        for v in self.violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


class InvalidArgument(ExchangeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ExchangeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ExchangeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ExchangeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ExchangeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ExchangeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ExchangeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ExchangeError):
    code = grpc.StatusCode.UNAVAILABLE


def invalid(reason: str, violations: Sequence[FieldViolation]) -> InvalidArgument:
    """INVALID_ARGUMENT naming every bad field (google.rpc.BadRequest), its message
    the violations in order (`field: description; ...`)."""
    return InvalidArgument(
        reason,
        "; ".join(f"{v.field}: {v.description}" for v in violations),
        violations=violations,
    )


def invalid_field(
    reason: str, field: str, description: str, why: str = "", *, message: str | None = None
) -> InvalidArgument:
    """INVALID_ARGUMENT for one bad field; `why` is the violation's own reason.
    `message` replaces the default one (`field: description`) where a service's
    text is part of its contract."""
    violations = [FieldViolation(field, description, why)]
    if message is None:
        return invalid(reason, violations)
    return InvalidArgument(reason, message, violations=violations)


class Violations:
    """Collects every problem of a request, to report them all at once."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # the path of the message checked ("requests[2].")
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str = "") -> None:
        self.items.append(FieldViolation(f"{self.prefix}{field}", description, reason))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, reason: str = "") -> None:
        """INVALID_ARGUMENT with every violation, under `reason` or, without one,
        the first violation's own."""
        if self.items:
            raise invalid(reason or self.items[0].reason, self.items)


MAX_REQUEST_ID = 128


def require_request_id(value: str, reason: str, *, field: str = "request_id") -> str:
    """The one rule for idempotency keys on mutating calls (ADR 0003): required,
    1 to 128 characters; else INVALID_ARGUMENT with a field violation naming the
    field (`request_id`, or the key's own name, such as a transfer's `id`)."""
    if not value or len(value) > MAX_REQUEST_ID:
        raise invalid_field(
            reason,
            field,
            f"required: 1 to {MAX_REQUEST_ID} characters",
            reason,
            message=f"{field} is required: the call's idempotency key, "
            f"1 to {MAX_REQUEST_ID} characters",
        )
    return value


def batch_size(count: int, *, maximum: int, field: str, reason: str, minimum: int = 1) -> int:
    """The one rule for the items of a batch request (`requests`, `transfers`,
    `commands`): `minimum` to `maximum` of them, else INVALID_ARGUMENT with a field
    violation on the repeated field. Answers `count`."""
    if minimum <= count <= maximum:
        return count
    bounds = f"{minimum} to {maximum}" if minimum else f"at most {maximum}"
    raise invalid_field(
        reason, field, f"{bounds} items", reason, message=f"{field}: {bounds} items, got {count}"
    )


def status_metadata(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata that carries the rich status, as grpcio-status sends it."""
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a client learns from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> ErrorDetails:
        reason = domain = ""
        metadata: dict[str, str] = {}
        violations: list[FieldViolation] = []
        retry: float | None = None
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
                info_retry = error_details_pb2.RetryInfo()
                detail.Unpack(info_retry)
                retry = info_retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            code=_CODES.get(status.code, grpc.StatusCode.UNKNOWN),
            message=status.message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            violations=tuple(violations),
            retry_after_s=retry,
        )

    @classmethod
    def from_trailers(
        cls, code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, str | bytes]]
    ) -> ErrorDetails:
        for key, value in trailers or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                return cls.from_status(status_pb2.Status.FromString(value))
        return cls(code=code, message=message)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ErrorDetails:
        """Decode a failed call from either the sync or the asyncio API."""
        call: grpc.Call = error  # type: ignore[assignment]
        return cls.from_trailers(call.code(), call.details() or "", call.trailing_metadata())

    def error(self, fallback_reason: str) -> ExchangeError:
        """The same failure, to raise or answer again (`fallback_reason` if it had none)."""
        try:
            return ExchangeError(
                self.reason or fallback_reason,
                self.message or self.reason or fallback_reason,
                code=self.code,
                metadata=self.metadata,
                violations=self.violations,
                retry_after_s=self.retry_after_s,
                domain=self.domain or None,
            )
        except ValueError:  # a reason outside the model
            return ExchangeError(fallback_reason, self.message, code=self.code)
