"""The integrator SDKs against the real stack, through Envoy.

A real account and API key (made as `cex account create` / `cex apikey create`
do, with a service token) and a real deposit; then the Python SDK, the Go
example and the TypeScript example each get a token from the key and read;
the Go and TypeScript examples also place an order through Envoy and cancel it.
The Python SDK's retries meet real faults: the edge's rate limit on IssueToken
(RESOURCE_EXHAUSTED with RetryInfo 1 s) and a killed ledger (UNAVAILABLE
until the supervisor has restarted it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_sdk import NO_RETRY, Client, RateLimitedError, RetryEvent, RetryPolicy
from cex_stack.supervisor import Stack
from services.chassis import ServiceCredentials

ROOT = Path(__file__).resolve().parents[2]
EXHAUSTED, UNAVAILABLE = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Integrator:
    account_id: str
    key_id: str
    secret: str


async def integrator_with(
    stack: Stack, service_credentials: ServiceCredentials, funds: dict[str, str]
) -> Integrator:
    """A new account with a read+trade key, `funds` (asset -> amount) deposited."""
    md = (("authorization", f"Bearer {await service_credentials.token()}"),)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        account = (
            await auth.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="sdk"),
                metadata=md,
                timeout=10,
            )
        ).account
        key = await auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex,
                account_id=account.account_id,
                scopes=[auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE],
            ),
            metadata=md,
            timeout=10,
        )
        reply = await ledger_pb2_grpc.LedgerServiceStub(channel).CreateTransfers(
            ledger_pb2.CreateTransfersRequest(
                transfers=[
                    ledger_pb2.Transfer(
                        id=f"sdk-fund-{uuid.uuid4().hex}",
                        debit_account_id="sys:custody",
                        credit_account_id=account.account_id,
                        asset=asset,
                        amount=amount,
                        kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                    )
                    for asset, amount in funds.items()
                ]
            ),
            metadata=md,
            timeout=10,
        )
        assert all(r.status.code == 0 for r in reply.results), reply
    return Integrator(account.account_id, key.api_key.api_key_id, key.secret)


@pytest.fixture(scope="module")
async def integrator(stack: Stack, service_credentials: ServiceCredentials) -> Integrator:
    """An account with a read+trade key and 5 USDT deposited."""
    return await integrator_with(stack, service_credentials, {"USDT": "5"})


@pytest.fixture(scope="module")
async def trader(stack: Stack, service_credentials: ServiceCredentials) -> Integrator:
    """An account with a read+trade key and 100 USDT, for the examples' orders."""
    return await integrator_with(stack, service_credentials, {"USDT": "100"})


def _balances(rows: list[dict[str, str]]) -> dict[str, Decimal]:
    return {row["asset"]: Decimal(row["available"]) for row in rows}


async def test_the_python_sdk_gets_a_token_and_reads(stack: Stack, integrator: Integrator) -> None:
    async with Client.from_api_key(stack.edge, integrator.key_id, integrator.secret) as client:
        account = await client.auth.get_account()
        balances = await client.ledger.get_balances()
        keys = await client.auth.list_api_keys()
    assert account.account_id == integrator.account_id
    assert account.state == auth_pb2.ACCOUNT_STATE_ACTIVE
    assert [(b.asset, Decimal(b.available), Decimal(b.held)) for b in balances] == [
        ("USDT", Decimal(5), Decimal(0))
    ]
    assert [k.api_key_id for k in keys.api_keys] == [integrator.key_id]
    assert client.tokens.issued == 1


async def test_the_rate_limited_token_endpoint_is_retried_after_its_retry_info(
    stack: Stack, integrator: Integrator
) -> None:
    """35 clients ask for a token at once on one connection: the edge's bucket
    (20, +10 a second) refuses some with EDGE_RATE_LIMITED and RetryInfo 1 s;
    each of those waits at least that long and then gets its token."""
    events: list[RetryEvent] = []
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.2, max_backoff_s=1.0)
    async with grpc.aio.insecure_channel(stack.edge) as channel:

        async def read() -> str:
            client = Client(
                channel,
                integrator.key_id,
                integrator.secret,
                timeout_s=30,
                retry=policy,
                on_retry=events.append,
            )
            return (await client.auth.get_account()).account_id

        accounts = await asyncio.gather(*(read() for _ in range(35)))
        assert set(accounts) == {integrator.account_id}
        limited = [e for e in events if e.code is EXHAUSTED]
        assert limited, "the edge limited nobody: the burst did not reach the bucket"
        assert {(e.method, e.reason, e.retry_after_s) for e in limited} == {
            ("/cex.auth.v1.AuthService/IssueToken", "EDGE_RATE_LIMITED", 1.0)
        }
        assert all(e.delay_s >= 1.0 for e in limited)

        # Without retries the same refusal reaches the caller, typed and decoded.
        async def unretried() -> RateLimitedError | None:
            client = Client(channel, integrator.key_id, integrator.secret, retry=NO_RETRY)
            try:
                await client.tokens.token()
            except RateLimitedError as error:
                return error
            return None

        refusals = [e for e in await asyncio.gather(*(unretried() for _ in range(30))) if e]
    assert refusals, "the edge limited nobody"
    assert {(e.reason, e.domain, e.retry_after_s) for e in refusals} == {
        ("EDGE_RATE_LIMITED", "envoy", 1.0)
    }
    await asyncio.sleep(2.5)  # let the bucket refill for the tests after this one


