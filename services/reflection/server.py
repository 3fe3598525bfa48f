"""Reflection for every v1 service, in one place.

Each service's own reflection lists only what that process serves. Through
the edge a client needs the whole surface (grpcurl pointed at Envoy lists and
describes every service, then calls it through Envoy's per-service routes),
so Envoy routes reflection here. This service serves no business method.
(It was `services/catalog`, a name that said nothing of what it serves and
collided with the market `Catalog` of services/chassis/markets.py.)
"""

from __future__ import annotations

from types import ModuleType

from cex.auth.v1 import auth_pb2
from cex.funding.v1 import funding_pb2
from cex.ledger.v1 import ledger_pb2
from cex.marketdata.v1 import marketdata_pb2
from cex.match.v1 import match_pb2
from cex.order.v1 import order_pb2
from cex.risk.v1 import risk_pb2
from services.chassis import ChassisSettings, Server

API: tuple[ModuleType, ...] = (
    auth_pb2,
    order_pb2,
    risk_pb2,
    ledger_pb2,
    match_pb2,
    marketdata_pb2,
    funding_pb2,
)


def api_services() -> list[str]:
    return [s.full_name for module in API for s in module.DESCRIPTOR.services_by_name.values()]


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    server.reflect(api_services())
    return server
