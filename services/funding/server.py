"""funding service: proto <-> domain and errors.

Its methods land with the funding issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.funding.v1 import funding_pb2, funding_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class FundingService(funding_pb2_grpc.FundingServiceServicer):
    """cex.funding.v1.FundingService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="funding", migrations=MIGRATIONS, nats=True)
    server.add(
        funding_pb2.DESCRIPTOR.services_by_name["FundingService"],
        funding_pb2_grpc.add_FundingServiceServicer_to_server,
        FundingService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
