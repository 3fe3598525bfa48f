"""kill -9 of order, match, ledger and funding during a trading burst, on the real stack.

Two accounts trade BTC-USDT at 100 from many concurrent clients while the
test SIGKILLs the order, match, ledger and funding processes (the stack's
supervisor restarts them); match's writer is the balance owner (ADR 0013), so its
kills are where money could be lost: the long run kills it 20 times while
the buyer also withdraws. Clients retry a failed place with the same
client_order_id, and a failed withdrawal request with the same request_id,
as a real client would. Afterwards:
- every place that was acknowledged is still there: a working order is in
  match's book and a closed one is closed, and order's view equals match's;
- the ledger audit passes, and each account's held amount is exactly what its
  working orders still need (no hold lost, none left behind);
- every withdrawal ended (completed, or failed with its hold voided);
- cancelling everything releases every hold;
- a replay of match's journal from its latest snapshot gives the same books
  and balances as the writer recovers from its tables.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from functools import partial
from typing import TypeVar

import grpc
import pytest

from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from tests.e2e.order.support import (
    BUY,
    SELL,
    Exchange,
    Trader,
    agreed,
    exchange_of,
    journal_replays,
    kill,
    kill_writer,
    settled_and_balanced,
    uid,
)

D = Decimal
T = TypeVar("T")
Chaos = Callable[[], Awaitable[None]]
WORKING = {t.ORDER_STATE_PENDING_NEW, t.ORDER_STATE_OPEN, t.ORDER_STATE_PARTIALLY_FILLED}
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)
ETH_ADDRESS = "0x" + "c" * 40
ENDED = {F.WITHDRAWAL_STATE_COMPLETED, F.WITHDRAWAL_STATE_FAILED, F.WITHDRAWAL_STATE_CANCELLED}


async def _answered(call: Callable[[], Awaitable[T]], what: str) -> T:
    """The call's answer, sent again (the same request: the same idempotency key) while
    it fails for a reason a crash gives, as a real client would."""
    for _ in range(200):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
            await asyncio.sleep(0.2)
    pytest.fail(f"{what} never answered")


async def _place(
    trader: Trader, side: int, placed: list[order_pb2.Order], stop: asyncio.Event
) -> None:
    """Place until told to stop, each order with its own client_order_id (a crash
    mid-call must not lose or double it)."""
    qty = random.choice(("0.1", "0.2", "0.3"))
    while not stop.is_set():
        request = dict(client_order_id=uid(), side=side, price="100", quantity=qty)
        placed.append(await _answered(partial(trader.place, **request), str(request)))


async def _withdraw(
    exchange: Exchange, trader: Trader, requested: list[str], stop: asyncio.Event
) -> None:
    """Withdraw 5 USDT every half second until told to stop, each with its own
    request_id."""
    funding = funding_pb2_grpc.FundingServiceStub(exchange.channel)
    while not stop.is_set():
        request = F.RequestWithdrawalRequest(
            request_id=uid("w"), asset="USDT", amount="5", address=ETH_ADDRESS
        )
        reply = await _answered(
            partial(funding.RequestWithdrawal, request, metadata=trader.md, timeout=10),
            request.request_id,
        )
        requested.append(reply.withdrawal.withdrawal_id)
        await asyncio.sleep(0.5)


async def _ended(exchange: Exchange, trader: Trader, ids: list[str]) -> None:
    """Every withdrawal reaches an end within two minutes (the saga resumes after kills)."""
    funding = funding_pb2_grpc.FundingServiceStub(exchange.channel)
    for _ in range(240):
        states = [
            (
                await funding.GetWithdrawal(
                    F.GetWithdrawalRequest(withdrawal_id=i), metadata=trader.md, timeout=10
                )
            ).withdrawal.state
            for i in ids
        ]
        if all(s in ENDED for s in states):
            assert F.WITHDRAWAL_STATE_COMPLETED in states, states
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"withdrawals still running: {states}")


def _kills(exchange: Exchange, victims: list[list[str]], seconds: float) -> Chaos:
    """`victims`: groups of services killed together, spread over `seconds`."""

    async def run() -> None:
        pause = seconds / (len(victims) + 1)
        for group in victims:
            await asyncio.sleep(pause)
            await asyncio.gather(*(kill(exchange.stack, name) for name in group))
        await asyncio.sleep(pause)

    return run


async def _burst(
    exchange: Exchange, chaos: Chaos, clients: int, *, withdrawals: bool = False
) -> None:
    """Trade from `clients` clients while `chaos` runs; `withdrawals`: the buyer
    withdraws USDT all along."""
    seller = await exchange.trader({"BTC": "10000"}, "crash-seller")
    buyer = await exchange.trader({"USDT": "1000000"}, "crash-buyer", withdraw=withdrawals)
    # The burst's resting orders may pile up past the default 1,000 on the side
    # that places faster: that is not what is tested here.
    await exchange.lift_limits(seller, buyer)
    placed: list[order_pb2.Order] = []
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            _place(seller if i % 2 else buyer, SELL if i % 2 else BUY, placed, stop)
        )
        for i in range(clients)
    ]
    requested: list[str] = []
    if withdrawals:
        workers.append(asyncio.create_task(_withdraw(exchange, buyer, requested, stop)))
    try:
        await chaos()
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(placed) > 10, "the burst placed almost nothing"
    if withdrawals:
        assert len(requested) > 5, "the burst withdrew almost nothing"
        await _ended(exchange, buyer, requested)

    # Every acknowledged order is known, and order's working set equals match's book.
    book, working = await agreed(exchange, seller, buyer)
    for order in placed:
        latest = await (seller if order.side == SELL else buyer).get(order.order_id)
        assert latest.order_id == order.order_id
        if latest.state in WORKING:
            assert latest.order_id in book, f"{order.order_id} is working but not in the book"
        else:
            assert latest.order_id not in book

    # Holds equal what the working orders still need, and the ledger balances.
    await settled_and_balanced(exchange, seller, buyer, working)

    await exchange.clean_up()
    assert await exchange.held(seller.account_id, "BTC", D(0), within_s=60) == 0
    assert await exchange.held(buyer.account_id, "USDT", D(0), within_s=60) == 0
    await journal_replays(exchange)


async def test_kill_9_of_order_match_and_ledger_during_a_burst_loses_nothing(
    exchange: Exchange,
) -> None:
    # All three at once: in-flight places lose their process at every hop.
    await _burst(exchange, _kills(exchange, [["order", "match", "ledger"]], 4), clients=6)


@pytest.mark.chaos
async def test_kill_9_again_and_again_during_a_long_burst(exchange: Exchange) -> None:
    # Each of the four four times, in a shuffled order, while the buyer withdraws: the
    # supervisor restarts a service at most 5 times a minute, as it would a real crash
    # loop.
    victims = [[name] for name in ["order", "match", "ledger", "funding"] * 4]
    random.Random(12).shuffle(victims)
    await _burst(exchange, _kills(exchange, victims, 120), clients=16, withdrawals=True)


@pytest.mark.chaos
async def test_twenty_kills_of_the_balance_owner_while_trading_and_withdrawing(
    exchange: Exchange,
) -> None:
    # The supervisor restarts a service at most 5 times a minute: 20 kills take 4.
    kills = _kills(exchange, [["match"]] * 20, 260)
    await _burst(exchange, kills, clients=8, withdrawals=True)


@pytest.fixture(scope="module")
async def standby_exchange(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Exchange]:
    """A stack of its own whose writer has a standby (`cex up --replicas match=2`)."""
    state = tmp_path_factory.mktemp("cex-standby")
    async with (
        Stack(state, free_ports(), embedded_env(), replicas={"match": 2}) as stack,
        exchange_of(stack) as exchange,
    ):
        yield exchange


@pytest.mark.chaos
async def test_twenty_kills_of_the_writer_its_standby_takes_over(
    standby_exchange: Exchange, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of whichever replica writes, 20 times during a burst: the other one,
    following the journal, takes over every time; the killed one comes back as the
    standby. The takeover (kill to the standby serving) is reported."""
    takeovers: list[float] = []

    async def kill_the_writer() -> None:
        # Each replica is killed every other time: 6 s apart keeps each one's restarts
        # within the supervisor's 5 a minute.
        for _ in range(20):
            await asyncio.sleep(6)
            takeovers.append(await kill_writer(standby_exchange.stack))
        await asyncio.sleep(2)

    await _burst(standby_exchange, kill_the_writer, clients=8, withdrawals=True)
    assert len(takeovers) == 20
    cuts = statistics.quantiles(takeovers, n=100, method="inclusive")
    with capsys.disabled():
        print(
            f"\nstandby takeover over {len(takeovers)} kills: p50 {cuts[49] * 1000:.0f} ms,"
            f" p99 {cuts[98] * 1000:.0f} ms, max {max(takeovers) * 1000:.0f} ms"
        )
