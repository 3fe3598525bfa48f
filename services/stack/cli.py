"""`cex`: run the local exchange and look at it.

cex up       start every component, print the endpoints, run until Ctrl-C
cex status   each component's health; exits non-zero unless all are healthy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .supervisor import Stack, StackError
from .topology import Ports

__all__ = ["main"]


def _state_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("CEX_STATE_DIR") or ".cex")


def _ports(arg: int | None) -> Ports:
    return Ports(base=arg or int(os.environ.get("CEX_PORT_BASE", "50050")))


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {right}" for left, right in rows)


async def _up(stack: Stack) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    starting = asyncio.create_task(stack.start())
    stopper = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:  # Ctrl-C during start: start() cleans up after itself
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 130
    try:
        took = starting.result()
    except StackError as error:
        print(f"cex: the stack did not come up: {error}", file=sys.stderr)
        return 1
    rows = [(c.name, c.endpoint) for c in stack.components()]
    print(f"cex: all {len(rows)} components healthy in {took:.1f}s\n{_table(rows)}")
    print(f"\n{_table(list(stack.endpoints().items()))}\n\nlogs: {stack.logs}   Ctrl-C stops")
    sys.stdout.flush()
    await stopper
    print("cex: stopping", file=sys.stderr)
    await stack.stop()
    print("cex: stopped", file=sys.stderr)
    return 0


async def _status(state_dir: Path) -> int:
    state_file = state_dir / "stack.json"
    if not state_file.exists():
        print(f"cex: no stack is running from {state_dir} (no {state_file.name})", file=sys.stderr)
        return 1
    state = json.loads(state_file.read_text())
    env = {
        "DATABASE_URL": state["database_url"],
        "NATS_URL": state["nats_url"],
        "REDIS_URL": state["redis_url"],
    }
    stack = Stack(state_dir, Ports(base=state["base_port"], host=state["host"]), env)
    health = await stack.health()
    rows = [(name, "healthy" if ok else "UNHEALTHY") for name, ok in health.items()]
    print(_table(rows))
    print(f"\n{_table(list(stack.endpoints().items()))}")
    return 0 if all(health.values()) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cex", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state-dir", help="where data and logs live (default $CEX_STATE_DIR or .cex)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the whole exchange and run until Ctrl-C")
    up.add_argument("--port-base", type=int, help="first port of the layout (default 50050)")
    commands.add_parser("status", help="health of every component")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cex: %(message)s")
    state_dir = _state_dir(args.state_dir)
    if args.command == "up":
        code = asyncio.run(_up(Stack(state_dir, _ports(args.port_base))))
    else:
        code = asyncio.run(_status(state_dir))
    sys.exit(code)


if __name__ == "__main__":
    main()
