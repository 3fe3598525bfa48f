"""Entry point: python -m chainsim.main

CHAINSIM_PORT (required), CHAINSIM_HOST (127.0.0.1), CHAINSIM_SEED (0),
CHAINSIM_BLOCK_S (seconds per block; 0 = only on Mine), CHAINSIM_FAULTS (JSON),
CHAINSIM_STATE_DIR (where the chain is kept across restarts; unset: in memory only).
A kept chain keeps its seed; CHAINSIM_FAULTS, when set, replaces its faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from .chain import Chain, Faults
from .journal import ChainJournal
from .server import ChainServer


async def _main() -> None:
    given = os.environ.get("CHAINSIM_FAULTS", "")
    faults = Faults.of(json.loads(given or "{}"))
    chain = Chain(seed=int(os.environ.get("CHAINSIM_SEED", "0")), faults=faults)
    journal = None
    if os.environ.get("CHAINSIM_STATE_DIR"):
        journal = ChainJournal(Path(os.environ["CHAINSIM_STATE_DIR"]))
        chain = journal.load(chain)
        if given and chain.faults != faults:
            chain.configure(faults)
            journal.record(chain, {"op": "configure", "faults": faults.as_dict()})
    server = ChainServer(
        chain,
        block_interval_s=float(os.environ.get("CHAINSIM_BLOCK_S", "0.2")),
        journal=journal,
    )
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
