"""What the sync and the async class share: the description, signing, errors,
parsing, and every unified method written once as a plan.

A plan is a generator that yields the steps it needs (a `Call`, `Send`,
`AUTHENTICATE` or `LOAD_MARKETS`) and receives their answers (decoded JSON for a
request); an error of a step is raised inside the plan, at its `yield`. It
returns the unified structure. `cexcore` (sync) and `async_support.cexcore`
drive the same plans, one with blocking calls and one with awaits (`Run` and
`_perform` are the rest of driving, here once), so the two classes cannot
drift apart (CCXT itself gets there by transpiling one source). `request`,
with its token handling, is a plan too.

The REST surface is the one Envoy transcodes from the v1 protos (their
`google.api.http` annotations): JSON with the protos' field names, decimal
strings for money, RFC 3339 times, enums by name. Public market data needs
no token; everything else carries a short-lived access token that the
class obtains from the API key and secret (POST /v1/tokens) and keeps until
shortly before it expires (the token endpoint is rate limited per address).

Every mutating call is keyed (ADR 0003): orders by `client_order_id` (the
unified `clientOrderId`, generated when not given), cancels, amends,
cancel-alls and withdrawals by `request_id` (`params['requestId']`, or
generated). A retried call with the same key never acts twice.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ccxt.base.decimal_to_precision import TICK_SIZE
from ccxt.base.errors import (
    ArgumentsRequired,
    AuthenticationError,
    BadRequest,
    ExchangeError,
    InvalidOrder,
)

from .errors import error_class, reason_of

__all__ = [
    "AUTHENTICATE",
    "LOAD_MARKETS",
    "UNIFIED",
    "Call",
    "CexcoreBase",
    "Plan",
    "Run",
    "Send",
    "install",
]

Json = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One REST request of a plan: `path` relative to the edge, with {fields}."""

    path: str
    api: str = "public"
    method: str = "GET"
    params: Json = field(default_factory=dict)


@dataclass(frozen=True)
class Send:
    """A request as CCXT's own `request` sends it, beneath the token handling."""

    path: str
    api: str
    method: str
    params: Json
    headers: Any = None
    body: Any = None
    config: Json = field(default_factory=dict)


#: Load the markets (CCXT's `load_markets`, cached); answers them.
LOAD_MARKETS = "load_markets"
#: Hold a valid token; answers True if it was renewed for this step.
AUTHENTICATE = "authenticate"
Step = Call | Send | str
Plan = Generator[Step, Any, Any]


