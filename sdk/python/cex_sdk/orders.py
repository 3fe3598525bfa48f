"""cex.order.v1.OrderService as typed calls, every mutating one idempotent.

Each mutating call carries its idempotency key: `client_order_id` for a place
(one per batch item), `request_id` for everything else. Give your own to tie
a retry after a crash of your process to the first attempt; when you give
none, a fresh one is generated. Either way the key is fixed before the first
attempt, so the client's retries (UNAVAILABLE, RESOURCE_EXHAUSTED) resend the
same key and the exchange answers a repeat with the first result: a retried
place never makes a second order.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Generic

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2

from ._service import R, ServiceApi, pages

__all__ = [
    "TERMINAL_STATES",
    "WORKING_STATES",
    "Amount",
    "OrdersApi",
    "decimal_text",
    "keyed",
    "new_id",
    "place_request",
]

#: A decimal amount: `Decimal`, an int, or a decimal string. Never a float.
Amount = Decimal | str | int

#: States in which an order can still trade or be cancelled.
WORKING_STATES = frozenset(
    {
        types_pb2.ORDER_STATE_PENDING_NEW,
        types_pb2.ORDER_STATE_UNTRIGGERED,
        types_pb2.ORDER_STATE_OPEN,
        types_pb2.ORDER_STATE_PARTIALLY_FILLED,
    }
)
#: States an order never leaves.
TERMINAL_STATES = frozenset(
    {
        types_pb2.ORDER_STATE_FILLED,
        types_pb2.ORDER_STATE_CANCELLED,
        types_pb2.ORDER_STATE_REJECTED,
        types_pb2.ORDER_STATE_EXPIRED,
    }
)


def new_id(prefix: str = "sdk") -> str:
    """A fresh idempotency key (`<prefix>-<32 hex>`, within the 64-char limit)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def keyed(request: order_pb2.PlaceOrderRequest) -> order_pb2.PlaceOrderRequest:
    """The request with its idempotency key: a client_order_id is generated once if
    empty, so every retry of it resends the same one."""
    if not request.client_order_id:
        request.client_order_id = new_id("co")
    return request


def decimal_text(value: Amount | None) -> str:
    """The wire form of an amount ("" for None); floats are refused."""
    if value is None:
        return ""
    if isinstance(value, float):
        raise TypeError("amounts are Decimal, int or str, never float")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def place_request(
    market: str,
    side: types_pb2.Side.ValueType,
    quantity: Amount | None = None,
    *,
    price: Amount | None = None,
    type: types_pb2.OrderType.ValueType = types_pb2.ORDER_TYPE_LIMIT,
    time_in_force: types_pb2.TimeInForce.ValueType = types_pb2.TIME_IN_FORCE_UNSPECIFIED,
    post_only: bool = False,
    stop_price: Amount | None = None,
    quote_quantity: Amount | None = None,
    self_trade_prevention: types_pb2.SelfTradePrevention.ValueType = (
        types_pb2.SELF_TRADE_PREVENTION_UNSPECIFIED
    ),
    expire_time: datetime | None = None,
    client_order_id: str | None = None,
) -> order_pb2.PlaceOrderRequest:
    """A PlaceOrderRequest with its client_order_id (generated when not given)."""
    return order_pb2.PlaceOrderRequest(
        client_order_id=client_order_id or new_id("co"),
        market=market,
        side=side,
        type=type,
        time_in_force=time_in_force,
        self_trade_prevention=self_trade_prevention,
        price=decimal_text(price),
        stop_price=decimal_text(stop_price),
        quantity=decimal_text(quantity),
        quote_quantity=decimal_text(quote_quantity),
        post_only=post_only,
        expire_time=_timestamp(expire_time),
    )


@dataclass(frozen=True, slots=True)
class _Command(Generic[R]):
    """An order command: its unary method, and its field in StreamOrdersRequest
    and in StreamAck, which answers with the unary method's response."""

    method: str
    field: str
    response: type[R]


_PLACE = _Command("PlaceOrder", "place", order_pb2.PlaceOrderResponse)
_AMEND = _Command("AmendOrder", "amend", order_pb2.AmendOrderResponse)
_CANCEL = _Command("CancelOrder", "cancel", order_pb2.CancelOrderResponse)
_CANCEL_ALL = _Command("CancelAllOrders", "cancel_all", order_pb2.CancelAllOrdersResponse)
_CANCEL_ALL_AFTER = _Command("CancelAllAfter", "cancel_all_after", order_pb2.CancelAllAfterResponse)


