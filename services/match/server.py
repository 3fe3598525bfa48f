"""match service: proto <-> domain and errors.

Its methods land with the matching engine issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.match.v1 import match_pb2, match_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class MatchService(match_pb2_grpc.MatchServiceServicer):
    """cex.match.v1.MatchService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="match", migrations=MIGRATIONS, nats=True)
    server.add(
        match_pb2.DESCRIPTOR.services_by_name["MatchService"],
        match_pb2_grpc.add_MatchServiceServicer_to_server,
        MatchService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
