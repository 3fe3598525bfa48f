"""A service as its own process, as `cex up` runs it, for the tests that kill it with -9.

The process dies with the test process (PR_SET_PDEATHSIG, spawned as the stack's
supervisor spawns its children), so a test that dies or is killed leaves no service
behind holding its port and its database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Mapping
from types import TracebackType

from cex_stack import probes
from cex_stack.supervisor import dying_with_parent
from cex_stack.topology import free_ports

__all__ = ["ServiceProcess"]


class ServiceProcess:
    """`python -m <module>` serving gRPC on `port`: `start` waits until it is SERVING,
    `kill` is kill -9 (counted in `kills`), `stop` is SIGTERM then SIGKILL after a grace.

    `env` goes on top of the test process's environment and may be changed between
    starts; an empty value unsets a setting (the services read '' as not set).
    `health_service` is the name checked with grpc.health.v1 ('' for the whole server).
    With `may_exit_at_start`, a process that exits before it serves (a crash point
    reached while resuming) is no error: `start` returns False.
    """

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        port: int | None = None,
        health_service: str = "",
        *,
        quiet: bool = False,
        may_exit_at_start: bool = False,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.module = module
        self.env = dict(env)
        self.port = free_ports().edge if port is None else port
        self.health_service = health_service
        self.quiet = quiet  # its output to /dev/null rather than the test's captured output
        self.may_exit_at_start = may_exit_at_start
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.process: asyncio.subprocess.Process | None = None
        self.kills = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> bool:
        """Spawn it and wait until it serves (True); False if it exited at once and
        `may_exit_at_start`. Raises if it exits otherwise or is not serving in time
        (and kills it then: no process outlives a failed start)."""
        if self.running:
            raise RuntimeError(f"{self.module} is running already")
        env = {**os.environ, "CEX_LOG_LEVEL": "WARNING", **self.env}
        env["CEX_GRPC_PORT"] = str(self.port)
        output = asyncio.subprocess.DEVNULL if self.quiet else None
        process = await asyncio.create_subprocess_exec(
            *dying_with_parent([sys.executable, "-m", self.module]),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output,
        )  # fmt: skip
        self.process = process
        try:
            return await self._served(process)
        except BaseException:  # not served in time, or the test gave up: no orphan
            if self.running:
                await self._kill()
            raise

    async def _served(self, process: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.returncode is not None:
                if self.may_exit_at_start:
                    return False
                raise RuntimeError(
                    f"{self.module} exited with {process.returncode} before it served"
                )
            if await probes.grpc_health(self.target, self.health_service):
                return True
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"{self.module} not SERVING on {self.target} after {self.start_timeout_s:.0f}s"
        )

    async def kill(self) -> None:
        """kill -9, and wait until it is gone."""
        if self.process is None or self.process.returncode is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"{self.module} is not running (exit status {code})")
        await self._kill()
        self.kills += 1

    async def stop(self) -> None:
        """SIGTERM (it drains), then SIGKILL if it is still there after the grace."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), self.stop_grace_s)
        except TimeoutError:
            await self._kill()

    async def _kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def __aenter__(self) -> ServiceProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
