"""Entry point: python -m services.chainsim.main

CHAINSIM_PORT (required), CHAINSIM_HOST (127.0.0.1), CHAINSIM_SEED (0),
CHAINSIM_BLOCK_S (seconds per block; 0 = only on Mine), CHAINSIM_FAULTS (JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

from .chain import Chain, Faults
from .server import ChainServer


async def _main() -> None:
    faults = Faults.of(json.loads(os.environ.get("CHAINSIM_FAULTS", "{}") or "{}"))
    chain = Chain(seed=int(os.environ.get("CHAINSIM_SEED", "0")), faults=faults)
    server = ChainServer(chain, block_interval_s=float(os.environ.get("CHAINSIM_BLOCK_S", "0.2")))
    await server.start(
        os.environ.get("CHAINSIM_HOST", "127.0.0.1"), int(os.environ["CHAINSIM_PORT"])
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(_main())
