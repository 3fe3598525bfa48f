"""kill -9 of risk while withdrawals are being checked: every answer given stands
(a retry gets it again) and the 24 h limit is never passed. risk runs as its
own process (`python -m services.risk.main`), as `cex up` runs it, with tokens
from the stack's auth."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from cex.risk.v1 import risk_pb2 as R
from cex.risk.v1 import risk_pb2_grpc
from cex_stack.supervisor import Stack
from tests.conftest import Trust
from tests.process import ServiceProcess


@pytest.mark.parametrize(
    "kills",
    [pytest.param(1, id="1-kill"), pytest.param(10, id="10-kills", marks=pytest.mark.chaos)],
)
async def test_withdrawal_answers_and_limits_survive_kill_9(
    stack: Stack,
    trust: Trust,
    fresh_database_url: str,
    kills: int,
) -> None:
    env = {
        "NATS_URL": "",
        "DATABASE_URL": fresh_database_url,
        "REDIS_URL": stack.redis_url,
        "CEX_JWKS_URL": stack.ports.jwks_url,
        "RISK_PRICES": "off",
    }
    risk = ServiceProcess("services.risk.main", env)
    target = risk.target
    await risk.start()
    account = f"acc_{uuid.uuid4().hex[:8]}"
    ids = [f"w{i}-{account}" for i in range(80)]
    answers: dict[str, bool] = {}
    try:
        # The service token on every call, renewed near expiry (ten kills outlive one).
        async with trust.channel(target) as channel:
            stub = risk_pb2_grpc.RiskServiceStub(channel)
            await stub.SetLimits(
                R.SetLimitsRequest(
                    request_id=uuid.uuid4().hex,
                    limits=R.Limits(
                        account_id=account,
                        withdrawals=[R.WithdrawalLimits(asset="ETH", max_amount_per_day="10")],
                    ),
                ),
                timeout=10,
            )

            def request(wid: str) -> R.CheckWithdrawalRequest:
                return R.CheckWithdrawalRequest(
                    withdrawal_id=wid, account_id=account, asset="ETH", amount="0.5"
                )

            async def check(wid: str) -> bool:
                while True:  # as funding's saga does: retry the same id until answered
                    try:
                        reply = await stub.CheckWithdrawal(
                            request(wid), timeout=5, wait_for_ready=True
                        )
                        return reply.allowed
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.UNKNOWN,
                        ), error
                        await asyncio.sleep(0.05)

            progress = asyncio.Event()

            async def client(mine: list[str]) -> None:
                for wid in mine:
                    answers[wid] = await check(wid)
                    progress.set()

            killed_at: list[int] = []

            async def killer() -> None:
                # Kill at evenly spread points of progress, so every kill lands mid-run.
                for k in range(kills):
                    while len(answers) < (k + 1) * len(ids) // (kills + 2):
                        progress.clear()
                        await progress.wait()
                    killed_at.append(len(answers))
                    await risk.kill()
                    await risk.start()

            await asyncio.gather(killer(), *(client(ids[i::6]) for i in range(6)))
            # Every answer stands, and the limit held: 10 ETH of 0.5 = 20 allowed.
            again = {wid: await check(wid) for wid in ids}
        assert len(killed_at) == risk.kills == kills and max(killed_at) < len(ids)
        assert again == answers
        assert sum(answers.values()) == 20
    finally:
        await risk.stop()
