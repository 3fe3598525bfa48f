"""The client's retry loop, deadlines and tokens, against an in-process gRPC server.

The server is a small scripted fake of auth and ledger: each method answers from
a queue of outcomes (a reply, or an error with the rich status the real services
send). Time is fake: the client's sleeps advance a clock instead of waiting.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex_sdk import (
    Client,
    NotFoundError,
    RateLimitedError,
    RetryEvent,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from services.chassis.errors import ExchangeError, status_metadata

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
TTL_S = 300


def _error(code: grpc.StatusCode, reason: str, retry_after_s: float | None = None) -> ExchangeError:
    return ExchangeError(reason, reason.lower(), code=code, retry_after_s=retry_after_s)


@dataclass
class Script:
    """What the fake server answers, and what it saw."""

    outcomes: dict[str, collections.deque[ExchangeError]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens_seen: list[str] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    issued: int = 0
    now: float = 1_000_000.0  # the fake wall clock, shared with the client

    def fail(self, method: str, *errors: ExchangeError) -> None:
        self.outcomes[method].extend(errors)

    async def answer(
        self, method: str, context: grpc.aio.ServicerContext, reply: Callable[[], Message]
    ) -> Message:
        self.calls[method] += 1
        self.deadlines.append(context.time_remaining())
        md = dict(context.invocation_metadata() or ())
        self.tokens_seen.append(str(md.get("authorization", "")))
        if self.outcomes[method]:
            error = self.outcomes[method].popleft()
            status = error.to_status("fake")
            context.set_trailing_metadata(status_metadata(status))
            await context.abort(error.code, error.message)
        return reply()


class FakeAuth(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        def reply() -> auth_pb2.IssueTokenResponse:
            self.s.issued += 1
            expire = Timestamp()
            expire.FromNanoseconds(int((self.s.now + TTL_S) * 1e9))
            return auth_pb2.IssueTokenResponse(
                access_token=f"token-{self.s.issued}", expire_time=expire, account_id="acc_1"
            )

        assert (request.api_key_id, request.api_key_secret) == ("ak_1", "sk_1")
        return await self.s.answer("IssueToken", context, reply)  # type: ignore[return-value]

    async def GetAccount(
        self, request: auth_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetAccountResponse:
        account = auth_pb2.Account(account_id=request.account_id)
        return await self.s.answer(  # type: ignore[return-value]
            "GetAccount", context, lambda: auth_pb2.GetAccountResponse(account=account)
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeApiKeyResponse:
        return await self.s.answer(  # type: ignore[return-value]
            "RevokeApiKey", context, auth_pb2.RevokeApiKeyResponse
        )


class FakeLedger(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    async def GetBalances(
        self, request: ledger_pb2.GetBalancesRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetBalancesResponse:
        balance = ledger_pb2.Balance(account_id="acc_1", asset="USDT", available="5")
        return await self.s.answer(  # type: ignore[return-value]
            "GetBalances", context, lambda: ledger_pb2.GetBalancesResponse(balances=[balance])
        )


@dataclass
class Harness:
    script: Script
    target: str
    slept: list[float] = field(default_factory=list)
    retries: list[RetryEvent] = field(default_factory=list)
    clock: float = 0.0

    def client(self, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None) -> Client:
        async def sleep(delay: float) -> None:
            self.slept.append(delay)
            self.clock += delay
            self.script.now += delay

        return Client(
            grpc.aio.insecure_channel(self.target),
            "ak_1",
            "sk_1",
            timeout_s=timeout_s,
            retry=retry,
            on_retry=self.retries.append,
            clock=lambda: self.clock,
            wall_clock=lambda: self.script.now,
            sleep=sleep,
            random=lambda: 0.5,
        )


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    script = Script()
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(FakeAuth(script), server)
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(FakeLedger(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Harness(script, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def test_a_read_gets_a_token_and_carries_it_with_a_deadline(harness: Harness) -> None:
    async with harness.client(timeout_s=7.0) as client:
        balances = await client.ledger.get_balances()
        account = await client.auth.get_account()
    assert [(b.asset, b.available) for b in balances] == [("USDT", "5")]
    assert account.account_id == "acc_1"  # the key's own account, from IssueToken
    assert harness.script.issued == 1
    assert harness.script.tokens_seen == ["", "Bearer token-1", "Bearer token-1"]
    # Each call went out with the client's 7 s deadline (grpc rounds it on the wire).
    assert all(d is not None and 6.0 < d < 7.1 for d in harness.script.deadlines), (
        harness.script.deadlines
    )


async def test_unavailable_is_retried_with_growing_jittered_backoff(harness: Harness) -> None:
    harness.script.fail(
        "GetBalances",
        _error(UNAVAILABLE, "EDGE_NO_UPSTREAM"),
        _error(UNAVAILABLE, "EDGE_NO_UPSTREAM"),
    )
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=5.0)
    async with harness.client(retry=policy) as client:
        balances = await client.ledger.get_balances()
    assert len(balances) == 1
    assert harness.script.calls["GetBalances"] == 3
    assert harness.slept == pytest.approx([0.05, 0.1])  # random() = 0.5 of 0.1, 0.2
    assert [(e.retry, e.code, e.reason) for e in harness.retries] == [
        (1, UNAVAILABLE, "EDGE_NO_UPSTREAM"),
        (2, UNAVAILABLE, "EDGE_NO_UPSTREAM"),
    ]


async def test_retry_info_is_honoured(harness: Harness) -> None:
    harness.script.fail(
        "GetBalances", _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "EDGE_RATE_LIMITED", 1.0)
    )
    async with harness.client(retry=RetryPolicy(initial_backoff_s=0.1)) as client:
        await client.ledger.get_balances()
    assert harness.slept == pytest.approx([1.05])
    assert harness.retries[0].retry_after_s == 1.0


async def test_the_token_request_itself_is_retried_when_rate_limited(harness: Harness) -> None:
    harness.script.fail(
        "IssueToken", _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "EDGE_RATE_LIMITED", 1.0)
    )
    async with harness.client() as client:
        await client.ledger.get_balances()
    assert harness.script.calls["IssueToken"] == 2
    assert harness.retries[0].method == "/cex.auth.v1.AuthService/IssueToken"


async def test_a_mutating_call_without_its_key_is_never_resent(harness: Harness) -> None:
    harness.script.fail("RevokeApiKey", _error(UNAVAILABLE, "EDGE_NO_UPSTREAM"))
    async with harness.client() as client:
        with pytest.raises(UnavailableError):
            await client.call(
                "/cex.auth.v1.AuthService/RevokeApiKey",
                auth_pb2.RevokeApiKeyRequest(api_key_id="ak_2"),
                auth_pb2.RevokeApiKeyResponse,
            )
    assert harness.script.calls["RevokeApiKey"] == 1
    assert harness.retries == []


async def test_a_mutating_call_with_its_key_is_resent(harness: Harness) -> None:
    harness.script.fail("RevokeApiKey", _error(UNAVAILABLE, "EDGE_NO_UPSTREAM"))
    async with harness.client() as client:
        await client.call(
            "/cex.auth.v1.AuthService/RevokeApiKey",
            auth_pb2.RevokeApiKeyRequest(request_id="r-1", api_key_id="ak_2"),
            auth_pb2.RevokeApiKeyResponse,
        )
    assert harness.script.calls["RevokeApiKey"] == 2


async def test_a_definite_answer_is_raised_at_once_with_its_details(harness: Harness) -> None:
    harness.script.fail(
        "GetBalances", _error(grpc.StatusCode.NOT_FOUND, "LEDGER_ACCOUNT_NOT_FOUND")
    )
    async with harness.client() as client:
        with pytest.raises(NotFoundError) as failure:
            await client.ledger.get_balances()
    assert (failure.value.reason, failure.value.domain) == ("LEDGER_ACCOUNT_NOT_FOUND", "fake")
    assert harness.script.calls["GetBalances"] == 1


async def test_attempts_are_capped(harness: Harness) -> None:
    harness.script.fail("GetBalances", *[_error(UNAVAILABLE, "EDGE_NO_UPSTREAM")] * 5)
    async with harness.client(retry=RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(UnavailableError):
            await client.ledger.get_balances()
    assert harness.script.calls["GetBalances"] == 3


async def test_no_retry_outlives_the_deadline(harness: Harness) -> None:
    harness.script.fail(
        "GetBalances", _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "EDGE_RATE_LIMITED", 5.0)
    )
    async with harness.client(timeout_s=2.0) as client:
        with pytest.raises(RateLimitedError) as failure:
            await client.ledger.get_balances()
    assert failure.value.retry_after_s == 5.0
    assert harness.script.calls["GetBalances"] == 1
    assert harness.slept == []


async def test_the_token_is_renewed_before_it_expires(harness: Harness) -> None:
    async with harness.client() as client:
        await client.ledger.get_balances()
        harness.script.now += TTL_S - 61  # still a minute and more left: reused
        await client.ledger.get_balances()
        harness.script.now += 2  # within the last minute: renewed
        await client.ledger.get_balances()
    assert harness.script.issued == 2
    seen = harness.script.tokens_seen  # "" is IssueToken, which needs no token
    assert seen == ["", "Bearer token-1", "Bearer token-1", "", "Bearer token-2"]


async def test_a_refused_token_is_replaced_once(harness: Harness) -> None:
    harness.script.fail(
        "GetBalances", _error(grpc.StatusCode.UNAUTHENTICATED, "AUTH_TOKEN_EXPIRED")
    )
    async with harness.client() as client:
        await client.ledger.get_balances()
        assert harness.script.issued == 2
        harness.script.fail(
            "GetBalances",
            _error(grpc.StatusCode.UNAUTHENTICATED, "AUTH_TOKEN_EXPIRED"),
            _error(grpc.StatusCode.UNAUTHENTICATED, "AUTH_TOKEN_EXPIRED"),
        )
        with pytest.raises(UnauthenticatedError):
            await client.ledger.get_balances()
    assert harness.script.issued == 3
