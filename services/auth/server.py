"""auth service: proto <-> domain and errors.

Its methods land with the auth and edge issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    """cex.auth.v1.AuthService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="auth", migrations=MIGRATIONS)
    server.add(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        AuthService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
