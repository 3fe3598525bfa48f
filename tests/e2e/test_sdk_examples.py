"""examples/ against the real stack, each a short bounded run.

- Python: the market maker quotes both sides over a MarketMakerSession and
  quotes a side again after it fills, while the book watcher keeps a
  LocalOrderBook that shows those quotes; the trader places, amends, cancels.
  Each runs twice: with the checkout's virtualenv, and as an integrator runs
  it, from a fresh virtualenv holding only cex-sdk's wheel and what pip
  brought for it (no cex-core, no checkout on the path).

The Go and TypeScript examples run in test_sdk.py (with their builds).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from tests.e2e.test_sdk import Integrator
from tests.e2e.test_sdk_trading import Accounts, _client, accounts
from tests.sdk_dist import SDK_REQUIREMENTS, build_wheel, fresh_venv_with, installed

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


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new virtualenv with cex-sdk's wheel installed, and only what
    pip installed for it."""
    tmp = tmp_path_factory.mktemp("sdk-venv")
    python = fresh_venv_with(build_wheel(tmp), tmp / "venv")
    # pip and setuptools come with every virtualenv; typing-extensions with grpcio.
    brought = installed(python) - {"pip", "setuptools"}
    assert brought == {"cex-sdk", "typing-extensions", *SDK_REQUIREMENTS}
    return python


@pytest.fixture(params=["checkout", "wheel"])
def python(request: pytest.FixtureRequest) -> list[str]:
    """How an example is started: the checkout's interpreter, or the wheel's
    virtualenv's with the environment's PYTHON* variables ignored (-E) and no user
    site (-s), started outside the checkout, so only the wheel can provide cex_sdk."""
    if request.param == "checkout":
        return [sys.executable]
    wheel: Path = request.getfixturevalue("wheel_python")
    return [str(wheel), "-E", "-s"]


async def test_the_wheel_s_virtualenv_has_the_sdk_and_not_the_server(
    wheel_python: Path,
) -> None:
    probe = (
        "import importlib.util as u, cex_sdk, cex.funding.v1.funding_pb2_grpc;"
        "print(cex_sdk.__file__);"
        "print([m for m in ('services', 'asyncpg', 'nats', 'redis') if u.find_spec(m)])"
    )
    process = await asyncio.create_subprocess_exec(
        str(wheel_python), "-E", "-s", "-c", probe,
        cwd=wheel_python.parents[1], stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    where, missing = out.decode().splitlines()
    assert process.returncode == 0
    assert where.startswith(str(wheel_python.parents[1])), where  # the venv's, not sdk/python
    assert missing == "[]"


async def _python(
    script: str, stack: Stack, key: Integrator, *args: str, python: list[str] | None = None
) -> list[dict[str, object]]:
    interpreter = python or [sys.executable]
    process = await asyncio.create_subprocess_exec(
        *interpreter,
        str(PY / script),
        *args,
        env=_env(stack, key),
        cwd=Path(interpreter[0]).parents[1] if python else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"{script}:\n{out.decode()}\n{err.decode()}"
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def test_the_python_market_maker_requotes_a_filled_side_and_the_watcher_sees_it(
    stack: Stack, accounts: Accounts, python: list[str]
) -> None:
    mm = await accounts({"BTC": "1", "USDT": "1000"})
    taker = await accounts({"USDT": "1000"})
    watcher = asyncio.create_task(
        _python(
            "book_watcher.py",
            stack,
            taker,
            "--market",
            "BTC-USDT",
            "--seconds",
            "7",
            python=python,
        )
    )
    maker = asyncio.create_task(
        _python(
            "market_maker.py",
            stack,
            mm,
            "--mid",
            "100.07",
            "--spread",
            "4",
            "--seconds",
            "6",
            python=python,
        )
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
    stack: Stack, accounts: Accounts, python: list[str]
) -> None:
    key = await accounts({"USDT": "100"})
    lines = await _python(
        "trader.py", stack, key, "--price", "95.5", "--quantity", "0.2", python=python
    )
    placed, amended, got, cancelled, ioc, balances = lines
    assert placed["state"] == "ORDER_STATE_OPEN"
    assert amended == {"amended": placed["placed"], "quantity": "0.1"}
    assert got == {"got": placed["placed"], "state": "ORDER_STATE_OPEN"}
    assert cancelled == {"cancelled": placed["placed"], "state": "ORDER_STATE_CANCELLED"}
    assert ioc["state"] in ("ORDER_STATE_CANCELLED", "ORDER_STATE_FILLED")
    usdt = balances["balances"]["USDT"]  # type: ignore[index]
    if D(ioc["filled"] or 0) == 0:  # nothing traded: every USDT is still the account's
        assert D(usdt["available"]) + D(usdt["held"]) == 100
