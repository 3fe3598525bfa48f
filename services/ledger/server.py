"""ledger service: proto <-> domain and errors.

Its methods land with the ledger issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    """cex.ledger.v1.LedgerService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="ledger", migrations=MIGRATIONS, nats=True)
    server.add(
        ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server,
        LedgerService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
