"""A local L2 order book kept from MarketDataService.StreamOrderBook.

The stream sends a snapshot, then deltas. Each message carries the seq it
brings the book to (a delta also the seq it starts from, `prev_seq`) and a
CRC-32 of the top of the resulting book. `BookState` applies them and checks
both; `LocalOrderBook` runs the stream and starts it over (a fresh snapshot)
whenever the chain breaks: a delta that does not start where the book is, a
checksum that does not match, a snapshot the server flags `resynced`, or a
broken connection.

The checksum (as OrderBook.checksum in marketdata.proto): zlib's CRC-32 of
the UTF-8 string made from the top 25 levels, for i = 0..24 bid i as
"price:quantity" if present, then ask i as "price:quantity" if present, all
joined with ":", using the exact strings the stream sent.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import Message

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2

from ._closing import ClosedOnExit
from .errors import CexError, from_rpc_error
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "CHECKSUM_LEVELS",
    "BookOutOfSync",
    "BookState",
    "Level",
    "LocalOrderBook",
    "Resync",
    "book_checksum",
]

_log = logging.getLogger("cex_sdk.book")
CHECKSUM_LEVELS = 25
_STREAM = "/cex.marketdata.v1.MarketDataService/StreamOrderBook"


@dataclass(frozen=True, slots=True)
class Level:
    """One price level: the exact decimal strings the stream sent."""

    price: str
    quantity: str


def book_checksum(
    bids: Sequence[Level], asks: Sequence[Level], levels: int = CHECKSUM_LEVELS
) -> int:
    """CRC-32 of the top `levels`: bid i then ask i as "price:quantity", joined by ":"."""
    parts: list[str] = []
    for i in range(min(levels, max(len(bids), len(asks)))):
        if i < len(bids):
            parts.append(f"{bids[i].price}:{bids[i].quantity}")
        if i < len(asks):
            parts.append(f"{asks[i].price}:{asks[i].quantity}")
    return zlib.crc32(":".join(parts).encode())


class BookOutOfSync(Exception):
    """The local book no longer follows the stream; it must be rebuilt from a snapshot."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        #: "gap", "checksum", "resynced" (the server restarted the chain) or "disconnected".
        self.reason = reason


class _Side:
    """One side's levels, `keys` sorted best first (bids by -price, asks by price)."""

    def __init__(self, sign: int) -> None:
        self.sign = sign
        self.levels: dict[Decimal, Level] = {}
        self.keys: list[Decimal] = []

    def clear(self) -> None:
        self.levels.clear()
        self.keys.clear()

    def set(self, level: types_pb2.PriceLevel) -> None:
        price = Decimal(level.price)
        key = self.sign * price
        if Decimal(level.quantity) == 0:
            if self.levels.pop(price, None) is not None:
                del self.keys[bisect.bisect_left(self.keys, key)]
            return
        if price not in self.levels:
            bisect.insort(self.keys, key)
        self.levels[price] = Level(level.price, level.quantity)

    def trim(self, depth: int) -> None:
        for key in self.keys[depth:]:
            del self.levels[self.sign * key]
        del self.keys[depth:]

    def top(self, depth: int | None = None) -> list[Level]:
        keys = self.keys if depth is None else self.keys[:depth]
        return [self.levels[self.sign * key] for key in keys]


class BookState:
    """The book of one stream, with the checks. Pure: no I/O, no clock.

    `apply` takes each StreamOrderBookResponse in order and raises
    `BookOutOfSync` when the message cannot be applied to what is held; the
    state is then unsynced until the next snapshot.
    """

    def __init__(self, market: str, depth: int = 100) -> None:
        self.market = market
        self.depth = depth
        #: Seq of the last match event reflected; 0 before the first snapshot.
        self.seq = 0
        self.synced = False
        self._bids = _Side(-1)
        self._asks = _Side(1)

    def bids(self, depth: int | None = None) -> list[Level]:
        """Bid levels, best (highest) first."""
        return self._bids.top(depth)

    def asks(self, depth: int | None = None) -> list[Level]:
        """Ask levels, best (lowest) first."""
        return self._asks.top(depth)

    def checksum(self) -> int:
        return book_checksum(self._bids.top(CHECKSUM_LEVELS), self._asks.top(CHECKSUM_LEVELS))

    def apply(self, message: md.StreamOrderBookResponse) -> None:
        """Apply a snapshot or a delta; `BookOutOfSync` if the chain or checksum breaks."""
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            # Any snapshot replaces the book (a `resynced` one after the server
            # restarted the chain: the runner records it).
            self._load(message.snapshot.seq, message.snapshot.bids, message.snapshot.asks)
            self._verify(message.snapshot.checksum)
            return
        if kind != "delta":
            return
        delta = message.delta
        if not self.synced:
            raise BookOutOfSync("gap", "a delta before any snapshot")
        if delta.prev_seq != self.seq:
            self.synced = False
            raise BookOutOfSync(
                "gap", f"delta from seq {delta.prev_seq}, the book is at seq {self.seq}"
            )
        for level in delta.bids:
            self._bids.set(level)
        for level in delta.asks:
            self._asks.set(level)
        self._bids.trim(self.depth)
        self._asks.trim(self.depth)
        self.seq = delta.seq
        self._verify(delta.checksum)

    def _load(
        self,
        seq: int,
        bids: Iterable[types_pb2.PriceLevel],
        asks: Iterable[types_pb2.PriceLevel],
    ) -> None:
        self._bids.clear()
        self._asks.clear()
        for level in bids:
            self._bids.set(level)
        for level in asks:
            self._asks.set(level)
        self._bids.trim(self.depth)
        self._asks.trim(self.depth)
        self.seq = seq
        self.synced = True

    def _verify(self, expected: int) -> None:
        got = self.checksum()
        if got != expected:
            self.synced = False
            raise BookOutOfSync(
                "checksum", f"checksum {got} at seq {self.seq}, the server sent {expected}"
            )


