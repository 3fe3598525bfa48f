"""PostgreSQL: the trade tape, candles and the cursor that says how far they go.

`persist` writes a run of trades, merges their bars into the stored candles
and moves the market's cursor, in one transaction that locks the cursor row
first; trades at or below the cursor are skipped. So a crash at any point
redoes exactly what was not committed, and several replicas writing the same
market count every trade once.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from services.chassis import ns_from_utc, utc_from_ns

from .domain import Bar, TradeFact, bars

__all__ = ["Store"]

_S = 1_000_000_000  # ns


def _bar(row: asyncpg.Record) -> Bar:
    return Bar(
        row["width_s"],
        ns_from_utc(row["open_time"]) // _S,
        row["open"], row["high"], row["low"], row["close"],
        row["volume"], row["quote_volume"], row["trade_count"],
    )  # fmt: skip


def _trade(row: asyncpg.Record) -> TradeFact:
    return TradeFact(
        row["market"], row["seq"], row["trade_id"], row["price"], row["quantity"],
        row["quote_quantity"], row["taker_side"], ns_from_utc(row["trade_time"]),
    )  # fmt: skip


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def cursor(self, market: str) -> int:
        seq = await self._pool.fetchval("SELECT seq FROM cursors WHERE market = $1", market)
        return int(seq or 0)

    async def persist(self, market: str, trades: Sequence[TradeFact], seq: int) -> int:
        """Store `trades` (seq order) above the cursor and move it to `seq`; returns how
        many trades were new."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO cursors (market, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING", market
            )
            cursor = await conn.fetchval(
                "SELECT seq FROM cursors WHERE market = $1 FOR UPDATE", market
            )
            if seq <= cursor:
                return 0
            new = [t for t in trades if t.seq > cursor]
            if new:
                await conn.executemany(
                    """INSERT INTO trades (market, seq, trade_id, price, quantity, quote_quantity,
                                           taker_side, trade_time)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""",
                    [
                        (
                            market,
                            t.seq,
                            t.trade_id,
                            t.price,
                            t.quantity,
                            t.quote_quantity,
                            t.taker_side,
                            utc_from_ns(t.time_ns),
                        )
                        for t in new
                    ],
                )
                await conn.executemany(
                    """INSERT INTO candles AS c (market, width_s, open_time, open, high, low,
                                                 close, volume, quote_volume, trade_count)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                       ON CONFLICT (market, width_s, open_time) DO UPDATE SET
                           high = GREATEST(c.high, EXCLUDED.high),
                           low = LEAST(c.low, EXCLUDED.low),
                           close = EXCLUDED.close,
                           volume = c.volume + EXCLUDED.volume,
                           quote_volume = c.quote_volume + EXCLUDED.quote_volume,
                           trade_count = c.trade_count + EXCLUDED.trade_count""",
                    [
                        (
                            market,
                            b.width_s,
                            utc_from_ns(b.open_time_s * _S),
                            b.open,
                            b.high,
                            b.low,
                            b.close,
                            b.volume,
                            b.quote_volume,
                            b.trade_count,
                        )
                        for b in bars(new)
                    ],
                )
            await conn.execute("UPDATE cursors SET seq = $2 WHERE market = $1", market, seq)
            return len(new)

    async def trades(
        self,
        market: str,
        *,
        start_ns: int | None,
        end_ns: int | None,
        before_seq: int | None,
        limit: int,
    ) -> list[TradeFact]:
        """Newest first."""
        rows = await self._pool.fetch(
            """SELECT * FROM trades
               WHERE market = $1
                 AND ($2::timestamptz IS NULL OR trade_time >= $2)
                 AND ($3::timestamptz IS NULL OR trade_time < $3)
                 AND ($4::bigint IS NULL OR seq < $4)
               ORDER BY seq DESC LIMIT $5""",
            market,
            None if start_ns is None else utc_from_ns(start_ns),
            None if end_ns is None else utc_from_ns(end_ns),
            before_seq,
            limit,
        )
        return [_trade(r) for r in rows]

    async def last_trade(self, market: str) -> TradeFact | None:
        found = await self.trades(market, start_ns=None, end_ns=None, before_seq=None, limit=1)
        return found[0] if found else None

    async def candles(
        self, market: str, width_s: int, *, start_s: int | None, end_s: int, limit: int
    ) -> list[Bar]:
        """Oldest first: from start_s on, or (start_s None) the latest before end_s."""
        if start_s is not None:
            rows = await self._pool.fetch(
                """SELECT * FROM candles
                   WHERE market = $1 AND width_s = $2 AND open_time >= $3 AND open_time < $4
                   ORDER BY open_time LIMIT $5""",
                market, width_s, utc_from_ns(start_s * _S), utc_from_ns(end_s * _S), limit,
            )  # fmt: skip
            return [_bar(r) for r in rows]
        rows = await self._pool.fetch(
            """SELECT * FROM candles
               WHERE market = $1 AND width_s = $2 AND open_time < $3
               ORDER BY open_time DESC LIMIT $4""",
            market, width_s, utc_from_ns(end_s * _S), limit,
        )  # fmt: skip
        return [_bar(r) for r in reversed(rows)]
