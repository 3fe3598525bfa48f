"""examples/ against the real stack, each a short bounded run.

- Python: the market maker quotes both sides over a MarketMakerSession and
  quotes a side again after it fills, while the book watcher keeps a
  LocalOrderBook that shows those quotes; the trader places, amends, cancels.

The Go and TypeScript examples run in test_sdk.py (with their builds).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.stack.supervisor import Stack
from tests.e2e.test_sdk import Integrator
from tests.e2e.test_sdk_trading import Accounts, _client, accounts

__all__ = ["accounts"]  # the fixture, used here

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / "examples/python"
D = Decimal


def _env(stack: Stack, key: Integrator) -> dict[str, str]:
    return {
        **os.environ,
        "CEX_TARGET": stack.edge,
        "CEX_API_KEY_ID": key.key_id,
        "CEX_API_KEY_SECRET": key.secret,
    }


async def _python(
    script: str, stack: Stack, key: Integrator, *args: str
) -> list[dict[str, object]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PY / script),
        *args,
        env=_env(stack, key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"{script}:\n{out.decode()}\n{err.decode()}"
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def test_the_python_market_maker_requotes_a_filled_side_and_the_watcher_sees_it(
    stack: Stack, accounts: Accounts
) -> None:
    mm = await accounts({"BTC": "1", "USDT": "1000"})
    taker = await accounts({"USDT": "1000"})
    watcher = asyncio.create_task(
        _python("book_watcher.py", stack, taker, "--market", "BTC-USDT", "--seconds", "7")
    )
    maker = asyncio.create_task(
        _python("market_maker.py", stack, mm, "--mid", "100.07", "--spread", "4", "--seconds", "6")
    )
    async with _client(stack, mm) as mm_client, _client(stack, taker) as client:
        for _ in range(200):  # both quotes up
            page = await mm_client.orders.list_orders(status=order_pb2.ORDER_STATUS_FILTER_OPEN)
            if len(page.orders) == 2:
                break
            await asyncio.sleep(0.05)
        taken = await client.orders.place(
            "BTC-USDT", t.SIDE_BUY, "0.1", price="102.07", time_in_force=t.TIME_IN_FORCE_IOC
        )
        assert taken.state == t.ORDER_STATE_FILLED
    lines = await maker
    quoted = [(q["quoted"], q["price"]) for q in lines if "quoted" in q]
    assert sorted(quoted[:2]) == [("SIDE_BUY", "98.07"), ("SIDE_SELL", "102.07")]
    assert quoted[2:] == [("SIDE_SELL", "102.07")]  # again, after the fill
    fills = [line for line in lines if "fill" in line]
    assert [(f["quantity"], f["price"]) for f in fills] == [("0.1", "102.07")]
    assert lines[-1] == {"done": True, "cancelled": 2}
    seen = await watcher
    assert seen[-1]["resyncs"] == []
    assert any(line.get("ask") == "102.07" for line in seen), seen


async def test_the_python_trader_places_amends_and_cancels(
    stack: Stack, accounts: Accounts
) -> None:
    key = await accounts({"USDT": "100"})
    lines = await _python("trader.py", stack, key, "--price", "95.5", "--quantity", "0.2")
    placed, amended, got, cancelled, ioc, balances = lines
    assert placed["state"] == "ORDER_STATE_OPEN"
    assert amended == {"amended": placed["placed"], "quantity": "0.1"}
    assert got == {"got": placed["placed"], "state": "ORDER_STATE_OPEN"}
    assert cancelled == {"cancelled": placed["placed"], "state": "ORDER_STATE_CANCELLED"}
    assert ioc["state"] in ("ORDER_STATE_CANCELLED", "ORDER_STATE_FILLED")
    usdt = balances["balances"]["USDT"]  # type: ignore[index]
    if D(ioc["filled"] or 0) == 0:  # nothing traded: every USDT is still the account's
        assert D(usdt["available"]) + D(usdt["held"]) == 100
