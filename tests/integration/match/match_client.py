"""A small client of the match service for the tests: commands, books, replays."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2 as t

ACCOUNTS = [f"acct-{i}" for i in range(8)]


def limit(order_id: str, account: str, side: int, qty: str, price: str) -> match_pb2.PlaceCommand:
    return match_pb2.PlaceCommand(
        order_id=order_id,
        client_order_id=f"cl-{order_id}",
        account_id=account,
        side=side,  # type: ignore[arg-type]
        type=t.ORDER_TYPE_LIMIT,
        quantity=qty,
        price=price,
        maker_fee_rate="0.0005",
        taker_fee_rate="0.001",
    )


def place(
    command_id: str, command: match_pb2.PlaceCommand, market: str = "BTC-USDT"
) -> match_pb2.Command:
    return match_pb2.Command(command_id=command_id, market=market, place=command)


def random_commands(
    market: str, n: int, *, seed: int, prefix: str = "c"
) -> list[match_pb2.Command]:
    """A mix of limit orders around 100, IOCs, cancels and amends, some of them invalid."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        oid = f"{prefix}-o{rng.randrange(n)}"
        account = rng.choice(ACCOUNTS)
        roll = rng.random()
        cid = f"{prefix}-{i}"
        if roll < 0.6:
            side = rng.choice([t.SIDE_BUY, t.SIDE_SELL])
            order = limit(oid, account, side, str(rng.randrange(1, 4)), str(rng.randrange(95, 106)))
            # A client key of its own: the load reuses order ids (the book refuses a
            # live one), not client keys (the writer would answer the first outcome).
            order.client_order_id = f"cl-{cid}"
            if rng.random() < 0.15:
                order.time_in_force = t.TIME_IN_FORCE_IOC
            out.append(place(cid, order, market))
        elif roll < 0.8:
            cancel = match_pb2.CancelCommand(order_id=oid, account_id=account)
            out.append(match_pb2.Command(command_id=cid, market=market, cancel=cancel))
        else:
            amend = match_pb2.AmendCommand(
                order_id=oid, account_id=account, quantity=str(rng.randrange(1, 4))
            )
            out.append(match_pb2.Command(command_id=cid, market=market, amend=amend))
    return out


class Client:
    def __init__(self, stub: match_pb2_grpc.MatchServiceStub) -> None:
        self.stub = stub

    async def submit(
        self, commands: Sequence[match_pb2.Command], *, rpc_timeout: float = 30
    ) -> list[match_pb2.CommandResult]:
        call = self.stub.SubmitCommands(timeout=rpc_timeout)
        await call.write(match_pb2.SubmitCommandsRequest(commands=commands))
        await call.done_writing()
        response = await call.read()
        assert isinstance(response, match_pb2.SubmitCommandsResponse)
        return list(response.results)

    async def random_load(
        self, market: str, n: int, *, seed: int, prefix: str = "c"
    ) -> list[match_pb2.CommandResult]:
        results = []
        commands = random_commands(market, n, seed=seed, prefix=prefix)
        for start in range(0, n, 10):
            results += await self.submit(commands[start : start + 10])
        assert all(r.status.code == 0 for r in results)
        return results

    async def book(self, market: str, *, l3: bool = False, depth: int = 0) -> match_pb2.OrderBook:
        level = match_pb2.BOOK_LEVEL_L3 if l3 else match_pb2.BOOK_LEVEL_L2
        reply = await self.stub.GetOrderBook(
            match_pb2.GetOrderBookRequest(market=market, level=level, depth=depth), timeout=10
        )
        return reply.book

    async def replay(
        self, market: str, from_seq: int = 0, to_seq: int = 0
    ) -> list[match_pb2.MatchEvent]:
        request = match_pb2.ReplayEventsRequest(market=market, from_seq=from_seq, to_seq=to_seq)
        return [e async for r in self.stub.ReplayEvents(request, timeout=30) for e in r.events]

    async def follow(self, market: str, from_seq: int) -> AsyncIterator[match_pb2.MatchEvent]:
        request = match_pb2.ReplayEventsRequest(market=market, from_seq=from_seq, follow=True)
        call = self.stub.ReplayEvents(request, timeout=30)
        try:
            async for response in call:
                for event in response.events:
                    yield event
        finally:
            call.cancel()
