"""A WHERE clause of optional filters, one way for every store.

List queries take filters a client may leave unset (a market, a side, a time
range, where the last page ended). Each set one is a condition with a numbered
asyncpg argument; an unset one (None) is no condition at all. Values only ever
travel as arguments: column names and operators are the store's own text.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Where"]


class Where:
    """Conditions joined by AND, and the arguments they number ($1, $2, ...)."""

    def __init__(self, condition: str = "", *args: Any) -> None:
        """Start with `condition` (numbering `args` from $1), or with none."""
        self.args: list[Any] = list(args)
        self._conditions = [condition] if condition else []

    def arg(self, value: Any) -> str:
        """The placeholder of one more argument, for a condition of the store's own."""
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, condition: str) -> None:
        self._conditions.append(condition)

    def compare(self, column: str, op: str, value: Any) -> None:
        """`column op value`, unless value is None (the filter is unset)."""
        if value is not None:
            self.add(f"{column} {op} {self.arg(value)}")

    def after(self, columns: str, position: tuple[Any, ...] | None) -> None:
        """The rows after `position` in a list sorted by `columns` descending (keyset paging)."""
        if position is not None:
            marks = ", ".join(self.arg(value) for value in position)
            self.add(f"({columns}) < ({marks})")

    @property
    def sql(self) -> str:
        """` WHERE ...` with every condition, or nothing when there is none."""
        return f" WHERE {' AND '.join(self._conditions)}" if self._conditions else ""
