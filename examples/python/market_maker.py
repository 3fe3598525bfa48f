"""A market maker: quotes a bid and an ask around a mid price over one
MarketMakerSession, and quotes a side again whenever it fills (reported live
or found by reconciliation after a reconnect). Cancel-on-disconnect and a
dead man's switch guard the quotes if this process or its connection dies.

    python examples/python/market_maker.py --market BTC-USDT --mid 100 --spread 4 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from decimal import Decimal

from _common import client_from_env, emit

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_sdk import CexError, Connected, Disconnected, MarketMakerSession, Reconciled

FILLED = t.ORDER_STATE_FILLED


async def main(market: str, mid: Decimal, spread: Decimal, size: Decimal, seconds: float) -> None:
    prices = {t.SIDE_BUY: mid - spread / 2, t.SIDE_SELL: mid + spread / 2}
    async with (
        client_from_env() as client,
        MarketMakerSession(
            client, markets=[market], cancel_on_disconnect=True, dead_man_switch_s=30
        ) as session,
    ):
        quotes: dict[int, str] = {}  # side -> order_id of its working quote

        async def quote(side: t.Side.ValueType) -> None:
            try:
                order = await session.place(market, side, size, price=prices[side], post_only=True)
            except CexError as error:
                emit(refused=error.reason, side=t.Side.Name(side))
                return
            quotes[side] = order.order_id
            emit(quoted=t.Side.Name(side), price=order.price, order_id=order.order_id)

        await asyncio.gather(quote(t.SIDE_BUY), quote(t.SIDE_SELL))

        async def run() -> None:
            async for event in session.events():
                if isinstance(event, order_pb2.ExecutionReport):
                    if event.execution_type == order_pb2.EXECUTION_TYPE_TRADE:
                        emit(fill=event.order_id, quantity=event.last_quantity,
                             price=event.last_price, sequence=event.sequence)  # fmt: skip
                    order_id, state, side = event.order_id, event.order_state, event.side
                elif isinstance(event, Reconciled):
                    emit(reconciled=event.order.order_id, filled_since=event.filled_since)
                    order_id, state, side = (
                        event.order.order_id,
                        event.order.state,
                        event.order.side,
                    )
                else:
                    if isinstance(event, (Connected, Disconnected)):
                        emit(connection=type(event).__name__)
                    continue
                if state == FILLED and quotes.get(side) == order_id:
                    del quotes[side]
                    await quote(side)  # the side filled: quote it again

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run(), seconds)
        cancelled = await session.cancel_all(market)
        emit(done=True, cancelled=len(cancelled))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--market", default="BTC-USDT")
    parser.add_argument("--mid", type=Decimal, default=Decimal("100"))
    parser.add_argument("--spread", type=Decimal, default=Decimal("4"))
    parser.add_argument("--size", type=Decimal, default=Decimal("0.1"))
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.market, args.mid, args.spread, args.size, args.seconds))
