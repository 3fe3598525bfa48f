"""Fixtures for the matching engine tests: every contract test runs against both
books (the slow reference and the fast one), as exchange-core's OrderBookBaseTest does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.match import OrderBook
from tests.unit.match.match_support import BOOKS, SPEC, Driver


@pytest.fixture(params=BOOKS, ids=lambda cls: cls.name)
def book_cls(request: pytest.FixtureRequest) -> type[OrderBook]:
    cls: type[OrderBook] = request.param
    return cls


@pytest.fixture
def book(book_cls: type[OrderBook]) -> OrderBook:
    return book_cls(SPEC)  # type: ignore[call-arg]


@pytest.fixture
def d(book: OrderBook) -> Iterator[Driver]:
    yield Driver(book)
