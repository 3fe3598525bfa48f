"""Lists paged by (time, id): the keyset most of our lists use, newest or oldest first.

A page is fetched one row longer than asked; that extra row says another page
exists, and the token names the last row shown by its time (ISO 8601) and id,
so the next query starts right after it whatever was inserted meanwhile.
Tokens are the chassis' opaque page tokens (pages.py); one that is not ours,
or carries no time, is INVALID_ARGUMENT under the caller's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from .pages import bad_page_token, page_token, read_page_token

__all__ = ["time_key_after", "time_keyed_page"]

_Row = TypeVar("_Row")


def time_key_after(token: str, kind: str, *, reason: str) -> tuple[datetime, str] | None:
    """Where list `kind` goes on: (time, id) of the last row shown; None for the first page."""
    found = read_page_token(token, kind, parts=2, reason=reason)
    if found is None:
        return None
    moment, key = found
    try:
        return datetime.fromisoformat(moment), key
    except ValueError:
        raise bad_page_token(reason) from None


def time_keyed_page(
    rows: Sequence[_Row], size: int, kind: str, position: Callable[[_Row], tuple[datetime, str]]
) -> tuple[Sequence[_Row], str]:
    """A page of at most `size` of `rows` (fetched one more than that) and the token
    that continues it ("" on the last page); `position` is a row's (time, id)."""
    if len(rows) <= size:
        return rows, ""
    moment, key = position(rows[size - 1])
    return rows[:size], page_token(kind, moment.isoformat(), key)
