"""funding_saga_oldest_age_seconds: the age of the oldest unfinished saga, per kind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cex_stack.supervisor import Stack
from services.chassis.db import postgres
from services.funding.saga import Orchestrator, SagaDefinition, SagaMetrics, Step
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
