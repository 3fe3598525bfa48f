"""Entry point: python -m services.funding.main

FUNDING_CRASH_POINTS (the crash tests only, never in production) names step
boundaries, e.g. "acted:custody_broadcast,started:~ledger_hold": the process
SIGKILLs itself as its orchestrator crosses one of them (`domain.boundary`).
"""

from __future__ import annotations

import functools
import os
import signal

from services.chassis import run

from .orchestrator import CrashAt
from .server import build_server


def kill_at(points: frozenset[str]) -> CrashAt:
    """A `crash_at` that kills this process (kill -9) at the boundaries named."""

    def crash_at(boundary: str) -> None:
        if boundary in points:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_at


if __name__ == "__main__":
    points = frozenset(p for p in os.environ.get("FUNDING_CRASH_POINTS", "").split(",") if p)
    build = functools.partial(build_server, crash_at=kill_at(points)) if points else build_server
    run("funding", build)
