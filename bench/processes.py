"""The stack's processes as the benchmarks watch them: CPU seconds and memory."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

__all__ = ["cpu", "peak_rss_mb", "pids", "rss_mb"]

_TICK = os.sysconf("SC_CLK_TCK")
_WATCHED = (
    *("order", "risk", "ledger", "match", "marketdata", "auth", "funding"),
    *("envoy", "postgres", "nats", "redis"),
)


def pids(state_dir: Path) -> dict[str, int]:
    """The watched components' pids, replicas included (`order-2`, ...)."""
    doc = json.loads((state_dir / "stack.json").read_text())
    return {name: pid for name, pid in doc["pids"].items() if _watched(name)}


def _watched(name: str) -> bool:
    base, _, replica = name.rpartition("-")
    return name in _WATCHED or (replica.isdigit() and base in _WATCHED)


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children alive now (PostgreSQL's backends)."""
    total = 0.0
    for child in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def peak_rss_mb(pid: int, until: float) -> float:
    """The largest resident memory of a process, sampled every second until `until`."""
    peak = rss_mb(pid)
    while time.perf_counter() < until:
        await asyncio.sleep(1.0)
        peak = max(peak, rss_mb(pid))
    return peak


def cpu(processes: dict[str, int]) -> dict[str, float]:
    return {name: _cpu_s(pid) for name, pid in processes.items()}
