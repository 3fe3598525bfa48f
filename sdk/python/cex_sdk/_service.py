"""What the typed accessors of the services (`client.auth`, `client.orders`, ...)
share: a call of one of the service's methods by its short name, and the pages
of a list one after another."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from .client import Client

R = TypeVar("R", bound=Message)


class ServiceApi:
    """The accessor of one service; `_SERVICE` is its methods' prefix
    (`/cex.order.v1.OrderService/`)."""

    _SERVICE = ""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def _call(
        self, method: str, request: Message, response_type: type[R], timeout_s: float | None
    ) -> R:
        """The service's `method` (`PlaceOrder`) as `Client.call` makes it: a deadline,
        safe retries, typed errors."""
        return await self._client.call(
            self._SERVICE + method, request, response_type, timeout_s=timeout_s
        )


class _Page(Protocol):
    next_page_token: str


P = TypeVar("P", bound=_Page)


async def pages(fetch: Callable[[str], Awaitable[P]]) -> AsyncIterator[P]:
    """Every page of a list: `fetch("")`, then `fetch(token)` with each page's
    next_page_token until a page has none."""
    token = ""
    while True:
        page = await fetch(token)
        yield page
        token = page.next_page_token
        if not token:
            return
