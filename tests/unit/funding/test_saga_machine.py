"""The orchestrator's state machine (`decide`), without I/O."""

from __future__ import annotations

import random

import grpc
import pytest

from services.funding.domain import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    RUNNING,
    STUCK,
    Done,
    Fail,
    Progress,
    Retry,
    RetryPolicy,
    Step,
    Wait,
    decide,
    error_status,
)
from services.funding.withdrawals import BEFORE_BROADCAST_RETRY


async def _noop(ctx: object) -> Done:
    return Done()


ERR = error_status(grpc.StatusCode.UNAVAILABLE, "FUNDING_TEST_ERROR", "boom")
RNG = random.Random(7)

# hold (compensable) -> check (no compensation) -> send (irreversible: stuck) -> post (stuck)
STEPS = (
    Step("hold", _noop, _noop, RetryPolicy(max_attempts=3)),
    Step("check", _noop, None, RetryPolicy(max_attempts=3)),
    Step("send", _noop, None, RetryPolicy(max_attempts=0), on_exhausted="stuck"),
    Step("post", _noop, None, RetryPolicy(max_attempts=0), on_exhausted="stuck"),
)


def run(progress: Progress, outcome: object, *, late: bool = False):  # type: ignore[no-untyped-def]
    return decide(STEPS, progress, outcome, past_deadline=late, rng=RNG)  # type: ignore[arg-type]


def test_success_walks_every_step_then_completes() -> None:
    p = Progress(RUNNING, 0)
    for index in range(len(STEPS)):
        d = run(p, Done({"k": str(index)}))
        assert d.entry is not None and d.entry.state == "SUCCEEDED"
        assert d.entry.name == STEPS[index].name and d.outputs == {"k": str(index)}
        p = d.progress
    assert p.state == COMPLETED


def test_a_definite_failure_compensates_what_ran_before_it_in_reverse() -> None:
    d = run(Progress(RUNNING, 1), Fail(ERR))
    assert d.entry is not None and d.entry.state == "FAILED" and not d.entry.compensation
    # "check" failed for good (no effect); "hold" is the only step to undo.
    assert d.progress == Progress(COMPENSATING, 0, 0)
    assert d.failure == ERR
    undone = run(d.progress, Done())
    assert undone.entry is not None and undone.entry.compensation
    assert undone.progress.state == COMPENSATED


def test_a_failure_of_the_first_step_has_nothing_to_compensate() -> None:
    assert run(Progress(RUNNING, 0), Fail(ERR)).progress.state == COMPENSATED


def test_compensation_skips_steps_without_one() -> None:
    d = run(Progress(RUNNING, 3), Fail(ERR))  # after send: undo check (none), hold
    assert d.progress == Progress(COMPENSATING, 0, 0)


def test_retries_back_off_within_bounds_then_compensate_the_uncertain_step_too() -> None:
    p = Progress(RUNNING, 0)
    delays = []
    for attempt in (1, 2):
        d = run(p, Retry(ERR))
        assert d.entry is not None and d.entry.state == "RETRYING" and d.entry.attempt == attempt
        delays.append(d.delay_s)
        p = d.progress
    policy = STEPS[0].retry
    assert policy.initial_s / 2 <= delays[0] <= policy.initial_s
    assert policy.initial_s <= delays[1] <= 2 * policy.initial_s
    d = run(p, Retry(ERR))  # third attempt: exhausted
    assert d.entry is not None and d.entry.state == "FAILED"
    # The hold may have happened: its own compensation runs.
    assert d.progress == Progress(COMPENSATING, 0, 0)


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_s=0.1, multiplier=2, max_s=1.0, max_attempts=0)
    rng = random.Random(1)
    values = [policy.delay(30, rng) for _ in range(200)]
    assert all(0.5 <= v <= 1.0 for v in values)
    assert len({round(v, 6) for v in values}) > 100  # jitter spreads retries
    assert not policy.exhausted(10_000)


def test_an_irreversible_step_out_of_retries_is_stuck_never_compensated() -> None:
    p = Progress(RUNNING, 2, attempt=41)
    d = run(p, Retry(ERR), late=True)
    assert d.progress.state == STUCK
    assert d.failure is None


def test_a_step_past_the_deadline_while_waiting_follows_its_exhaustion_rule() -> None:
    assert run(Progress(RUNNING, 3), Wait(1.0), late=True).progress.state == STUCK
    d = run(Progress(RUNNING, 1), Wait(1.0), late=True)
    assert d.progress == Progress(COMPENSATING, 0, 0)


def test_wait_logs_nothing_and_keeps_attempts() -> None:
    d = run(Progress(RUNNING, 3, attempt=2), Wait(0.5, {"confirmations": "1"}))
    assert d.entry is None and d.delay_s == 0.5 and d.progress == Progress(RUNNING, 3, 2)
    assert d.outputs == {"confirmations": "1"}


def test_compensation_is_retried_until_done() -> None:
    p = Progress(COMPENSATING, 0)
    for attempt in range(1, 30):
        d = run(p, Retry(ERR))
        assert d.entry is not None and d.entry.state == "RETRYING" and d.entry.compensation
        assert d.entry.attempt == attempt
        assert d.delay_s <= STEPS[0].compensation_retry.max_s
        p = d.progress
    assert run(p, Done()).progress.state == COMPENSATED


def test_a_compensation_that_fails_for_good_or_runs_late_is_stuck() -> None:
    assert run(Progress(COMPENSATING, 0), Fail(ERR)).progress.state == STUCK
    assert run(Progress(COMPENSATING, 0), Retry(ERR), late=True).progress.state == STUCK


@pytest.mark.parametrize("state", [COMPLETED, COMPENSATED, STUCK])
def test_terminal_sagas_do_not_run(state: str) -> None:
    with pytest.raises(ValueError):
        run(Progress(state, 0), Done())


@pytest.mark.parametrize("seed", range(20))
def test_a_withdrawal_outlasts_a_dependency_restarting_before_it_gives_up(seed: int) -> None:
    # What the long kill -9 burst found: with 8 attempts (3-6 s of backoff) a
    # withdrawal was REJECTED while the service behind the mesh restarted. The
    # steps before the broadcast now retry for half a minute at least.
    steps = (Step("ledger_hold", _noop, _noop, BEFORE_BROADCAST_RETRY), *STEPS[1:])
    rng = random.Random(seed)
    p, waited = Progress(RUNNING, 0), 0.0
    while True:
        d = decide(steps, p, Retry(ERR), past_deadline=False, rng=rng)
        assert d.entry is not None
        if d.entry.state == "FAILED":
            break
        waited += d.delay_s
        p = d.progress
    assert d.progress == Progress(COMPENSATING, 0, 0)
    assert 30.0 <= waited <= 70.0
