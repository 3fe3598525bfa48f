"""`cex up` as a user runs it: comes up, keeps data across restarts, leaves nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from cex_stack.supervisor import embedded_env
from cex_stack.topology import free_ports

START_TIMEOUT_S = 120


class Up:
    """A `cex up` process and what it printed."""

    def __init__(self, state_dir: Path, base: int) -> None:
        env = embedded_env()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cex_stack.cli",
                "--state-dir",
                str(state_dir),
                "up",
                "--port-base",
                str(base),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "components healthy" in line:
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("cex up did not come up:\n" + "".join(self.lines))


def _children(state_dir: Path) -> list[int]:
    state = json.loads((state_dir / "stack.json").read_text())
    return list(state["pids"].values())


def _survivors(pids: list[int], state_dir: Path) -> list[str]:
    """Processes of this stack still alive: by pid, or naming its state directory."""
    alive = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] in pids or str(state_dir) in cmdline:
            alive.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return alive


def _wait_gone(pids: list[int], state_dir: Path, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (alive := _survivors(pids, state_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


async def _sql(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


@pytest.fixture
def launch() -> Iterator[Callable[[Path, int], Up]]:
    """Starts `cex up`; whatever a test leaves running is killed (children follow)."""
    started: list[Up] = []

    def start(state_dir: Path, base: int) -> Up:
        started.append(Up(state_dir, base))
        return started[-1]

    yield start
    for up in started:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait()


async def test_sigterm_stops_everything_and_data_survives_a_restart(
    tmp_path: Path, launch: Callable[[Path, int], Up]
) -> None:
    ports = free_ports()
    state_dir = tmp_path / "state"
    url = f"postgresql://postgres@127.0.0.1:{ports.postgres}/cex"

    first = launch(state_dir, ports.base)
    first.wait_ready()
    pids = _children(state_dir)
    assert len(pids) == 13  # postgres, nats, redis, chainsim, envoy, 7 services, reflection
    await _sql(url, "CREATE TABLE kept (v text)")
    await _sql(url, "INSERT INTO kept VALUES ('still here')")

    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0, "".join(first.lines)
    assert _wait_gone(pids, state_dir) == []
    assert not (state_dir / "stack.json").exists()

    second = launch(state_dir, ports.base)
    second.wait_ready()
    pids = _children(state_dir)
    rows = await _sql(url, "SELECT v FROM kept")
    assert [r["v"] for r in rows] == ["still here"]

    second.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert second.process.wait(timeout=60) == 0, "".join(second.lines)
    assert _wait_gone(pids, state_dir) == []


def test_kill_9_of_the_supervisor_takes_every_child_with_it(
    tmp_path: Path, launch: Callable[[Path, int], Up]
) -> None:
    ports = free_ports()
    state_dir = tmp_path / "state"
    up = launch(state_dir, ports.base)
    up.wait_ready()
    pids = _children(state_dir)

    up.process.kill()
    up.process.wait(timeout=10)

    assert _wait_gone(pids, state_dir) == []
