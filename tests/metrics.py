"""A process's own Prometheus metrics, read from its /metrics port."""

from __future__ import annotations

import urllib.request

from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES

__all__ = ["metrics_text", "sample"]


def metrics_text(stack: Stack, service: str, replica: int = 1) -> str:
    """The exposition text of `service`'s replica `replica` (1: the first)."""
    spec = next(s for s in SERVICES if s.name == service)
    url = f"http://{stack.ports.host}:{stack.ports.metrics(spec, replica)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def sample(stack: Stack, service: str, name: str, replica: int = 1) -> float | None:
    """The value of the unlabelled sample `name` (None: not exported)."""
    for line in metrics_text(stack, service, replica).splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None
