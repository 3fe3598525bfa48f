"""A book watcher: keeps a local order book from the stream (checked by
sequence and checksum, resynced by itself) and prints the top of the book.

    python examples/python/book_watcher.py --market BTC-USDT --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from _common import client_from_env, emit

from cex_sdk import LocalOrderBook


async def main(market: str, depth: int, seconds: float) -> None:
    async with client_from_env() as client, LocalOrderBook(client, market, depth) as book:
        await book.synced()

        async def watch() -> None:
            async for seq in book.updates():
                bid, ask = book.best_bid(), book.best_ask()
                emit(seq=seq, bid=bid and bid.price, ask=ask and ask.price)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch(), seconds)
        emit(
            final=book.seq,
            bids=[(lv.price, lv.quantity) for lv in book.bids(5)],
            asks=[(lv.price, lv.quantity) for lv in book.asks(5)],
            resyncs=[r.reason for r in book.resyncs],
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--market", default="BTC-USDT")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.market, args.depth, args.seconds))