async def test_a_read_rides_out_a_killed_service(stack: Stack, integrator: Integrator) -> None:
    """SIGKILL the ledger: GetBalances through the edge is UNAVAILABLE until the
    supervisor has restarted it, and the SDK retries until it answers."""
    events: list[RetryEvent] = []
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=1.0)
    async with Client.from_api_key(
        stack.edge,
        integrator.key_id,
        integrator.secret,
        timeout_s=60,
        retry=policy,
        on_retry=events.append,
    ) as client:
        await client.tokens.token()  # the token first: auth stays up
        ledger = stack.component("ledger")
        assert ledger.process is not None
        old_pid = ledger.process.pid
        os.kill(old_pid, signal.SIGKILL)
        balances = await client.ledger.get_balances()
    assert ledger.process.pid != old_pid
    assert _balances([{"asset": b.asset, "available": b.available} for b in balances]) == {
        "USDT": Decimal(5)
    }
    unavailable = [e for e in events if e.code is UNAVAILABLE]
    assert unavailable, "the call never met the dead ledger"
    assert {e.method for e in unavailable} == {"/cex.ledger.v1.LedgerService/GetBalances"}


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _key_env(stack: Stack, who: Integrator) -> dict[str, str]:
    return {
        "CEX_TARGET": stack.edge,
        "CEX_API_KEY_ID": who.key_id,
        "CEX_API_KEY_SECRET": who.secret,
    }


@pytest.fixture(scope="module")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/go built against gen/go (Go's build cache keeps rebuilds quick)."""
    go = shutil.which("go")
    assert go, "Go is required (CI has it): https://go.dev/dl/"
    binary = tmp_path_factory.mktemp("go") / "cex-example"
    _run([go, "build", "-o", str(binary), "."], ROOT / "examples/go")
    return binary


async def test_the_go_example_reads_through_the_edge(
    stack: Stack, integrator: Integrator, go_example: Path
) -> None:
    out = await asyncio.to_thread(_run, [str(go_example)], ROOT, _key_env(stack, integrator))
    account, balances = _json_lines(out)
    assert account == {"account_id": integrator.account_id, "state": "ACCOUNT_STATE_ACTIVE"}
    assert _balances(balances["balances"]) == {"USDT": Decimal(5)}  # type: ignore[arg-type]


async def test_the_go_example_reports_a_refusal_s_error_info(
    stack: Stack, integrator: Integrator, go_example: Path
) -> None:
    env = {**os.environ, **_key_env(stack, integrator), "CEX_API_KEY_SECRET": "sk_wrong"}
    result = await asyncio.to_thread(
        subprocess.run, [str(go_example)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 1
    error = json.loads(result.stderr)
    assert (error["code"], error["reason"]) == ("Unauthenticated", "AUTH_INVALID_CREDENTIALS")


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_the_typescript_example_reads_through_the_edge(
    stack: Stack, integrator: Integrator, transport: str, ts_example: Path
) -> None:
    argv = ["node", str(ts_example)] + (["--grpc-web"] if transport == "grpc-web" else [])
    out = await asyncio.to_thread(_run, argv, ROOT, _key_env(stack, integrator))
    account, balances = _json_lines(out)
    assert account == {"account_id": integrator.account_id, "state": auth_pb2.ACCOUNT_STATE_ACTIVE}
    assert _balances(balances["balances"]) == {"USDT": Decimal(5)}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ts_example() -> Path:
    """examples/ts compiled with the project's tsc (node_modules, from `make setup`)."""
    tsc = ROOT / "node_modules/.bin/tsc"
    assert tsc.exists(), "run `make setup` (npm ci installs tsc and the runtime)"
    _run([str(tsc), "-p", "examples/ts"], ROOT)
    return ROOT / "examples/ts/dist/examples/ts/main.js"


def _placed_and_cancelled(out: str) -> str:
    """The order id from an example's last two lines: placed, then cancelled."""
    *_, placed, cancelled = _json_lines(out)
    assert "-example-" in str(placed["client_order_id"])
    assert cancelled == {"cancelled": placed["placed"], "state": "ORDER_STATE_CANCELLED"}
    return str(placed["placed"])


async def _is_cancelled(stack: Stack, who: Integrator, order_id: str) -> None:
    async with Client.from_api_key(stack.edge, who.key_id, who.secret) as client:
        order = await client.orders.get(order_id)
        assert order.state == t.ORDER_STATE_CANCELLED
        for _ in range(100):  # the hold is released after the cancel, asynchronously
            if [b.held for b in await client.ledger.get_balances()] == ["0"]:
                return
            await asyncio.sleep(0.1)
        pytest.fail("the cancelled order's hold was not released")


async def test_the_go_example_places_and_cancels_an_order_through_the_edge(
    stack: Stack, trader: Integrator, go_example: Path
) -> None:
    argv = [str(go_example), "-place-order", "-price", "95.5", "-quantity", "0.1"]
    out = await asyncio.to_thread(_run, argv, ROOT, _key_env(stack, trader))
    await _is_cancelled(stack, trader, _placed_and_cancelled(out))


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_the_typescript_example_places_and_cancels_an_order_through_the_edge(
    stack: Stack, trader: Integrator, transport: str, ts_example: Path
) -> None:
    argv = ["node", str(ts_example), "--place-order", "--price", "95.5", "--quantity", "0.1"]
    argv += ["--grpc-web"] if transport == "grpc-web" else []
    out = await asyncio.to_thread(_run, argv, ROOT, _key_env(stack, trader))
    await _is_cancelled(stack, trader, _placed_and_cancelled(out))
