"""order service: proto <-> domain and errors.

Its methods land with the trading issue. Until then the generated base class answers
each one UNIMPLEMENTED (the chassis adds the ErrorInfo), while the process
already owns its schema and connections, so the stack's wiring is real.
"""

from __future__ import annotations

from pathlib import Path

from cex.order.v1 import order_pb2, order_pb2_grpc
from services.chassis import ChassisSettings, Server, connect

MIGRATIONS = Path(__file__).with_name("migrations")


class OrderService(order_pb2_grpc.OrderServiceServicer):
    """cex.order.v1.OrderService."""


async def build_server(settings: ChassisSettings) -> Server:
    server = Server(settings)
    await connect(server, schema="order", migrations=MIGRATIONS, nats=True, redis=True)
    server.add(
        order_pb2.DESCRIPTOR.services_by_name["OrderService"],
        order_pb2_grpc.add_OrderServiceServicer_to_server,
        OrderService(),  # type: ignore[abstract]  # methods land with their issue
    )
    return server
