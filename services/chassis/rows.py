"""A dataclass read from a database row: each field from the column of its name.

The columns a row type decodes, renames or takes from elsewhere are `given`;
the others are read as asyncpg returns them. A column the row lacks is a
KeyError: read every field's column (SELECT *, RETURNING *) or give it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar

__all__ = ["from_row"]

_T = TypeVar("_T")


class Row(Protocol):
    """What a row is read by: its columns by name (asyncpg.Record, a dict)."""

    def __getitem__(self, name: str, /) -> Any: ...


def from_row(cls: type[_T], row: Row, **given: Any) -> _T:
    """`cls` (a dataclass) from `row`'s columns of its fields' names, but those `given`."""
    names = (f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    return cls(**{name: row[name] for name in names if name not in given}, **given)
