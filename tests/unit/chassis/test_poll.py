"""poll_until_cancelled: the body of the services' background polling loops."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from services.chassis import poll_until_cancelled

_log = logging.getLogger("test.poll")


async def _run_until(loop: asyncio.Task[None], done: asyncio.Event) -> None:
    await asyncio.wait_for(done.wait(), 5)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


async def test_work_done_runs_again_at_once_and_none_waits() -> None:
    results = [3, 1, 0, 2, 0]  # a true result: more may be waiting
    times: list[float] = []
    done = asyncio.Event()

    async def step() -> int:
        times.append(asyncio.get_running_loop().time())
        if len(times) == len(results):
            done.set()
        return results[len(times) - 1] if len(times) <= len(results) else 0

    loop = asyncio.ensure_future(poll_until_cancelled(step, 0.2, log=_log, failed="step failed"))
    await _run_until(loop, done)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert [gap >= 0.19 for gap in gaps[:4]] == [False, False, True, False]


async def test_without_drain_it_always_waits() -> None:
    times: list[float] = []
    done = asyncio.Event()

    async def step() -> str:
        times.append(asyncio.get_running_loop().time())
        if len(times) == 3:
            done.set()
        return "a report"

    loop = asyncio.ensure_future(
        poll_until_cancelled(step, 0.05, log=_log, failed="step failed", drain=False)
    )
    await _run_until(loop, done)
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(times))


async def test_a_failure_is_logged_at_its_level_and_retried(caplog) -> None:
    calls = 0
    done = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the database went away")
        done.set()

    with caplog.at_level(logging.WARNING, logger="test.poll"):
        loop = asyncio.ensure_future(
            poll_until_cancelled(step, 0.01, log=_log, failed="reading failed", level=logging.ERROR)
        )
        await _run_until(loop, done)
    [record] = [r for r in caplog.records if r.name == "test.poll"]
    assert (record.levelno, record.getMessage()) == (logging.ERROR, "reading failed")
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)
    assert calls >= 2
