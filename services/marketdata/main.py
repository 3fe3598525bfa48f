"""Entry point: python -m services.marketdata.main

On uvloop's event loop: every StreamOrderBook message is a write through
grpc.aio, and uvloop's loop takes about a quarter less CPU per write than
asyncio's (docs/benchmarks.md, market data).
"""

import uvloop

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    uvloop.install()
    run("marketdata", build_server)
