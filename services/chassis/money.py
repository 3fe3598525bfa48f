"""Money at the edge: decimal strings on the wire, integers inside.

Every amount, price and quantity crosses the wire as a decimal string (as the
major exchanges do) and lives inside as an integer count of some unit: an
asset's minor unit, a market's tick or lot. `to_units` is the one parser: it
refuses anything that is not a plain decimal, and anything that is not an
exact multiple of the unit, so nothing is ever rounded silently. `from_units`
is its inverse and writes the canonical form (no exponent, no trailing zeros).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["MoneyError", "decimal_text", "from_units", "parse_decimal", "to_units"]

# Plain decimals only: no exponent, no sign other than '-', no spaces, no "NaN".
_DECIMAL = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$")
_MAX_DIGITS = 38


class MoneyError(ValueError):
    """A decimal string that is malformed or off its grid; `reason` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_decimal(text: str) -> Decimal:
    """A plain decimal string ("12.5", "-0.001") as an exact Decimal."""
    if not _DECIMAL.match(text) or len(text) > _MAX_DIGITS + 2:
        raise MoneyError("MALFORMED", f"{text!r} is not a plain decimal number")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern already refuses these
        raise MoneyError("MALFORMED", f"{text!r} is not a plain decimal number") from None


def decimal_text(value: Decimal | None) -> str:
    """A decimal as the wire's plain string (no exponent, no trailing zeros; "" for
    none): what `parse_decimal` reads back."""
    if value is None:
        return ""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def to_units(text: str, unit: Decimal) -> int:
    """`text` as a whole number of `unit`s; MoneyError("OFF_GRID") if not exact."""
    units, rest = divmod(parse_decimal(text), unit)
    if rest:
        raise MoneyError("OFF_GRID", f"{text} is not a multiple of {unit}")
    return int(units)


def from_units(units: int, unit: Decimal) -> str:
    """The canonical decimal string for `units` of `unit` ("1.5", "0", "-2")."""
    value = (Decimal(units) * unit).normalize()
    text = format(value, "f")
    return "0" if text in ("-0", "0") else text