class _OrderCommands:
    """The order commands of `OrdersApi` (unary calls) and `MarketMakerSession`
    (its stream), each written once: the request with its idempotency key (fixed
    before the first attempt, so a resend is the same command) and what the
    answer returns. `_send` is the transport."""

    async def _send(
        self, command: _Command[R], request: Message, key: str, timeout_s: float | None
    ) -> R:
        """Send `command` and return its response; `key` is its idempotency key (the
        stream matches the answer to the command by it)."""
        raise NotImplementedError

    async def _place(
        self, request: order_pb2.PlaceOrderRequest, timeout_s: float | None
    ) -> order_pb2.Order:
        request = keyed(request)
        return (await self._send(_PLACE, request, request.client_order_id, timeout_s)).order

    async def _amend(
        self,
        order_id: str,
        client_order_id: str,
        price: Amount | None,
        quantity: Amount | None,
        request_id: str | None,
        account_id: str,
        timeout_s: float | None,
    ) -> order_pb2.Order:
        request = order_pb2.AmendOrderRequest(
            request_id=request_id or new_id("am"),
            account_id=account_id,
            order_id=order_id,
            client_order_id=client_order_id,
            price=decimal_text(price),
            quantity=decimal_text(quantity),
        )
        return (await self._send(_AMEND, request, request.request_id, timeout_s)).order

    async def _cancel(
        self,
        order_id: str,
        client_order_id: str,
        request_id: str | None,
        account_id: str,
        timeout_s: float | None,
    ) -> order_pb2.Order:
        request = order_pb2.CancelOrderRequest(
            request_id=request_id or new_id("cx"),
            account_id=account_id,
            order_id=order_id,
            client_order_id=client_order_id,
        )
        return (await self._send(_CANCEL, request, request.request_id, timeout_s)).order

    async def _cancel_all(
        self,
        market: str,
        side: types_pb2.Side.ValueType,
        request_id: str | None,
        account_id: str,
        timeout_s: float | None,
    ) -> list[order_pb2.Order]:
        request = order_pb2.CancelAllOrdersRequest(
            request_id=request_id or new_id("ca"), account_id=account_id, market=market, side=side
        )
        reply = await self._send(_CANCEL_ALL, request, request.request_id, timeout_s)
        return list(reply.orders)

    async def _cancel_all_after(
        self,
        timeout_seconds: int,
        market: str,
        request_id: str | None,
        account_id: str,
        timeout_s: float | None,
    ) -> datetime | None:
        request = order_pb2.CancelAllAfterRequest(
            request_id=request_id or new_id("dm"),
            account_id=account_id,
            timeout_seconds=timeout_seconds,
            market=market,
        )
        reply = await self._send(_CANCEL_ALL_AFTER, request, request.request_id, timeout_s)
        return reply.trigger_time.ToDatetime() if reply.HasField("trigger_time") else None


