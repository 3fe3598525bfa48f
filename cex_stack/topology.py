"""What the exchange is made of, and where each part listens: the one table.

Ports are laid out from one base (CEX_PORT_BASE, default 50050) so that a
test run can move the whole stack to a free range at once. A stateless service
may run as several replicas (`cex up --replicas order=2`): replica 1 has the
service's ports, replicas 2..MAX_REPLICAS ports of their own further up the range.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

__all__ = ["MAX_REPLICAS", "SERVICES", "Ports", "ServiceSpec", "free_ports", "parse_replicas"]


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str  # also the Envoy cluster, the :authority and the schema name
    grpc_service: str  # full name of the service it serves ("" for reflection)
    index: int  # its slot in the port layout
    needs: tuple[str, ...]  # infrastructure it connects to at start
    wave: int  # start order: a wave starts once the previous one is healthy
    # How the edge spreads calls over replicas: "round_robin", or "account" (a
    # consistent hash on the authenticated account: per-account state has one home).
    balance: str = "round_robin"
    # Whether it may run as several replicas (the reflection server not).
    replicable: bool = True
    # Replicas after the first are standbys: they serve once the first's lease lapses
    # (the single writer, ADR 0013), so only one answers as the service at a time.
    standby: bool = False

    @property
    def module(self) -> str:
        return f"services.{self.name}.main"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", "cex.auth.v1.AuthService", 0, ("postgres",), 1),
    ServiceSpec("risk", "cex.risk.v1.RiskService", 1, ("postgres", "redis"), 1),
    ServiceSpec("ledger", "cex.ledger.v1.LedgerService", 2, ("postgres",), 1),
    # The single writer; `--replicas match=2` adds a standby that follows its journal.
    ServiceSpec("match", "cex.match.v1.MatchService", 3, ("postgres", "nats"), 1, standby=True),
    ServiceSpec(
        "marketdata", "cex.marketdata.v1.MarketDataService", 4, ("postgres", "nats", "redis"), 1
    ),
    # Server reflection for the whole v1 surface, behind the edge.
    ServiceSpec("reflection", "", 5, (), 1, replicable=False),
    ServiceSpec(
        "order", "cex.order.v1.OrderService", 6, ("postgres", "nats", "redis"), 2, "account"
    ),
    ServiceSpec("funding", "cex.funding.v1.FundingService", 7, ("postgres", "nats"), 2),
)


@dataclass(frozen=True, slots=True)
class Ports:
    base: int = 50050
    host: str = "127.0.0.1"

    @property
    def edge(self) -> int:
        return self.base

    @property
    def envoy_admin(self) -> int:
        return self.base + 1

    @property
    def postgres(self) -> int:
        return self.base + 2

    @property
    def nats(self) -> int:
        return self.base + 3

    @property
    def nats_monitor(self) -> int:
        return self.base + 4

    @property
    def redis(self) -> int:
        return self.base + 5

    @property
    def jwks(self) -> int:
        """auth's JWKS over HTTP (for Envoy's jwt_authn and the services)."""
        return self.base + 6

    @property
    def chainsim(self) -> int:
        """The chain/custody simulator (chainsim), funding's external world."""
        return self.base + 7

    @property
    def jwks_url(self) -> str:
        return f"http://{self.host}:{self.jwks}/.well-known/jwks.json"

    def grpc(self, spec: ServiceSpec, replica: int = 1) -> int:
        """Replica 1 at base+10+index; replica r >= 2 at base+40+20*(r-2)+index."""
        return self.base + self._replica_offset(replica) + spec.index

    def metrics(self, spec: ServiceSpec, replica: int = 1) -> int:
        """Replica 1 at base+30+index; replica r >= 2 at base+50+20*(r-2)+index."""
        return self.grpc(spec, replica) + (20 if replica == 1 else 10)

    @staticmethod
    def _replica_offset(replica: int) -> int:
        if not 1 <= replica <= MAX_REPLICAS:
            raise ValueError(f"replica {replica}: 1 to {MAX_REPLICAS}")
        return 10 if replica == 1 else 40 + 20 * (replica - 2)

    def all(self) -> list[int]:
        fixed = [
            self.edge,
            self.envoy_admin,
            self.postgres,
            self.nats,
            self.nats_monitor,
            self.redis,
            self.jwks,
            self.chainsim,
        ]
        return fixed + [
            p
            for s in SERVICES
            for r in range(1, (MAX_REPLICAS if s.replicable else 1) + 1)
            for p in (self.grpc(s, r), self.metrics(s, r))
        ]


MAX_REPLICAS = 4  # what the port layout has room for (a range of 100 ports)


def parse_replicas(text: str) -> dict[str, int]:
    """`order=2,marketdata=2` -> {"order": 2, "marketdata": 2}: replicas per service
    (`cex up --replicas`, CEX_REPLICAS); a service not named runs once."""
    counts: dict[str, int] = {}
    by_name = {s.name: s for s in SERVICES}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition("=")
        spec = by_name.get(name.strip())
        if spec is None:
            raise ValueError(f"--replicas: no service {name.strip()!r}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--replicas: {item!r} is not service=count") from None
        if not 1 <= n <= (MAX_REPLICAS if spec.replicable else 1):
            limit = MAX_REPLICAS if spec.replicable else 1
            raise ValueError(f"--replicas: {spec.name} runs 1 to {limit} replicas, not {n}")
        counts[spec.name] = n
    return counts


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    """Outgoing connections take ports from here up; a listener must stay below."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(host: str = "127.0.0.1") -> Ports:
    """A layout whose every port is free now, below the ephemeral range (for tests)."""
    top = max(_ephemeral_floor() - 100, 10_100)
    for _ in range(200):
        ports = Ports(base=random.randrange(10_000, top, 100), host=host)
        if all(_bindable(host, p) for p in ports.all()):
            return ports
    raise RuntimeError("no free range of ports found")
