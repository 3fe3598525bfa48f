"""risk service: proto <-> domain and errors.

Its methods land with the trading issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class RiskService(risk_pb2_grpc.RiskServiceServicer):
    """cex.risk.v1.RiskService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="risk", migrations=MIGRATIONS, redis=True)
    server.add(
        risk_pb2.DESCRIPTOR.services_by_name["RiskService"],
        risk_pb2_grpc.add_RiskServiceServicer_to_server,
        RiskService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
