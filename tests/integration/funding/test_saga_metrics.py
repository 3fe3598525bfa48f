"""The orchestrator against a real PostgreSQL: its oldest-saga gauge, its crash hook."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry

from cex_stack.supervisor import Stack
from services.chassis.db import postgres
from services.funding.domain import Done, Fail, Step, error_status
from services.funding.orchestrator import Orchestrator, SagaDefinition, SagaMetrics
from services.funding.server import MIGRATIONS
from tests.integration.funding.support import fresh_database


async def _never(_ctx: object) -> object:
    raise AssertionError("the orchestrator does not run in this test")


async def test_the_oldest_unfinished_saga_ages_and_goes(stack: Stack) -> None:
    registry = CollectorRegistry()
    now = [1_800_000_000.0]
    async with (
        fresh_database(stack) as url,
        postgres(url, schema="funding", migrations=MIGRATIONS, max_size=2) as pool,
    ):
        orchestrator = Orchestrator(
            pool,
            [
                SagaDefinition("withdrawal", [Step("hold", _never)], deadline_s=60),  # type: ignore[arg-type]
                SagaDefinition("deposit", [Step("credit", _never)], deadline_s=60),  # type: ignore[arg-type]
            ],
            owner="metrics-test",
            metrics=SagaMetrics(registry),
            clock=lambda: now[0],
        )

        def age(kind: str) -> float | None:
            return registry.get_sample_value("funding_saga_oldest_age_seconds", {"kind": kind})

        await orchestrator.observe_oldest()
        assert (age("withdrawal"), age("deposit")) == (0, 0)
        async with pool.acquire() as conn:
            saga_id = await orchestrator.create(
                conn, "withdrawal", reference_id="w1", account_id="acc_1", data={}
            )
        now[0] += 90
        await orchestrator.observe_oldest()
        assert (age("withdrawal"), age("deposit")) == (90, 0)
        await pool.execute("UPDATE sagas SET state = 'COMPLETED' WHERE saga_id = $1", saga_id)
        await orchestrator.observe_oldest()
        assert age("withdrawal") == 0


async def test_the_orchestrator_names_every_step_boundary_to_its_crash_hook(stack: Stack) -> None:
    """`crash_at` hears each boundary the crash tests kill at, in order: STARTED committed,
    the action done, its outcome committed (a compensation's with `~`)."""
    crossed: list[str] = []

    async def done(_ctx: object) -> Done:
        return Done()

    async def refused(_ctx: object) -> Fail:
        return Fail(error_status(grpc.StatusCode.FAILED_PRECONDITION, "FUNDING_TEST", "no"))

    async with (
        fresh_database(stack) as url,
        postgres(url, schema="funding", migrations=MIGRATIONS, max_size=4) as pool,
    ):
        steps = [Step("hold", done, done), Step("send", refused)]
        orchestrator = Orchestrator(
            pool,
            [SagaDefinition("withdrawal", steps, deadline_s=60)],  # type: ignore[list-item]
            owner="crash-hook-test",
            metrics=SagaMetrics(CollectorRegistry()),
            crash_at=crossed.append,
            poll_s=0.05,
        )
        async with pool.acquire() as conn:
            saga_id = await orchestrator.create(
                conn, "withdrawal", reference_id="w1", account_id="acc_1", data={}
            )
        runner = asyncio.ensure_future(orchestrator.run())
        try:
            for _ in range(200):
                state = await pool.fetchval("SELECT state FROM sagas WHERE saga_id = $1", saga_id)
                if state == "COMPENSATED":
                    break
                await asyncio.sleep(0.05)
        finally:
            runner.cancel()
            await orchestrator.close()
    assert state == "COMPENSATED"
    assert crossed == [
        "started:hold",
        "acted:hold",
        "committed:hold",
        "started:send",
        "acted:send",
        "committed:send",
        "started:~hold",
        "acted:~hold",
        "committed:~hold",
    ]
