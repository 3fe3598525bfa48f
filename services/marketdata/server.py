"""marketdata service: proto <-> domain and errors.

Its methods land with the market data issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.marketdata.v1 import marketdata_pb2, marketdata_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class MarketDataService(marketdata_pb2_grpc.MarketDataServiceServicer):
    """cex.marketdata.v1.MarketDataService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="marketdata", migrations=MIGRATIONS, nats=True, redis=True)
    server.add(
        marketdata_pb2.DESCRIPTOR.services_by_name["MarketDataService"],
        marketdata_pb2_grpc.add_MarketDataServiceServicer_to_server,
        MarketDataService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
