"""Two order replicas behind the local Envoy (`cex up --replicas order=2`), and kill -9
of one while market makers quote through both.

Envoy spreads accounts over the replicas by a consistent hash of the verified
account, so each market maker's session lives on one of them. After SIGKILL of
`order-2`:
- the sessions held by `order` lose nothing: their quotes stay, their streams
  stay open and keep quoting, a fill after the kill is reported, their report
  sequences have no gap;
- the killed replica's cancel-on-disconnect sessions are claimed once its lease
  lapses and their orders cancelled (CANCEL_ON_DISCONNECT), once each;
- such a session, resumed with the last sequence its client saw, gets every
  report it missed (a fill during the outage, then the cancels) and no other.

The stack is this module's own (2 order replicas, a 3 s session lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import SERVICES, free_ports
from services.chassis import ErrorDetails
from tests.e2e.order.support import BUY, SELL, Exchange, Session, Trader, session_owners, uid

R = order_pb2.StreamOrdersRequest
ORDER = next(s for s in SERVICES if s.name == "order")
TRADE, CANCELLED = 2, 3


@pytest.fixture(scope="module")
async def replicated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    state: Path = tmp_path_factory.mktemp("cex-replicas")
    env = embedded_env()
    env["ORDER_SESSION_LEASE_S"] = "3"
    running = Stack(state, free_ports(), env, replicas={"order": 2})
    await running.start()
    yield running
    await running.stop()


def _contiguous(reports: list[order_pb2.ExecutionReport]) -> bool:
    return [r.sequence for r in reports] == list(range(1, len(reports) + 1))


async def _resume(trader: Trader, stub: order_pb2_grpc.OrderServiceStub, session_id: str,
                  after: int) -> Session:  # fmt: skip
    """The session resumed, retried while it is refused UNAVAILABLE (still held by the
    dead replica until its lease lapses and a replica detaches it; Envoy not yet
    routing around the dead one)."""
    for _ in range(60):
        session = Session(trader, stub)
        subscribe = order_pb2.StreamSubscribe(
            resume_session_id=session_id, resume_after_sequence=after
        )
        await session.outbox.put(R(subscribe=subscribe))
        async with asyncio.timeout(15):
            while True:
                if session.received or session.reader.done():
                    break
                await asyncio.sleep(0.02)
        if session.received:
            assert session.received[0].HasField("subscribed"), session.received[0]
            return session
        assert isinstance(session.ended, grpc.aio.AioRpcError), session.ended
        details = ErrorDetails.from_rpc_error(session.ended)
        assert details.code == grpc.StatusCode.UNAVAILABLE, details
        await session.close()
        await asyncio.sleep(0.5)
    pytest.fail(f"session {session_id} never resumed")


async def _taker_ioc(stub: order_pb2_grpc.OrderServiceStub, taker: Trader, side: int,
                     price: str) -> None:  # fmt: skip
    reply = await stub.PlaceOrder(
        order_pb2.PlaceOrderRequest(
            client_order_id=uid(), market="BTC-USDT", side=side,  # type: ignore[arg-type]
            type=t.ORDER_TYPE_LIMIT, price=price, quantity="0.06",
            time_in_force=t.TIME_IN_FORCE_IOC,
        ),
        metadata=taker.md,
        timeout=10,
    )  # fmt: skip
    assert reply.order.filled_quantity == "0.06", reply.order


async def test_kill_one_order_replica_while_market_makers_quote_through_both(
    replicated: Stack,
) -> None:
    stack = replicated
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        # No clean-up of the book afterwards: the stack is this module's alone.
        credentials = stack.credentials("tests")
        exchange = Exchange(stack, credentials, channel)
        exchange.service_token = await credentials.token()
        stub = order_pb2_grpc.OrderServiceStub(channel)
        sessions: list[Session] = []
        held: dict[str, list[Session]] = {"order": [], "order-2": []}
        try:
            # Market makers until both replicas hold two sessions (the ring decides
            # which replica an account lands on).
            for _ in range(16):
                if all(len(v) >= 2 for v in held.values()):
                    break
                mm = await exchange.trader({"BTC": "5", "USDT": "5000"}, "mm")
                session = Session(mm, stub)
                sessions.append(session)
                subscribed = await session.subscribe(cancel_on_disconnect=True)
                owner = (await session_owners(stack.database_url))[subscribed.session_id]
                held[owner].append(session)
            assert all(len(v) >= 2 for v in held.values()), {k: len(v) for k, v in held.items()}
            survivors, doomed = held["order"], held["order-2"]
            # Everyone quotes 95 / 105, but the first doomed market maker has the best
            # ask and the first survivor the best bid: the taker's fills hit only them.
            quotes: dict[Session, list[str]] = {}
            for session in [*survivors, *doomed]:
                ask = "101" if session is doomed[0] else "105"
                bid = "99" if session is survivors[0] else "95"
                quotes[session] = [await session.quote(SELL, ask), await session.quote(BUY, bid)]
                await session.wait_for("execution_report", 2)
            last_seen = {s: s.reports()[-1].sequence for s in doomed}
            taker = await exchange.trader({"USDT": "5000", "BTC": "5"}, "taker")

            # kill -9 of order-2; during the outage a fill for each side, the survivors
            # quote on.
            process = stack.component("order-2").process
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
            direct = f"{stack.ports.host}:{stack.ports.grpc(ORDER)}"  # the live replica
            async with grpc.aio.insecure_channel(direct) as live:
                orders = order_pb2_grpc.OrderServiceStub(live)
                await _taker_ioc(orders, taker, BUY, "101")  # doomed[0]'s ask, before the
                await _taker_ioc(orders, taker, SELL, "99")  # lease lapses; survivors[0]'s bid
            for session in survivors:
                quotes[session].append(await session.quote(BUY, "94"))
            for session in doomed:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(session.reader, 10)
                assert session.ended is not None  # its replica is gone

            # The doomed sessions are claimed once the lease lapses, their orders
            # cancelled, the sessions detached.
            async with asyncio.timeout(30):
                while True:
                    if "order-2" not in (await session_owners(stack.database_url)).values():
                        break
                    await asyncio.sleep(0.2)
            for session in doomed:
                for order_id in quotes[session]:
                    order = await session.trader.settled(order_id, t.ORDER_STATE_CANCELLED)
                    assert (order.state, order.cancel_reason) == (
                        t.ORDER_STATE_CANCELLED,
                        t.CANCEL_REASON_CANCEL_ON_DISCONNECT,
                    ), order

            # Resumed from the last report each client saw: exactly what it missed.
            for session in doomed:
                first = next(m.subscribed for m in session.received if m.HasField("subscribed"))
                resumed = await _resume(session.trader, stub, first.session_id, last_seen[session])
                sessions.append(resumed)
                assert resumed.received[0].subscribed.last_sequence == last_seen[session]
                ask, bid = quotes[session]
                want = [(ask, CANCELLED), (bid, CANCELLED)]
                if session is doomed[0]:
                    want.append((ask, TRADE))
                await resumed.wait_for("execution_report", len(want))
                await asyncio.sleep(0.5)  # nothing more comes
                missed = resumed.reports()
                before = [r for r in session.reports() if r.sequence <= last_seen[session]]
                assert _contiguous(before + missed), [r.sequence for r in before + missed]
                assert sorted((r.order_id, r.execution_type) for r in missed) == sorted(want)
                assert {r.cancel_reason for r in missed if r.execution_type == CANCELLED} == {
                    t.CANCEL_REASON_CANCEL_ON_DISCONNECT
                }

            # The survivors: never cancelled, nothing lost, their streams still open.
            for session in survivors:
                assert not session.reader.done(), session.ended
                want = 4 if session is survivors[0] else 3  # 3 quotes, and the fill
                await session.wait_for("execution_report", want)
                await asyncio.sleep(0.2)
                reports = session.reports()
                assert _contiguous(reports), [r.sequence for r in reports]
                assert len(reports) == want
                assert CANCELLED not in {r.execution_type for r in reports}
                for order_id in quotes[session]:
                    order = await session.trader.get(order_id)
                    assert order.state in (t.ORDER_STATE_OPEN, t.ORDER_STATE_PARTIALLY_FILLED)
        finally:
            for session in sessions:
                await session.close()