class OrdersApi(ServiceApi, _OrderCommands):
    """cex.order.v1.OrderService: place, batch, amend, cancel, query.

    `client.orders.place("BTC-USDT", SIDE_BUY, "0.1", price="100")` returns the
    order; a refusal raises a `CexError` (e.g. `FailedPreconditionError` with
    reason LEDGER_INSUFFICIENT_FUNDS). Orders of the key's own account unless
    `account_id` is given (services acting for an account).
    """

    _SERVICE = "/cex.order.v1.OrderService/"

    async def _send(
        self, command: _Command[R], request: Message, key: str, timeout_s: float | None
    ) -> R:
        return await self._call(command.method, request, command.response, timeout_s)

    async def place(
        self,
        market: str,
        side: types_pb2.Side.ValueType,
        quantity: Amount | None = None,
        *,
        price: Amount | None = None,
        type: types_pb2.OrderType.ValueType = types_pb2.ORDER_TYPE_LIMIT,
        time_in_force: types_pb2.TimeInForce.ValueType = types_pb2.TIME_IN_FORCE_UNSPECIFIED,
        post_only: bool = False,
        stop_price: Amount | None = None,
        quote_quantity: Amount | None = None,
        self_trade_prevention: types_pb2.SelfTradePrevention.ValueType = (
            types_pb2.SELF_TRADE_PREVENTION_UNSPECIFIED
        ),
        expire_time: datetime | None = None,
        client_order_id: str | None = None,
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        """Place one order; a LIMIT needs `price`. Returns it as of the answer."""
        request = place_request(
            market,
            side,
            quantity,
            price=price,
            type=type,
            time_in_force=time_in_force,
            post_only=post_only,
            stop_price=stop_price,
            quote_quantity=quote_quantity,
            self_trade_prevention=self_trade_prevention,
            expire_time=expire_time,
            client_order_id=client_order_id,
        )
        return await self.place_request(request, timeout_s=timeout_s)

    async def place_request(
        self, request: order_pb2.PlaceOrderRequest, *, timeout_s: float | None = None
    ) -> order_pb2.Order:
        """Place a prepared request (see `place_request()`); its key is filled in if empty."""
        return await self._place(request, timeout_s)

    async def batch_place(
        self, requests: Sequence[order_pb2.PlaceOrderRequest], *, timeout_s: float | None = None
    ) -> list[order_pb2.PlaceOrderResult]:
        """Place up to 20 orders; each result has its own `status` (code 0 = placed).

        Items without a client_order_id get one, so the batch is retryable.
        Decode a failed item with `cex_sdk.errors.from_status(result.status)`.
        """
        batch = order_pb2.BatchPlaceOrdersRequest(requests=list(requests))
        for item in batch.requests:
            keyed(item)
        reply = await self._call(
            "BatchPlaceOrders", batch, order_pb2.BatchPlaceOrdersResponse, timeout_s
        )
        return list(reply.results)

    async def amend(
        self,
        order_id: str = "",
        *,
        client_order_id: str = "",
        price: Amount | None = None,
        quantity: Amount | None = None,
        request_id: str | None = None,
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        """Change a resting order's price and/or total quantity (by either id).

        Lowering only the quantity keeps the order's place in the queue.
        """
        return await self._amend(
            order_id, client_order_id, price, quantity, request_id, account_id, timeout_s
        )

    async def cancel(
        self,
        order_id: str = "",
        *,
        client_order_id: str = "",
        request_id: str | None = None,
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        """Cancel one order (by either id); returns it as of the cancel."""
        return await self._cancel(order_id, client_order_id, request_id, account_id, timeout_s)

    async def cancel_all(
        self,
        market: str = "",
        *,
        side: types_pb2.Side.ValueType = types_pb2.SIDE_UNSPECIFIED,
        request_id: str | None = None,
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> list[order_pb2.Order]:
        """Cancel every working order (optionally one market / side); returns them."""
        return await self._cancel_all(market, side, request_id, account_id, timeout_s)

    async def cancel_all_after(
        self,
        timeout_seconds: int,
        *,
        market: str = "",
        request_id: str | None = None,
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> datetime | None:
        """Dead man's switch: cancel everything unless called again within
        `timeout_seconds` (1 to 600; 0 disarms). Returns when it would fire.

        Each renewal must carry a new request_id (the default): a repeated id
        returns the first answer without resetting the timer.
        """
        return await self._cancel_all_after(
            timeout_seconds, market, request_id, account_id, timeout_s
        )

    async def get(
        self,
        order_id: str = "",
        *,
        client_order_id: str = "",
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> order_pb2.Order:
        """One order by either id (NotFoundError if there is none)."""
        request = order_pb2.GetOrderRequest(
            account_id=account_id, order_id=order_id, client_order_id=client_order_id
        )
        reply = await self._call("GetOrder", request, order_pb2.GetOrderResponse, timeout_s)
        return reply.order

    async def list_orders(
        self,
        *,
        status: order_pb2.OrderStatusFilter.ValueType = order_pb2.ORDER_STATUS_FILTER_UNSPECIFIED,
        market: str = "",
        side: types_pb2.Side.ValueType = types_pb2.SIDE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> order_pb2.ListOrdersResponse:
        """One page of orders, newest first (`next_page_token` for the next)."""
        request = order_pb2.ListOrdersRequest(
            account_id=account_id,
            status=status,
            market=market,
            side=side,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call("ListOrders", request, order_pb2.ListOrdersResponse, timeout_s)

    async def iter_orders(
        self,
        *,
        status: order_pb2.OrderStatusFilter.ValueType = order_pb2.ORDER_STATUS_FILTER_UNSPECIFIED,
        market: str = "",
        side: types_pb2.Side.ValueType = types_pb2.SIDE_UNSPECIFIED,
        page_size: int = 500,
        account_id: str = "",
    ) -> AsyncIterator[order_pb2.Order]:
        """Every matching order, newest first, page after page."""

        def page(token: str) -> Awaitable[order_pb2.ListOrdersResponse]:
            return self.list_orders(
                status=status,
                market=market,
                side=side,
                page_size=page_size,
                page_token=token,
                account_id=account_id,
            )

        async for reply in pages(page):
            for order in reply.orders:
                yield order

    async def list_fills(
        self,
        *,
        market: str = "",
        order_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        account_id: str = "",
        timeout_s: float | None = None,
    ) -> order_pb2.ListFillsResponse:
        """One page of the account's fills, newest first."""
        request = order_pb2.ListFillsRequest(
            account_id=account_id,
            market=market,
            order_id=order_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call("ListFills", request, order_pb2.ListFillsResponse, timeout_s)