@dataclass(frozen=True, slots=True)
class Resync:
    """Why and when the local book was rebuilt from a fresh snapshot."""

    reason: str
    detail: str
    seq: int


class LocalOrderBook(ClosedOnExit):
    """A market's L2 book (top `depth` levels per side) kept in sync in the background.

        async with LocalOrderBook(client, "BTC-USDT", depth=50) as book:
            await book.synced()
            async for _ in book.updates():
                print(book.seq, book.best_bid(), book.best_ask())

    Reading it (`bids()`, `asks()`, `best_bid()`, `seq`) is always a consistent
    book at `seq`: a message is applied whole or the book is rebuilt. After a
    gap, a checksum mismatch, a server resync or a lost connection the stream
    is opened again (with backoff while the service is down) and the next
    snapshot replaces the book; each such event is appended to `resyncs`.
    """

    def __init__(
        self,
        client: Client,
        market: str,
        depth: int = 100,
        *,
        reconnect: RetryPolicy | None = None,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self.market = market
        self.depth = depth
        self._state = BookState(market, depth)
        self._reconnect = reconnect or RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0)
        self._random = random
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Every rebuild after the first snapshot, oldest first.
        self.resyncs: list[Resync] = []
        #: Messages applied (snapshots and deltas).
        self.messages = 0
        #: The last failure of the stream, if any (for logs).
        self.last_error: CexError | None = None

    async def __aenter__(self) -> LocalOrderBook:
        self.start()
        return self

    def start(self) -> None:
        """Start following the stream (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"cex-book-{self.market}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def seq(self) -> int:
        return self._state.seq

    @property
    def is_synced(self) -> bool:
        return self._state.synced

    def bids(self, depth: int | None = None) -> list[Level]:
        return self._state.bids(depth)

    def asks(self, depth: int | None = None) -> list[Level]:
        return self._state.asks(depth)

    def best_bid(self) -> Level | None:
        top = self._state.bids(1)
        return top[0] if top else None

    def best_ask(self) -> Level | None:
        top = self._state.asks(1)
        return top[0] if top else None

    def checksum(self) -> int:
        return self._state.checksum()

    async def synced(self, *, min_seq: int = 0, timeout_s: float = 30.0) -> int:
        """Wait until the book is in sync at `min_seq` or later; returns its seq."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self._state.synced and self._state.seq >= min_seq)
            return self._state.seq

    async def updates(self) -> AsyncIterator[int]:
        """The book's seq after each applied message while it is in sync."""
        seen = -1

        def fresh() -> bool:
            return self._state.synced and self.messages != seen

        while not self._closed:
            async with self._changed:
                await self._changed.wait_for(fresh)
                seen = self.messages
                seq = self._state.seq
            yield seq

    def _receive(self, message: md.StreamOrderBookResponse) -> md.StreamOrderBookResponse | None:
        """Each message as it arrives, before it is applied (None skips it)."""
        return message

    async def _run(self) -> None:
        # Consecutive failed attempts: the first rebuild after a gap or a bad
        # checksum is immediate, repeated ones (or a service that is down) back off.
        failures = 0
        while not self._closed:
            call: grpc.aio.UnaryStreamCall[Message, md.StreamOrderBookResponse] | None = None
            unreachable = False
            try:
                request = md.StreamOrderBookRequest(market=self.market, depth=self.depth)
                call = self._client.unary_stream(_STREAM, md.StreamOrderBookResponse)(
                    request, metadata=await self._client.metadata()
                )
                good = 0
                async for message in call:
                    received = self._receive(message)
                    if received is None:
                        continue
                    was_synced = self._state.synced
                    self._state.apply(received)
                    good += 1
                    if good == 2:  # a snapshot and a delta both checked out
                        failures = 0
                    if received.HasField("snapshot") and received.resynced and was_synced:
                        self._resynced("resynced", "the server restarted the stream")
                    self.messages += 1
                    async with self._changed:
                        self._changed.notify_all()
                raise BookOutOfSync("disconnected", "the stream ended")
            except BookOutOfSync as out:
                self._resynced(out.reason, str(out))
                failures += 1
            except (grpc.aio.AioRpcError, CexError) as error:
                self.last_error = (
                    from_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
                )
                if self._state.synced:
                    self._resynced("disconnected", str(self.last_error))
                failures += 1
                unreachable = True
            finally:
                self._state.synced = False
                if call is not None:
                    call.cancel()
            if failures > 1 or unreachable:
                retry = min(failures, 20)
                await asyncio.sleep(self._reconnect.delay_s(retry, None, self._random))

    def _resynced(self, reason: str, detail: str) -> None:
        _log.info("%s: resync (%s) %s", self.market, reason, detail)
        self.resyncs.append(Resync(reason, detail, self._state.seq))
