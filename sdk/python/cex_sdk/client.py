"""The exchange client: one channel, a token from an API key, deadlines and retries."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from cex.auth.v1 import auth_pb2
from cex.ledger.v1 import ledger_pb2

from ._closing import ClosedOnExit
from ._service import R, ServiceApi
from ._tokens import TokenSource
from .errors import CexError, UnauthenticatedError, from_rpc_error
from .marketdata import MarketDataApi
from .orders import OrdersApi
from .ratelimit import RateLimit, rate_limit_of
from .retry import RetryEvent, RetryPolicy, may_retry

__all__ = ["DEFAULT_TIMEOUT_S", "KEEPALIVE_OPTIONS", "AuthApi", "Client", "LedgerApi"]

M = TypeVar("M")

DEFAULT_TIMEOUT_S = 10.0
#: HTTP/2 pings every 30 s while calls are open, so a dead connection is noticed
#: in ~40 s instead of at the OS's TCP timeout.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)
_ISSUE_TOKEN = "/cex.auth.v1.AuthService/IssueToken"


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _bind(factory: Callable[..., M], method: str, response_type: type[Message]) -> M:
    """One of the channel's multicallables (`factory`: unary_unary, unary_stream,
    stream_stream) for a method by its full name, speaking protobuf."""
    return factory(
        method, request_serializer=_serialize, response_deserializer=response_type.FromString
    )


class Client(ClosedOnExit):
    """An asyncio client of the exchange through its edge (Envoy).

    Make one with `Client.from_api_key` and share it; close it with `close()`
    or `async with`. Every call has a deadline (`timeout_s`, per client or per
    call) that also bounds its retries; see `cex_sdk.retry` for what is retried.

    `last_rate_limit` is the order-entry budget the latest answer that carried
    one reported (`cex_sdk.ratelimit`), or None before any did.
    """

    last_rate_limit: RateLimit | None

    def __init__(
        self,
        channel: grpc.aio.Channel,
        key_id: str,
        secret: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self._clock = clock
        self._sleep = sleep
        self._random = random
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}
        self.last_rate_limit = None
        request = auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret)
        self.tokens = TokenSource(
            lambda: self.call(
                _ISSUE_TOKEN, request, auth_pb2.IssueTokenResponse, authenticated=False
            ),
            clock=wall_clock,
        )
        self.auth = AuthApi(self)
        self.ledger = LedgerApi(self)
        self.orders = OrdersApi(self)
        self.market_data = MarketDataApi(self)

    @classmethod
    def from_api_key(
        cls,
        target: str,
        key_id: str,
        secret: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> Client:
        """A client of `target` (host:port of the edge) using an API key.

        Plaintext unless `credentials` (e.g. `grpc.ssl_channel_credentials()`)
        are given. The first call fetches a token; it is renewed before expiry.
        """
        channel_options = [*KEEPALIVE_OPTIONS, *options]
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        return cls(channel, key_id, secret, timeout_s=timeout_s, retry=retry, on_retry=on_retry)

    async def __aenter__(self) -> Client:
        return self

    async def close(self) -> None:
        await self._channel.close()

    async def account_id(self) -> str:
        """The API key's account (known once a token has been issued)."""
        await self.tokens.token()
        return self.tokens.account_id

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying a valid token (for streams opened by hand)."""
        return (("authorization", f"Bearer {await self.tokens.token()}"),)

    def stream_stream(
        self, method: str, response_type: type[R]
    ) -> grpc.aio.StreamStreamMultiCallable[Message, R]:
        """A bidirectional stream method by its full name (no deadline, no retry).

        The helpers built on it (`MarketMakerSession`) reconnect themselves.
        """
        return _bind(self._channel.stream_stream, method, response_type)

    def unary_stream(
        self, method: str, response_type: type[R]
    ) -> grpc.aio.UnaryStreamMultiCallable[Message, R]:
        """A server-streaming method by its full name (no deadline, no retry).

        The helpers built on it (`LocalOrderBook`) reconnect themselves.
        """
        return _bind(self._channel.unary_stream, method, response_type)

    def _callable(
        self, method: str, response_type: type[R]
    ) -> grpc.aio.UnaryUnaryMultiCallable[Message, R]:
        multicallable = self._callables.get(method)
        if multicallable is None:
            multicallable = _bind(self._channel.unary_unary, method, response_type)
            self._callables[method] = multicallable
        return cast("grpc.aio.UnaryUnaryMultiCallable[Message, R]", multicallable)

    async def call(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        authenticated: bool = True,
    ) -> R:
        """Call a unary method by its full name (`/cex.order.v1.OrderService/PlaceOrder`).

        The typed accessors (`client.auth`, `client.ledger`) are thin wrappers
        of this; it also serves methods they do not cover yet. Raises a
        `CexError` subclass.
        """
        multicallable = self._callable(method, response_type)
        deadline = self._clock() + (self._timeout_s if timeout_s is None else timeout_s)
        retries = 0
        refreshed = False
        while True:
            token = await self.tokens.token() if authenticated else ""
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            remaining = deadline - self._clock()
            call = multicallable(request, timeout=max(remaining, 0.0), metadata=metadata)
            try:
                response = await call
            except grpc.aio.AioRpcError as rpc_error:
                self._note_rate_limit(
                    method, rpc_error.initial_metadata(), rpc_error.trailing_metadata()
                )
                error = from_rpc_error(rpc_error)
            else:
                self._note_rate_limit(
                    method, await call.initial_metadata(), await call.trailing_metadata()
                )
                return response
            if isinstance(error, UnauthenticatedError) and authenticated and not refreshed:
                # The token was refused before any handler ran (expired in
                # flight, or the signing key rotated): renew it once, resend.
                self.tokens.invalidate(token)
                refreshed = True
                continue
            retries += 1
            delay = self._retry_delay(method, request, error, retries, deadline)
            if delay is None:
                raise error
            await self._sleep(delay)

    def _note_rate_limit(self, method: str, *metadata: Any) -> None:
        usage = rate_limit_of(method, *metadata)
        if usage is not None:
            self.last_rate_limit = usage

    def _retry_delay(
        self, method: str, request: Message, error: CexError, retry: int, deadline: float
    ) -> float | None:
        if retry >= self._retry.max_attempts or not may_retry(method, request, error.code):
            return None
        delay = self._retry.delay_s(retry, error.retry_after_s, self._random)
        if self._clock() + delay >= deadline:
            return None
        if self._on_retry is not None:
            self._on_retry(
                RetryEvent(method, retry, error.code, error.reason, delay, error.retry_after_s)
            )
        return delay


class AuthApi(ServiceApi):
    """cex.auth.v1.AuthService: the caller's account and keys."""

    _SERVICE = "/cex.auth.v1.AuthService/"

    async def get_account(
        self, account_id: str | None = None, *, timeout_s: float | None = None
    ) -> auth_pb2.Account:
        """The account (default: the API key's own)."""
        request = auth_pb2.GetAccountRequest(
            account_id=account_id or await self._client.account_id()
        )
        reply = await self._call("GetAccount", request, auth_pb2.GetAccountResponse, timeout_s)
        return reply.account

    async def list_api_keys(
        self,
        *,
        state: auth_pb2.ApiKeyState.ValueType = auth_pb2.API_KEY_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> auth_pb2.ListApiKeysResponse:
        """One page of the caller's API keys (`next_page_token` for the next)."""
        request = auth_pb2.ListApiKeysRequest(
            state=state, page_size=page_size, page_token=page_token
        )
        return await self._call("ListApiKeys", request, auth_pb2.ListApiKeysResponse, timeout_s)

    async def get_fees(self, *, timeout_s: float | None = None) -> auth_pb2.GetFeesResponse:
        """The fees that apply to the caller: maker and taker rates per market (and
        the asset each side is charged in), each asset's withdrawal fee and minimum."""
        return await self._call(
            "GetFees", auth_pb2.GetFeesRequest(), auth_pb2.GetFeesResponse, timeout_s
        )


class LedgerApi(ServiceApi):
    """cex.ledger.v1.LedgerService: the caller's balances."""

    _SERVICE = "/cex.ledger.v1.LedgerService/"

    async def get_balances(
        self, assets: Sequence[str] = (), *, timeout_s: float | None = None
    ) -> list[ledger_pb2.Balance]:
        """The caller's balances, one per asset (only `assets` if given), sorted by asset.

        Amounts are decimal strings; use `decimal.Decimal`, never float.
        Zero is a balance: a new account gets every asset at zero, and each
        asset in `assets` is answered (zero if never held).
        """
        request = ledger_pb2.GetBalancesRequest(assets=list(assets))
        reply = await self._call("GetBalances", request, ledger_pb2.GetBalancesResponse, timeout_s)
        return list(reply.balances)
