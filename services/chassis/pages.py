"""List pages, one way for every service: the page size rule and opaque page tokens.

A token names the query it continues (`kind`: "api_keys", "trades", ...) and
where the next page starts (its `parts`, as strings). It is base64url JSON:
opaque to clients (AIP-158), cheap to check here. A token of another query,
or not one of ours, is INVALID_ARGUMENT with a field violation on
`page_token`, under the caller's reason (`AUTH_INVALID_PAGE_TOKEN`, ...).

Most lists page by (time, id), newest or oldest first (`time_keyed_page`,
`time_key_after`): a page is fetched one row longer than asked; that extra row
says another page exists, and the token names the last row shown by its time
(ISO 8601) and id, so the next query starts right after it whatever was
inserted meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from .errors import InvalidArgument, invalid_field

_P = TypeVar("_P")

__all__ = [
    "bad_page_token",
    "page_size",
    "page_token",
    "parse_page_token",
    "read_page_token",
    "time_key_after",
    "time_keyed_page",
]


def page_size(value: int, *, default: int, maximum: int, reason: str) -> int:
    """The size of a page: `default` for 0, at most `maximum`; negative is refused."""
    if value < 0:
        raise invalid_field(
            reason,
            "page_size",
            "must not be negative",
            reason,
            message="page_size must not be negative",
        )
    return min(value or default, maximum)


def page_token(kind: str, *parts: str) -> str:
    """The next_page_token that continues query `kind` after `parts`."""
    doc = json.dumps([kind, *parts], separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode()


def bad_page_token(reason: str) -> InvalidArgument:
    return invalid_field(
        reason,
        "page_token",
        "use a next_page_token as given",
        reason,
        message="page_token is not a next_page_token of this query",
    )


def read_page_token(token: str, kind: str, *, parts: int, reason: str) -> tuple[str, ...] | None:
    """The `parts` a token of query `kind` carries; None for no token (the first page)."""
    if not token:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad_page_token(reason) from None
    if (
        not isinstance(doc, list)
        or len(doc) != parts + 1
        or doc[0] != kind
        or not all(isinstance(p, str) for p in doc)
    ):
        raise bad_page_token(reason)
    return tuple(doc[1:])


def parse_page_token(
    token: str, kind: str, parse: Callable[..., _P], *, parts: int, reason: str
) -> _P | None:
    """Where a token of query `kind` says the next page starts, `parse` of its
    `parts` (`int`, a time and an id, ...); None for no token (the first page).
    A part `parse` refuses with ValueError makes the token a bad one."""
    found = read_page_token(token, kind, parts=parts, reason=reason)
    if found is None:
        return None
    try:
        return parse(*found)
    except ValueError:
        raise bad_page_token(reason) from None


_Row = TypeVar("_Row")


def time_key_after(token: str, kind: str, *, reason: str) -> tuple[datetime, str] | None:
    """Where list `kind` goes on: (time, id) of the last row shown; None for the first page."""
    return parse_page_token(token, kind, _time_key, parts=2, reason=reason)


def _time_key(moment: str, key: str) -> tuple[datetime, str]:
    return datetime.fromisoformat(moment), key


def time_keyed_page(
    rows: Sequence[_Row], size: int, kind: str, position: Callable[[_Row], tuple[datetime, str]]
) -> tuple[Sequence[_Row], str]:
    """A page of at most `size` of `rows` (fetched one more than that) and the token
    that continues it ("" on the last page); `position` is a row's (time, id)."""
    if len(rows) <= size:
        return rows, ""
    moment, key = position(rows[size - 1])
    return rows[:size], page_token(kind, moment.isoformat(), key)