class Run:
    """A plan being driven: the `step` it waits on until it is `done`, then its `value`.

    A driver answers each step with `send`, or `throw`s the step's error into the
    plan; `close` ends a plan left unfinished (the driver was cancelled).
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.step: Step = ""
        self.done = False
        self.value: Any = None
        self.send(None)

    def send(self, reply: Any) -> None:
        self._resume(self._plan.send, reply)

    def throw(self, error: Exception) -> None:
        self._resume(self._plan.throw, error)

    def close(self) -> None:
        self._plan.close()

    def _resume(self, resume: Callable[[Any], Step], answer: Any) -> None:
        try:
            self.step = resume(answer)
        except StopIteration as returned:
            self.done, self.value = True, returned.value


# The unified methods implemented here (CCXT names; `has` says exactly these).
UNIFIED = (
    "fetch_markets",
    "fetch_currencies",
    "fetch_ticker",
    "fetch_tickers",
    "fetch_order_book",
    "fetch_trades",
    "fetch_ohlcv",
    "fetch_balance",
    "create_order",
    "cancel_order",
    "cancel_all_orders",
    "edit_order",
    "fetch_order",
    "fetch_orders",
    "fetch_open_orders",
    "fetch_closed_orders",
    "fetch_my_trades",
    "fetch_order_trades",
    "fetch_trading_fees",
    "fetch_deposit_address",
    "withdraw",
    "fetch_deposits",
    "fetch_withdrawals",
    "fetch_withdrawal",
    "create_market_buy_order_with_cost",
)

_HAS = {
    "spot": True,
    "publicAPI": True,
    "privateAPI": True,
    "cancelAllOrders": True,
    "cancelOrder": True,
    "createLimitOrder": True,
    "createMarketOrder": True,
    "createMarketBuyOrderWithCost": True,
    "createOrder": True,
    "createPostOnlyOrder": True,
    "createStopLimitOrder": True,
    "createStopMarketOrder": True,
    "createStopOrder": True,
    "createTriggerOrder": True,
    "editOrder": True,
    "fetchBalance": True,
    "fetchClosedOrders": True,
    "fetchCurrencies": True,
    "fetchDepositAddress": True,
    "fetchDeposits": True,
    "fetchL2OrderBook": True,
    "fetchMarkets": True,
    "fetchMyTrades": True,
    "fetchOHLCV": True,
    "fetchOpenOrders": True,
    "fetchOrder": True,
    "fetchOrderBook": True,
    "fetchOrders": True,
    "fetchOrderTrades": True,
    "fetchTicker": True,
    "fetchTickers": True,
    "fetchTrades": True,
    "fetchTradingFees": True,
    "fetchWithdrawal": True,
    "fetchWithdrawals": True,
    "withdraw": True,
}

_SIDES = {"SIDE_BUY": "buy", "SIDE_SELL": "sell"}
_TYPES = {
    "ORDER_TYPE_LIMIT": "limit",
    "ORDER_TYPE_MARKET": "market",
    "ORDER_TYPE_STOP_LIMIT": "limit",
    "ORDER_TYPE_STOP_MARKET": "market",
}
_TIME_IN_FORCE = {
    "TIME_IN_FORCE_GTC": "GTC",
    "TIME_IN_FORCE_IOC": "IOC",
    "TIME_IN_FORCE_FOK": "FOK",
    "TIME_IN_FORCE_GTD": "GTD",
}
_ORDER_STATUS = {
    "ORDER_STATE_PENDING_NEW": "open",
    "ORDER_STATE_UNTRIGGERED": "open",
    "ORDER_STATE_OPEN": "open",
    "ORDER_STATE_PARTIALLY_FILLED": "open",
    "ORDER_STATE_FILLED": "closed",
    "ORDER_STATE_CANCELLED": "canceled",
    "ORDER_STATE_REJECTED": "rejected",
    "ORDER_STATE_EXPIRED": "expired",
}
_DEPOSIT_STATUS = {
    "DEPOSIT_STATE_PENDING": "pending",
    "DEPOSIT_STATE_CREDITED": "ok",
    "DEPOSIT_STATE_CANCELLED": "canceled",
    "DEPOSIT_STATE_REJECTED": "failed",
}
_WITHDRAWAL_STATUS = {
    "WITHDRAWAL_STATE_PENDING": "pending",
    "WITHDRAWAL_STATE_BROADCAST": "pending",
    "WITHDRAWAL_STATE_COMPLETED": "ok",
    "WITHDRAWAL_STATE_CANCELLED": "canceled",
    "WITHDRAWAL_STATE_REJECTED": "failed",
    "WITHDRAWAL_STATE_FAILED": "failed",
}
_ACTIVE_MARKET = ("MARKET_STATUS_TRADING", "MARKET_STATUS_POST_ONLY")
_PAGE = 1000  # the servers' largest page
# Renew the token this long before it expires (it lives 5 minutes).
_TOKEN_MARGIN_MS = 30_000


def new_id(prefix: str) -> str:
    """A fresh idempotency key (orders: `client_order_id`, others: `request_id`)."""
    return f"{prefix}-{uuid.uuid4().hex}"


# The unified lists come in families that share CCXT's signature (fetch_orders,
# fetch_open_orders, ...): each family's plan is written once, made per list.


def _account_list(kind: str, parse: str, **fixed: str) -> Callable[..., Plan]:
    """The plan of a list of the account's `kind` (v1/orders, v1/fills): `fixed`
    params, the time window, one market's (a symbol) or every market's items,
    page after page, parsed by the method `parse` names."""

    def plan(
        self: CexcoreBase,
        symbol: str | None = None,
        since: int | None = None,
        limit: int | None = None,
        params: Json | None = None,
    ) -> Plan:
        request: Json = {**fixed, **self._windowed(since, params)}
        market = yield from self._market_filter(symbol, request)
        items = yield from self._pages(Call(f"v1/{kind}", "private", params=request), kind, limit)
        return getattr(self, parse)(items, market, since, limit)

    return plan


def _transfer_list(kind: str) -> Callable[..., Plan]:
    """The plan of fetch_deposits or fetch_withdrawals (v1/{kind}): the time window,
    one asset's (a currency code) or every asset's, page after page."""

    def plan(
        self: CexcoreBase,
        code: str | None = None,
        since: int | None = None,
        limit: int | None = None,
        params: Json | None = None,
    ) -> Plan:
        request = self._windowed(since, params)
        currency = yield from self._currency_filter(code, request)
        items = yield from self._pages(Call(f"v1/{kind}", "private", params=request), kind, limit)
        return self.parse_transactions(items, currency, since, limit)

    return plan


# ccxt ships no type information: to the type checker the mixin is an Exchange of
# unknown shape (every ccxt helper is Any), at run time a plain mixin.
if TYPE_CHECKING:
    from ccxt.base.exchange import Exchange as _Exchange
else:
    _Exchange = object


class CexcoreBase(_Exchange):
    """The shared part of `cexcore`; mixed in before CCXT's sync or async Exchange."""

    _token: str = ""
    _token_renew_ms: int = 0

    def describe(self) -> Any:
        base = super().describe()
        has = {key: False for key in base["has"]}
        has.update(_HAS)
        return self.deep_extend(
            base,
            {
                "id": "cexcore",
                "name": "cex core",
                "countries": [],
                "version": "v1",
                "rateLimit": 10,
                "certified": False,
                "pro": False,
                "has": has,
                "timeframes": {
                    "1m": "CANDLE_INTERVAL_ONE_MINUTE",
                    "5m": "CANDLE_INTERVAL_FIVE_MINUTES",
                    "15m": "CANDLE_INTERVAL_FIFTEEN_MINUTES",
                    "30m": "CANDLE_INTERVAL_THIRTY_MINUTES",
                    "1h": "CANDLE_INTERVAL_ONE_HOUR",
                    "4h": "CANDLE_INTERVAL_FOUR_HOURS",
                    "1d": "CANDLE_INTERVAL_ONE_DAY",
                },
                # `hostname` is the edge (Envoy): `make run` listens on 127.0.0.1:50050.
                "hostname": "127.0.0.1:50050",
                "urls": {
                    "api": {"rest": "http://{hostname}"},
                    "www": "https://github.com/",
                    "doc": ["docs/ccxt.md"],
                },
                "requiredCredentials": {"apiKey": True, "secret": True},
                "precisionMode": TICK_SIZE,
                "options": {"clientOrderIdPrefix": "ccxt"},
            },
        )

    # ---- transport -----------------------------------------------------------

    def sign(
        self,
        path: str,
        api: Any = "public",
        method: str = "GET",
        params: Json | None = None,
        headers: Any = None,
        body: Any = None,
    ) -> Json:
        params = params or {}
        rest = self.implode_hostname(self.urls["api"]["rest"])
        url = rest + "/" + self.implode_params(path, params)
        query = self.omit(params, self.extract_params(path))
        headers = {}
        if method == "GET":
            if query:
                url += "?" + self.urlencode_with_array_repeat(query)
        else:
            body = self.json(query)
            headers["Content-Type"] = "application/json"
        if api == "private":
            headers["Authorization"] = "Bearer " + self._token
        return {"url": url, "method": method, "body": body, "headers": headers}

    def handle_errors(
        self,
        code: int,
        reason: str,
        url: str,
        method: str,
        headers: Any,
        body: str,
        response: Any,
        request_headers: Any,
        request_body: Any,
    ) -> Any:
        """A google.rpc.Status answer raises the class its ErrorInfo reason names."""
        if not isinstance(response, dict) or "code" not in response or code < 400:
            return None  # not an error, or not ours: CCXT's HTTP status handling
        found = reason_of(response)
        cls = error_class(found, self.safe_integer(response, "code"))
        if cls is None:
            return None
        raise cls(f"{self.id} {found or code} {body}")

    def _request(
        self,
        path: str,
        api: Any = "public",
        method: str = "GET",
        params: Any = None,
        headers: Any = None,
        body: Any = None,
        config: Any = None,
    ) -> Plan:
        """CCXT's request, with a valid token for private calls; a token the edge
        refuses (e.g. the stack restarted with new keys) is renewed once."""
        send = Send(path, api, method, params or {}, headers, body, config or {})
        if api != "private":
            return (yield send)
        fresh = yield AUTHENTICATE
        try:
            return (yield send)
        except AuthenticationError:
            if fresh:
                raise
            self._forget_token()
            yield AUTHENTICATE
            return (yield send)

    def _authenticate(self) -> Any:
        """Obtain a token if there is none or it is near expiry; True if it did."""
        return self._drive(self._renew_token())

    def _renew_token(self) -> Plan:
        now: int = self.milliseconds()
        if self._token and now < self._token_renew_ms:
            return False
        self.check_required_credentials()
        credentials = {"api_key_id": self.apiKey, "api_key_secret": self.secret}
        self._keep_token((yield Send("v1/tokens", "public", "POST", credentials)))
        return True

    def _keep_token(self, reply: Json) -> None:
        token = self.safe_string(reply, "access_token")
        expires = self.parse8601(self.safe_string(reply, "expire_time"))
        if not token or expires is None:
            raise ExchangeError(f"{self.id} the token endpoint answered without a token")
        now: int = self.milliseconds()
        self._token = token
        self._token_renew_ms = expires - min(_TOKEN_MARGIN_MS, (expires - now) // 5)

    def _forget_token(self) -> None:
        self._token = ""
        self._token_renew_ms = 0

    def _perform(self, step: Step) -> Callable[[], Any]:
        """What answers a plan's step: a call of this class's methods, blocking in
        `cexcore` and a coroutine function in `async_support.cexcore`."""
        if isinstance(step, Call):
            return functools.partial(self.request, step.path, step.api, step.method, step.params)
        if isinstance(step, Send):
            return functools.partial(
                super().request,  # CCXT's, beneath `request`'s token handling
                step.path,
                step.api,
                step.method,
                step.params,
                step.headers,
                step.body,
                step.config,
            )
        if step == LOAD_MARKETS:
            return functools.partial(self.load_markets)
        if step == AUTHENTICATE:
            return self._authenticate
        raise TypeError(f"a plan yielded {step!r}")

    def _drive(self, plan: Plan) -> Any:
        """Run a plan to its end: with blocking calls in `cexcore`, with awaits (a
        coroutine) in `async_support.cexcore`."""
        raise NotImplementedError

    # ---- small helpers -------------------------------------------------------

    def _ms(self, value: Any) -> int | None:
        return self.parse8601(value) if value else None

    def _nonempty(self, value: Any) -> str | None:
        return str(value) if value not in (None, "") else None

    def _windowed(self, since: int | None, params: Json | None) -> Json:
        """A list's query: its time window (`since`, `params["until"]`) as
        start_time/end_time, then the other params as given."""
        params = params or {}
        request: Json = {}
        if since is not None:
            request["start_time"] = self.iso8601(since)
        until = self.safe_integer(params, "until")
        if until is not None:
            request["end_time"] = self.iso8601(until)
        return {**request, **self.omit(params, "until")}

    def _market_filter(
        self, symbol: str | None, request: Json
    ) -> Generator[Step, Any, Json | None]:
        """The market of `symbol`, named in `request`; None (every market) without one.
        The markets are loaded either way (parsing finds an item's market by id)."""
        yield LOAD_MARKETS
        if symbol is None:
            return None
        market = self._market_of(symbol)
        request["market"] = market["id"]
        return market

    def _currency_filter(
        self, code: str | None, request: Json
    ) -> Generator[Step, Any, Json | None]:
        """The currency of `code`, named in `request` (as `asset`); None (every asset)
        without one. The markets and currencies are loaded either way."""
        yield LOAD_MARKETS
        if code is None:
            return None
        currency: Json = self.currency(code)
        request["asset"] = currency["id"]
        return currency

    def _pages(self, call: Call, key: str, limit: int | None) -> Generator[Step, Any, list[Json]]:
        """Every item of a paged list (page_size/page_token), up to `limit`."""
        items: list[Json] = []
        params = dict(call.params)
        while True:
            want = _PAGE if limit is None else min(_PAGE, limit - len(items))
            params["page_size"] = want
            reply = yield Call(call.path, call.api, call.method, dict(params))
            items.extend(reply.get(key) or [])
            token = reply.get("next_page_token")
            if not token or (limit is not None and len(items) >= limit):
                return items
            params["page_token"] = token

    def _market_of(self, symbol: str) -> Json:
        market: Json = self.market(symbol)
        return market

    def _loaded_market(self, symbol: str) -> Generator[Step, Any, Json]:
        """The market of `symbol`, once the markets are loaded."""
        yield LOAD_MARKETS
        return self._market_of(symbol)

    def _request_id(self, params: Json) -> tuple[str, Json]:
        given = self.safe_string_2(params, "requestId", "request_id")
        rest = self.omit(params, ["requestId", "request_id"])
        return given or new_id(self.options.get("clientOrderIdPrefix", "ccxt")), rest

    # ---- public: markets and currencies --------------------------------------

    def _fetch_markets(self, params: Json | None = None) -> Plan:
        markets = yield from self._pages(Call("v1/markets", params=params or {}), "markets", None)
        return [self.parse_market(m) for m in markets]

    def parse_market(self, market: Json) -> Any:
        s = self.safe_string
        n = self.safe_number
        base_id, quote_id = s(market, "base_asset"), s(market, "quote_asset")
        base = self.safe_currency_code(base_id)
        quote = self.safe_currency_code(quote_id)
        return self.safe_market_structure(
            {
                "id": s(market, "symbol"),
                "symbol": f"{base}/{quote}",
                "base": base,
                "quote": quote,
                "settle": None,
                "baseId": base_id,
                "quoteId": quote_id,
                "settleId": None,
                "type": "spot",
                "spot": True,
                "margin": False,
                "swap": False,
                "future": False,
                "option": False,
                "active": s(market, "status") in _ACTIVE_MARKET,
                "contract": False,
                "linear": None,
                "inverse": None,
                "contractSize": None,
                "expiry": None,
                "expiryDatetime": None,
                "strike": None,
                "optionType": None,
                "precision": {"amount": n(market, "lot_size"), "price": n(market, "tick_size")},
                "limits": {
                    "leverage": {"min": None, "max": None},
                    "amount": {
                        "min": n(market, "min_quantity"),
                        "max": self.parse_number(self._nonempty(market.get("max_quantity"))),
                    },
                    "price": {"min": n(market, "tick_size"), "max": None},
                    "cost": {"min": n(market, "min_notional"), "max": None},
                },
                "created": None,
                "info": market,
            }
        )

    def _fetch_currencies(self, params: Json | None = None) -> Plan:
        """The assets of the markets (precision from their minor units); with
        credentials, also each asset's network, withdrawal fee and minimum."""
        markets = yield from self._pages(Call("v1/markets", params=params or {}), "markets", None)
        scales: dict[str, int] = {}
        for market in markets:
            scales[market["base_asset"]] = int(market.get("base_asset_scale") or 0)
            scales[market["quote_asset"]] = int(market.get("quote_asset_scale") or 0)
        fees: dict[str, Json] = {}
        if self.apiKey and self.secret:
            reply = yield Call("v1/fees", "private")
            fees = {a["asset"]: a for a in reply.get("assets") or []}
        return {
            self.safe_currency_code(asset): self._currency(asset, scale, fees.get(asset))
            for asset, scale in sorted(scales.items())
        }

    def _currency(self, asset: str, scale: int, fee: Json | None) -> Any:
        precision = self.parse_number(self.parse_precision(str(scale)))
        withdraw_fee = self.safe_number(fee, "withdrawal_fee")
        minimum = self.safe_number(fee, "min_withdrawal")
        limits = {
            "amount": {"min": precision, "max": None},
            "withdraw": {"min": minimum, "max": None},
            "deposit": {"min": None, "max": None},
        }
        networks = {}
        if fee is not None:
            network = fee["network"]
            networks[network] = {
                "id": network,
                "network": network,
                "active": True,
                "deposit": True,
                "withdraw": True,
                "fee": withdraw_fee,
                "precision": precision,
                "limits": {
                    "withdraw": {"min": minimum, "max": None},
                    "deposit": {"min": None, "max": None},
                },
                "info": fee,
            }
        return self.safe_currency_structure(
            {
                "id": asset,
                "code": self.safe_currency_code(asset),
                "name": asset,
                "type": "crypto",
                "active": True,
                "deposit": True,
                "withdraw": True,
                "fee": withdraw_fee,
                "precision": precision,
                "limits": limits,
                "networks": networks,
                "info": {"asset": asset, "scale": scale, "fees": fee},
            }
        )

    # ---- public: market data -------------------------------------------------

    def _fetch_ticker(self, symbol: str, params: Json | None = None) -> Plan:
        market = yield from self._loaded_market(symbol)
        reply = yield Call(
            "v1/markets/{market}/ticker", params={"market": market["id"], **(params or {})}
        )
        return self.parse_ticker(reply["ticker"], market)

    def _fetch_tickers(self, symbols: list[str] | None = None, params: Json | None = None) -> Plan:
        yield LOAD_MARKETS
        request: Json = dict(params or {})
        if symbols:
            request["markets"] = [self._market_of(s)["id"] for s in symbols]
        tickers = yield from self._pages(
            Call("v1/markets/-/tickers", params=request), "tickers", None
        )
        parsed = [self.parse_ticker(t) for t in tickers]
        return self.filter_by_array_tickers(parsed, "symbol", symbols)

    def parse_ticker(self, ticker: Json, market: Json | None = None) -> Any:
        s = self.safe_string
        market = self.safe_market(s(ticker, "market"), market)
        timestamp = self._ms(ticker.get("update_time"))
        last = self._nonempty(ticker.get("last_price"))
        return self.safe_ticker(
            {
                "symbol": market["symbol"],
                "timestamp": timestamp,
                "datetime": self.iso8601(timestamp),
                "high": self._nonempty(ticker.get("high_price")),
                "low": self._nonempty(ticker.get("low_price")),
                "bid": self._nonempty(ticker.get("best_bid_price")),
                "bidVolume": self._nonempty(ticker.get("best_bid_quantity")),
                "ask": self._nonempty(ticker.get("best_ask_price")),
                "askVolume": self._nonempty(ticker.get("best_ask_quantity")),
                "vwap": None,
                "open": self._nonempty(ticker.get("open_price")),
                "close": last,
                "last": last,
                "previousClose": None,
                "change": self._nonempty(ticker.get("price_change")),
                "percentage": self._nonempty(ticker.get("price_change_percent")),
                "average": None,
                "baseVolume": s(ticker, "volume"),
                "quoteVolume": s(ticker, "quote_volume"),
                "info": ticker,
            },
            market,
        )

    def _fetch_order_book(
        self, symbol: str, limit: int | None = None, params: Json | None = None
    ) -> Plan:
        market = yield from self._loaded_market(symbol)
        request: Json = {"market": market["id"], **(params or {})}
        if limit is not None:
            request["depth"] = limit
        reply = yield Call("v1/markets/{market}/book", params=request)
        book = reply["book"]
        timestamp = self._ms(book.get("update_time"))
        parsed = self.parse_order_book(
            book, market["symbol"], timestamp, "bids", "asks", "price", "quantity"
        )
        parsed["nonce"] = self.safe_integer(book, "seq")
        return parsed

    def _fetch_trades(
        self,
        symbol: str,
        since: int | None = None,
        limit: int | None = None,
        params: Json | None = None,
    ) -> Plan:
        market = yield from self._loaded_market(symbol)
        request = {"market": market["id"], **self._windowed(since, params)}
        trades = yield from self._pages(
            Call("v1/markets/{market}/trades", params=request), "trades", limit or 100
        )
        return self.parse_trades(trades, market, since, limit)

    def parse_trade(self, trade: Json, market: Json | None = None) -> Any:
        """A public trade (taker_side) or one of the account's fills (side, fee)."""
        s = self.safe_string
        market = self.safe_market(s(trade, "market"), market)
        timestamp = self._ms(trade.get("trade_time"))
        fill = "order_id" in trade
        fee = None
        if fill:
            fee = {
                "cost": s(trade, "fee"),
                "currency": self.safe_currency_code(s(trade, "fee_asset")),
            }
        liquidity = {"LIQUIDITY_MAKER": "maker", "LIQUIDITY_TAKER": "taker"}
        return self.safe_trade(
            {
                "info": trade,
                "id": s(trade, "trade_id"),
                "order": s(trade, "order_id"),
                "timestamp": timestamp,
                "datetime": self.iso8601(timestamp),
                "symbol": market["symbol"],
                "type": None,
                "side": _SIDES.get(s(trade, "side" if fill else "taker_side")),
                "takerOrMaker": liquidity.get(s(trade, "liquidity")) if fill else "taker",
                "price": s(trade, "price"),
                "amount": s(trade, "quantity"),
                "cost": s(trade, "quote_quantity"),
                "fee": fee,
            },
            market,
        )

    def _fetch_ohlcv(
        self,
        symbol: str,
        timeframe: str = "1m",
        since: int | None = None,
        limit: int | None = None,
        params: Json | None = None,
    ) -> Plan:
        market = yield from self._loaded_market(symbol)
        interval = self.timeframes.get(timeframe)
        if interval is None:
            raise BadRequest(
                f"{self.id} fetch_ohlcv: timeframe {timeframe!r} is not one of "
                f"{', '.join(self.timeframes)}"
            )
        request = {"market": market["id"], "interval": interval, **self._windowed(since, params)}
        candles = yield from self._pages(
            Call("v1/markets/{market}/candles", params=request), "candles", limit or 300
        )
        return self.parse_ohlcvs(candles, market, timeframe, since, limit)

    def parse_ohlcvs(
        self,
        ohlcvs: list[Json],
        market: Any = None,
        timeframe: str = "1m",
        since: int | None = None,
        limit: int | None = None,
        tail: bool = False,
    ) -> Any:
        # A candle without trades has no prices: CCXT's rows are all numbers, so
        # such a candle is left out (as most exchanges leave it out).
        traded = [c for c in ohlcvs if c.get("open")]
        return super().parse_ohlcvs(traded, market, timeframe, since, limit, tail)

    def parse_ohlcv(self, ohlcv: Json, market: Any = None) -> list[Any]:
        n = self.safe_number
        return [
            self._ms(ohlcv.get("open_time")),
            n(ohlcv, "open"),
            n(ohlcv, "high"),
            n(ohlcv, "low"),
            n(ohlcv, "close"),
            n(ohlcv, "volume"),
        ]

    # ---- private: balances and fees ------------------------------------------

    def _fetch_balance(self, params: Json | None = None) -> Plan:
        reply = yield Call("v1/balances", "private", params=params or {})
        result: Json = {"info": reply}
        latest = None
        for balance in reply.get("balances") or []:
            code = self.safe_currency_code(balance.get("asset"))
            account = self.account()
            account["free"] = self.safe_string(balance, "available")
            account["used"] = self.safe_string(balance, "held")
            account["total"] = self.safe_string(balance, "total")
            result[code] = account
            updated = self._ms(balance.get("update_time"))
            latest = updated if latest is None or (updated or 0) > latest else latest
        result["timestamp"] = latest
        result["datetime"] = self.iso8601(latest)
        return self.safe_balance(result)

    def _fetch_trading_fees(self, params: Json | None = None) -> Plan:
        yield LOAD_MARKETS
        reply = yield Call("v1/fees", "private", params=params or {})
        fees: Json = {}
        for entry in reply.get("markets") or []:
            market = self.safe_market(entry.get("market"))
            fees[market["symbol"]] = {
                "info": entry,
                "symbol": market["symbol"],
                "maker": self.safe_number(entry, "maker_fee_rate"),
                "taker": self.safe_number(entry, "taker_fee_rate"),
                "percentage": True,
                "tierBased": False,
            }
        return fees

    # ---- private: orders -----------------------------------------------------

    def _order_request(
        self,
        market: Json,
        type: str,
        side: str,
        amount: float | None,
        price: float | None,
        params: Json,
    ) -> Json:
        """PlaceOrderRequest in JSON from CCXT's arguments; unknown params pass
        through (the edge refuses a field it does not know, naming it)."""
        symbol = market["symbol"]
        if type not in ("limit", "market"):
            raise InvalidOrder(
                f"{self.id} create_order: type must be 'limit' or 'market', "
                f"not {type!r} (a stop: set params['triggerPrice'])"
            )
        if side not in ("buy", "sell"):
            raise InvalidOrder(
                f"{self.id} create_order: side must be 'buy' or 'sell', not {side!r}"
            )
        s = self.safe_string
        trigger = self.safe_string_2(params, "triggerPrice", "stopPrice")
        tif = s(params, "timeInForce")
        post_only = bool(self.safe_bool(params, "postOnly", False)) or tif == "PO"
        kind = ("ORDER_TYPE_STOP_" if trigger else "ORDER_TYPE_") + type.upper()
        prefix = self.options.get("clientOrderIdPrefix", "ccxt")
        request: Json = {
            "client_order_id": s(params, "clientOrderId") or new_id(prefix),
            "market": market["id"],
            "side": "SIDE_" + side.upper(),
            "type": kind,
        }
        if type == "limit":
            if price is None:
                raise ArgumentsRequired(f"{self.id} create_order: a limit order needs a price")
            request["price"] = self.price_to_precision(symbol, price)
        cost = s(params, "cost")
        if cost is not None:
            request["quote_quantity"] = self.cost_to_precision(symbol, cost)
        elif amount is None:
            raise ArgumentsRequired(
                f"{self.id} create_order: amount (or params['cost'] for a market buy) is required"
            )
        else:
            request["quantity"] = self.amount_to_precision(symbol, amount)
        if trigger:
            request["stop_price"] = self.price_to_precision(symbol, trigger)
        if tif and tif != "PO":
            request["time_in_force"] = "TIME_IN_FORCE_" + tif.upper()
        if post_only:
            request["post_only"] = True
        known = ["clientOrderId", "triggerPrice", "stopPrice", "timeInForce", "postOnly", "cost"]
        request.update(self.omit(params, known))
        return request

    def _create_order(
        self,
        symbol: str,
        type: str,
        side: str,
        amount: float | None,
        price: float | None = None,
        params: Json | None = None,
    ) -> Plan:
        market = yield from self._loaded_market(symbol)
        request = self._order_request(market, type, side, amount, price, params or {})
        reply = yield Call("v1/orders", "private", "POST", request)
        return self.parse_order(reply["order"], market)

    def _create_market_buy_order_with_cost(
        self, symbol: str, cost: float, params: Json | None = None
    ) -> Plan:
        return (
            yield from self._create_order(
                symbol, "market", "buy", None, None, {**(params or {}), "cost": cost}
            )
        )

    def _by_id(self, id: str | None, params: Json, verb: str) -> tuple[str, Json]:
        """The path of an order's `verb` (order_id in the path, or by client id)."""
        client_id = self.safe_string_2(params, "clientOrderId", "client_order_id")
        rest = self.omit(params, ["clientOrderId", "client_order_id"])
        if client_id is not None:
            return f"v1/orders:{verb}", {**rest, "client_order_id": client_id}
        if not id:
            raise ArgumentsRequired(f"{self.id} {verb}: an order id or params['clientOrderId']")
        return "v1/orders/{order_id}" + (f":{verb}" if verb != "lookup" else ""), {
            **rest,
            "order_id": id,
        }

    def _cancel_order(self, id: str, symbol: str | None = None, params: Json | None = None) -> Plan:
        yield LOAD_MARKETS
        request_id, params = self._request_id(params or {})
        path, request = self._by_id(id, params, "cancel")
        reply = yield Call(path, "private", "POST", {**request, "request_id": request_id})
        return self.parse_order(reply["order"])

    def _cancel_all_orders(self, symbol: str | None = None, params: Json | None = None) -> Plan:
        yield LOAD_MARKETS
        request_id, params = self._request_id(params or {})
        request: Json = {**params, "request_id": request_id}
        if symbol is not None:
            request["market"] = self._market_of(symbol)["id"]
        reply = yield Call("v1/orders:cancelAll", "private", "POST", request)
        return self.parse_orders(reply.get("orders") or [])

    def _edit_order(
        self,
        id: str,
        symbol: str,
        type: str | None = None,
        side: str | None = None,
        amount: float | None = None,
        price: float | None = None,
        params: Json | None = None,
    ) -> Plan:
        """An amend (AmendOrder): a new price and/or a new total amount, keeping the
        order's id (and, for a smaller amount at the same price, its queue place).
        Type and side cannot change; they are checked only if given."""
        market = yield from self._loaded_market(symbol)
        if price is None and amount is None:
            raise ArgumentsRequired(f"{self.id} edit_order: a new price or amount is required")
        request_id, params = self._request_id(params or {})
        path, request = self._by_id(id, params, "amend")
        request["request_id"] = request_id
        if price is not None:
            request["price"] = self.price_to_precision(market["symbol"], price)
        if amount is not None:
            request["quantity"] = self.amount_to_precision(market["symbol"], amount)
        reply = yield Call(path, "private", "POST", request)
        order = self.parse_order(reply["order"], market)
        for name, want in (("type", type), ("side", side)):
            if want is not None and order[name] != want:
                raise InvalidOrder(
                    f"{self.id} edit_order: an amend keeps the order's {name} "
                    f"({order[name]}), it cannot make it {want}"
                )
        return order

    def _fetch_order(self, id: str, symbol: str | None = None, params: Json | None = None) -> Plan:
        yield LOAD_MARKETS
        path, request = self._by_id(id, params or {}, "lookup")
        reply = yield Call(path, "private", "GET", request)
        return self.parse_order(reply["order"])

    _fetch_orders = _account_list(
        "orders", "parse_orders", status="ORDER_STATUS_FILTER_UNSPECIFIED"
    )
    _fetch_open_orders = _account_list("orders", "parse_orders", status="ORDER_STATUS_FILTER_OPEN")
    _fetch_closed_orders = _account_list(
        "orders", "parse_orders", status="ORDER_STATUS_FILTER_CLOSED"
    )

    def parse_order(self, order: Json, market: Json | None = None) -> Any:
        s = self.safe_string
        market = self.safe_market(s(order, "market"), market)
        created = self._ms(order.get("create_time"))
        post_only = bool(order.get("post_only"))
        fee_asset = self._nonempty(order.get("fee_asset"))
        return self.safe_order(
            {
                "info": order,
                "id": s(order, "order_id"),
                "clientOrderId": self._nonempty(order.get("client_order_id")),
                "timestamp": created,
                "datetime": self.iso8601(created),
                "lastTradeTimestamp": None,
                "lastUpdateTimestamp": self._ms(order.get("update_time")),
                "symbol": market["symbol"],
                "type": _TYPES.get(s(order, "type")),
                "timeInForce": "PO" if post_only else _TIME_IN_FORCE.get(s(order, "time_in_force")),
                "postOnly": post_only,
                "reduceOnly": False,
                "side": _SIDES.get(s(order, "side")),
                "price": self._nonempty(order.get("price")),
                "triggerPrice": self._nonempty(order.get("stop_price")),
                "amount": self._nonempty(order.get("quantity")),
                "cost": s(order, "filled_quote_quantity"),
                "average": self._nonempty(order.get("average_price")),
                "filled": s(order, "filled_quantity"),
                "remaining": s(order, "remaining_quantity"),
                "status": _ORDER_STATUS.get(s(order, "state")),
                "fee": {
                    "cost": self.safe_number(order, "cumulative_fee"),
                    "currency": self.safe_currency_code(fee_asset),
                }
                if fee_asset
                else None,
                "trades": None,
            },
            market,
        )

    _fetch_my_trades = _account_list("fills", "parse_trades")

    def _fetch_order_trades(
        self,
        id: str,
        symbol: str | None = None,
        since: int | None = None,
        limit: int | None = None,
        params: Json | None = None,
    ) -> Plan:
        return (
            yield from self._fetch_my_trades(
                symbol, since, limit, {**(params or {}), "order_id": id}
            )
        )

    # ---- private: funding ----------------------------------------------------

    def _fetch_deposit_address(self, code: str, params: Json | None = None) -> Plan:
        currency = self.currency(code)
        request = {"asset": currency["id"], **(params or {})}
        reply = yield Call("v1/depositAddresses/{asset}", "private", params=request)
        address = reply["deposit_address"]
        return {
            "info": address,
            "currency": self.safe_currency_code(address.get("asset")),
            "network": self._nonempty(address.get("network")),
            "address": address.get("address"),
            "tag": self._nonempty(address.get("memo")),
        }

    def _withdraw(
        self,
        code: str,
        amount: float,
        address: str,
        tag: str | None = None,
        params: Json | None = None,
    ) -> Plan:
        tag, params = self.handle_withdraw_tag_and_params(tag, params or {})
        self.check_address(address)
        currency = self.currency(code)
        request_id, params = self._request_id(params)
        request: Json = {
            "request_id": request_id,
            "asset": currency["id"],
            "amount": self.number_to_string(amount),
            "address": address,
        }
        if tag:
            request["memo"] = tag
        request.update(params)
        reply = yield Call("v1/withdrawals", "private", "POST", request)
        return self.parse_transaction(reply["withdrawal"], currency)

    _fetch_deposits = _transfer_list("deposits")
    _fetch_withdrawals = _transfer_list("withdrawals")

    def _fetch_withdrawal(
        self, id: str, code: str | None = None, params: Json | None = None
    ) -> Plan:
        yield LOAD_MARKETS
        reply = yield Call(
            "v1/withdrawals/{withdrawal_id}",
            "private",
            params={**(params or {}), "withdrawal_id": id},
        )
        return self.parse_transaction(reply["withdrawal"])

    def parse_transaction(self, item: Json, currency: Json | None = None) -> Any:
        s = self.safe_string
        deposit = "deposit_id" in item
        code = self.safe_currency_code(s(item, "asset"), currency)
        timestamp = self._ms(item.get("detect_time" if deposit else "create_time"))
        statuses = _DEPOSIT_STATUS if deposit else _WITHDRAWAL_STATUS
        fee = None if deposit else {"currency": code, "cost": self.safe_number(item, "fee")}
        address = self._nonempty(item.get("address"))
        tag = self._nonempty(item.get("memo"))
        return {
            "info": item,
            "id": s(item, "deposit_id" if deposit else "withdrawal_id"),
            "txid": self._nonempty(item.get("txid")),
            "type": "deposit" if deposit else "withdrawal",
            "currency": code,
            "network": self._nonempty(item.get("network")),
            "amount": self.safe_number(item, "amount"),
            "status": statuses.get(s(item, "state")),
            "timestamp": timestamp,
            "datetime": self.iso8601(timestamp),
            "address": address,
            "addressFrom": None,
            "addressTo": address,
            "tag": tag,
            "tagFrom": None,
            "tagTo": tag,
            "updated": self._ms(item.get("update_time")),
            "comment": None,
            "internal": False,
            "fee": fee,
        }


def install(cls: type, driven: Callable[[Callable[..., Plan]], Callable[..., Any]]) -> None:
    """Give `cls` `request` and every unified method as its own: `name` is the plan
    `_name` (its signature and docstring) driven as `driven(plan)` drives it."""
    for name in (*UNIFIED, "request"):
        plan = getattr(CexcoreBase, "_" + name)
        method = functools.wraps(plan)(driven(plan))
        method.__name__ = method.__qualname__ = name
        setattr(cls, name, method)
