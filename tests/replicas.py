"""The stack a test runs against, and which replica served what.

Tests marked `replicas` run twice (tests/conftest.py): on the session's stack, one
process per service, and on a stack with 2 replicas of every stateless service
(`cex up --replicas auth=2,risk=2,...`), match's writer with its standby, and
one reflection server. Such a test takes the `target` fixture, a `Target`.

On the replicated stack a test only proves something if its calls reached both
replicas; `served` reads that from each replica's own RED metrics
(`grpc_server_started_total` on its /metrics port), which count what the replica
itself started, whoever sent it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES, ServiceSpec
from services.chassis import ServiceCredentials
from tests.metrics import metrics_text

__all__ = ["REPLICATED", "Target", "grew", "replica_names", "served"]

# Processes per service on the replicated stack: 2 of everything that may have more than
# one (match: the writer and its standby).
REPLICATED = {s.name: 2 for s in SERVICES if s.replicable}


@dataclass(frozen=True)
class Target:
    """The stack a test runs against, and the tests' `svc:tests` credential on it."""

    stack: Stack
    credentials: ServiceCredentials

    @property
    def replicated(self) -> bool:
        return any(self.stack.replica_count(s) > 1 for s in SERVICES)


def _spec(service: str) -> ServiceSpec:
    return next(s for s in SERVICES if s.name == service)


def replica_names(stack: Stack, service: str) -> list[str]:
    """`order`, `order-2`, ...: the service's replicas on `stack` (components' names)."""
    spec = _spec(service)
    return [stack.replica_name(spec, r) for r in range(1, stack.replica_count(spec) + 1)]


_STARTED = re.compile(r"^grpc_server_started_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _started(text: str, grpc_service: str, method: str | None) -> int:
    total = 0.0
    for found in _STARTED.finditer(text):
        labels = dict(_LABEL.findall(found["labels"]))
        if labels.get("grpc_service") == grpc_service and method in (
            None,
            labels.get("grpc_method"),
        ):
            total += float(found["value"])
    return int(total)


async def served(stack: Stack, service: str, method: str | None = None) -> dict[str, int]:
    """Replica name -> the RPCs of `service` (only `method`, if given) it has started."""
    spec = _spec(service)
    pages = await asyncio.gather(
        *(
            asyncio.to_thread(metrics_text, stack, service, r)
            for r in range(1, stack.replica_count(spec) + 1)
        )
    )
    names = replica_names(stack, service)
    return {n: _started(p, spec.grpc_service, method) for n, p in zip(names, pages, strict=True)}


def grew(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """The replicas whose count went up between two `served` readings."""
    return {name for name, count in after.items() if count > before.get(name, 0)}
