"""A trader: places a limit order, amends it, looks it up, cancels it; then an
IOC order that takes what it can. Every call carries its idempotency key, so
the SDK may retry it safely.

    python examples/python/trader.py --market BTC-USDT --price 95.5 --quantity 0.2
"""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal

from _common import client_from_env, emit

from cex.type.v1 import types_pb2 as t
from cex_sdk import CexError


async def main(market: str, price: Decimal, quantity: Decimal) -> None:
    async with client_from_env() as client:
        order = await client.orders.place(market, t.SIDE_BUY, quantity, price=price)
        emit(placed=order.order_id, client_order_id=order.client_order_id,
             state=t.OrderState.Name(order.state))  # fmt: skip
        smaller = await client.orders.amend(order.order_id, quantity=quantity / 2)
        emit(amended=smaller.order_id, quantity=smaller.quantity)
        again = await client.orders.get(client_order_id=order.client_order_id)
        emit(got=again.order_id, state=t.OrderState.Name(again.state))
        cancelled = await client.orders.cancel(order.order_id)
        emit(cancelled=cancelled.order_id, state=t.OrderState.Name(cancelled.state))
        try:  # an IOC never rests: it fills what it can now and cancels the rest
            ioc = await client.orders.place(
                market, t.SIDE_BUY, quantity, price=price, time_in_force=t.TIME_IN_FORCE_IOC
            )
            emit(ioc=ioc.order_id, state=t.OrderState.Name(ioc.state), filled=ioc.filled_quantity)
        except CexError as error:
            emit(refused=error.reason, code=error.code.name)
        balances = await client.ledger.get_balances()
        emit(balances={b.asset: {"available": b.available, "held": b.held} for b in balances})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--market", default="BTC-USDT")
    parser.add_argument("--price", type=Decimal, default=Decimal("95.5"))
    parser.add_argument("--quantity", type=Decimal, default=Decimal("0.2"))
    args = parser.parse_args()
    asyncio.run(main(args.market, args.price, args.quantity))
