"""risk through the mesh: the stack's own risk process behind Envoy, with the
service token as order and funding present it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid

import grpc

from cex.risk.v1 import risk_pb2 as R
from cex.risk.v1 import risk_pb2_grpc
from cex.type.v1 import types_pb2 as T
from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES
from services.chassis import ErrorDetails
from tests.metrics import sample

_RULES_HEARD = "order_risk_rules_heard_timestamp_seconds"


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_order_and_withdrawal_checks_through_envoy(stack: Stack, service_token: str) -> None:
    account = f"acc_e2e_{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = risk_pb2_grpc.RiskServiceStub(channel)
        call = stub.CheckOrder(
            R.CheckOrderRequest(
                account_id=account,
                market="BTC-USDT",
                side=T.SIDE_BUY,
                type=T.ORDER_TYPE_LIMIT,
                price="100",
                quantity="0.5",
            ),
            timeout=10,
            metadata=_bearer(service_token),
        )
        reply = await call
        assert reply.allowed and reply.rate_limit.used == 1
        # The used-weight headers pass through Envoy.
        headers = dict(await call.initial_metadata())
        assert headers["x-cex-order-count-1s"] == "1"
        assert headers["x-cex-order-limit-1s"] == str(reply.rate_limit.limit)
        check = R.CheckWithdrawalRequest(
            withdrawal_id=f"w_{uuid.uuid4().hex}", account_id=account, asset="BTC", amount="0.1"
        )
        assert (
            await stub.CheckWithdrawal(check, timeout=10, metadata=_bearer(service_token))
        ).allowed
        try:
            await stub.CheckOrder(R.CheckOrderRequest(account_id=account), timeout=10)
        except grpc.aio.AioRpcError as error:
            details = ErrorDetails.from_rpc_error(error)
            assert details.reason == "EDGE_UNAUTHENTICATED"
        else:
            raise AssertionError("a call without a token passed the edge")


async def test_admin_limits_over_rest(stack: Stack, service_token: str) -> None:
    account = f"acc_rest_{uuid.uuid4().hex[:8]}"
    base = f"http://{stack.edge}/v1/admin/limits"

    def call(method: str, url: str, body: dict[str, object] | None = None) -> dict[str, object]:
        request = urllib.request.Request(
            url,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "authorization": f"Bearer {service_token}",
                "content-type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, object] = json.loads(response.read())
            return result

    stored = await asyncio.to_thread(
        call,
        "POST",
        base,
        {"request_id": uuid.uuid4().hex, "limits": {"account_id": account, "max_open_orders": 7}},
    )
    # Envoy answers with the proto field names (preserve_proto_field_names).
    assert stored["limits"]["max_open_orders"] == 7  # type: ignore[index]
    got = await asyncio.to_thread(call, "GET", f"{base}?account_id={account}")
    limits = got["limits"]
    assert limits["account_id"] == account and limits["max_open_orders"] == 7  # type: ignore[index]
    assert limits["max_orders_per_second"] == 100  # type: ignore[index]


async def test_limits_and_kill_switches_survive_kill_9(stack: Stack, service_token: str) -> None:
    """Everything risk answered is in PostgreSQL before the answer: a SIGKILL loses nothing."""
    account = f"acc_k9_{uuid.uuid4().hex[:8]}"
    metadata = _bearer(service_token)
    check = R.CheckOrderRequest(
        account_id=account,
        market="ETH-USDT",
        side=T.SIDE_SELL,
        type=T.ORDER_TYPE_LIMIT,
        price="2000",
        quantity="1",
        open_orders=3,
    )
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = risk_pb2_grpc.RiskServiceStub(channel)
        await stub.SetLimits(
            R.SetLimitsRequest(
                request_id=uuid.uuid4().hex, limits=R.Limits(account_id=account, max_open_orders=3)
            ),
            timeout=10,
            metadata=metadata,
        )
        assert not (await stub.CheckOrder(check, timeout=10, metadata=metadata)).allowed
        await stub.SetKillSwitch(
            R.SetKillSwitchRequest(
                request_id=uuid.uuid4().hex,
                scope=R.KILL_SWITCH_SCOPE_ACCOUNT,
                account_id=account,
                engaged=True,
                reason="kill -9 test",
            ),
            timeout=10,
            metadata=metadata,
        )
    risk = stack.component("risk")
    assert risk.process is not None
    old_pid = risk.process.pid
    os.kill(old_pid, signal.SIGKILL)
    spec = next(s for s in SERVICES if s.name == "risk")
    direct = f"{stack.ports.host}:{stack.ports.grpc(spec)}"
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(direct) as channel:
        stub = risk_pb2_grpc.RiskServiceStub(channel)
        while True:
            try:
                if risk.process.pid != old_pid:
                    reply = await stub.CheckOrder(check, timeout=2, metadata=metadata)
                    back = time.time()
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, stack.log_tail("risk")
            await asyncio.sleep(0.2)
        assert ErrorDetails.from_status(reply.denial).reason == "RISK_KILL_SWITCH_ENGAGED"
        await stub.SetKillSwitch(
            R.SetKillSwitchRequest(
                request_id=uuid.uuid4().hex,
                scope=R.KILL_SWITCH_SCOPE_ACCOUNT,
                account_id=account,
                engaged=False,
                reason="done",
            ),
            timeout=10,
            metadata=metadata,
        )
        limited = await stub.CheckOrder(check, timeout=10, metadata=metadata)
        assert ErrorDetails.from_status(limited.denial).reason == "RISK_OPEN_ORDERS_LIMIT_EXCEEDED"
    # Order, which refuses places once its copy of the rules is stale, follows the
    # restarted risk by itself (its stream reconnects): the stack is whole again.
    while (heard := await asyncio.to_thread(sample, stack, "order", _RULES_HEARD) or 0) < back:
        assert time.monotonic() < deadline + 30, f"order last heard from risk at {heard}"
        await asyncio.sleep(0.2)
