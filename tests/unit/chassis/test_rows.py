"""A dataclass from a row (chassis/rows.py): the row types of auth, risk and funding."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.chassis import from_row


@dataclass(frozen=True, slots=True)
class _Thing:
    thing_id: str
    tags: tuple[str, ...]
    note: str = ""
    seen: int = field(default=0, init=False)


def test_each_field_is_its_columns_value_but_those_given() -> None:
    row = {"thing_id": "t1", "tags": ["a", "b"], "note": "n", "extra": 1}
    assert from_row(_Thing, row, tags=tuple(row["tags"])) == _Thing("t1", ("a", "b"), "n")


def test_a_missing_column_is_an_error_not_a_default() -> None:
    with pytest.raises(KeyError):
        from_row(_Thing, {"thing_id": "t1", "tags": ()})
