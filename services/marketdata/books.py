"""L2 books built from match's level changes, and depth-limited views of them.

Pure: no I/O, no clock. Prices are kept as integer ticks (for ordering) next
to the exact decimal strings match sent (for the wire and the checksum);
quantities stay the strings match sent, since a level's quantity is only ever
replaced, never computed here.

A `DepthView` is what a subscriber at one depth holds: the top `depth` levels
per side. `DepthView.advance` turns a batch of level changes into the delta
that brings such a holder from the previous view to the next one, including
levels that enter the top from below (with their full quantity) and levels
pushed out of it (quantity "0"), so a client applying deltas holds exactly the
top `depth` levels without knowing anything beyond them.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ASK",
    "BID",
    "CHECKSUM_LEVELS",
    "BookDelta",
    "DepthView",
    "L2Book",
    "Level",
    "checksum",
    "diff",
]

BID = 1  # cex.type.v1.SIDE_BUY
ASK = 2  # cex.type.v1.SIDE_SELL
CHECKSUM_LEVELS = 25
ZERO = "0"


@dataclass(frozen=True, slots=True)
class Level:
    """One aggregated price level: the price as ticks and as match wrote it."""

    ticks: int
    price: str
    quantity: str
    order_count: int


@dataclass(frozen=True, slots=True)
class BookDelta:
    """Changed levels (quantity "0" = removed) and the checksum of the view after them."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    checksum: int

    @property
    def empty(self) -> bool:
        return not self.bids and not self.asks


class _Side:
    """Levels of one side; `keys` sorted so that keys[0] is the best level."""

    def __init__(self, side: int) -> None:
        self.sign = -1 if side == BID else 1
        self.levels: dict[int, Level] = {}
        self.keys: list[int] = []

    def set(self, level: Level) -> None:
        key = self.sign * level.ticks
        if level.quantity == ZERO:
            if self.levels.pop(level.ticks, None) is not None:
                del self.keys[bisect.bisect_left(self.keys, key)]
            return
        if level.ticks not in self.levels:
            bisect.insort(self.keys, key)
        self.levels[level.ticks] = level

    def top(self, depth: int | None) -> list[Level]:
        keys = self.keys if depth is None else self.keys[:depth]
        return [self.levels[self.sign * k] for k in keys]


class L2Book:
    """A market's whole L2 book at `seq` (the last match event applied)."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self._sides = {BID: _Side(BID), ASK: _Side(ASK)}

    @classmethod
    def of(cls, seq: int, bids: Iterable[Level], asks: Iterable[Level]) -> L2Book:
        book = cls(seq)
        for level in bids:
            book.set(BID, level)
        for level in asks:
            book.set(ASK, level)
        return book

    def set(self, side: int, level: Level) -> None:
        """Replace a level's quantity ("0" removes it)."""
        self._sides[side].set(level)

    def top(self, side: int, depth: int | None = None) -> list[Level]:
        return self._sides[side].top(depth)

    def level(self, side: int, ticks: int) -> Level | None:
        return self._sides[side].levels.get(ticks)

    def size(self, side: int) -> int:
        return len(self._sides[side].keys)


def checksum(bids: Sequence[Level], asks: Sequence[Level], levels: int = CHECKSUM_LEVELS) -> int:
    """CRC-32 of the top `levels`: bid i then ask i as "price:quantity", joined by ":"."""
    parts: list[str] = []
    for i in range(levels):
        if i < len(bids):
            parts.append(f"{bids[i].price}:{bids[i].quantity}")
        if i < len(asks):
            parts.append(f"{asks[i].price}:{asks[i].quantity}")
        if i >= len(bids) and i >= len(asks):
            break
    return zlib.crc32(":".join(parts).encode())


@dataclass(slots=True)
class DepthView:
    """The top `depth` levels per side of a book, as last sent to its holders."""

    depth: int
    bids: list[Level] = field(default_factory=list)
    asks: list[Level] = field(default_factory=list)
    checksum: int = 0

    @classmethod
    def of(cls, book: L2Book, depth: int) -> DepthView:
        bids, asks = book.top(BID, depth), book.top(ASK, depth)
        return cls(depth, bids, asks, checksum(bids, asks))

    def advance(self, book: L2Book) -> BookDelta:
        """Move to the book's current top and return the delta that does the same."""
        new_bids, new_asks = book.top(BID, self.depth), book.top(ASK, self.depth)
        bids, asks = diff(self.bids, new_bids), diff(self.asks, new_asks)
        if not bids and not asks:  # the batch changed nothing within this depth
            return BookDelta((), (), self.checksum)
        delta = BookDelta(bids, asks, checksum(new_bids, new_asks))
        self.bids, self.asks, self.checksum = new_bids, new_asks, delta.checksum
        return delta


def diff(old: list[Level], new: list[Level]) -> tuple[Level, ...]:
    """Levels of `new` that differ from `old`, then the levels that left (quantity "0")."""
    if old == new:
        return ()
    before = {level.ticks: level for level in old}
    after = {level.ticks for level in new}
    changed = [level for level in new if before.get(level.ticks) != level]
    removed = [Level(lv.ticks, lv.price, ZERO, 0) for lv in old if lv.ticks not in after]
    return (*changed, *removed)
