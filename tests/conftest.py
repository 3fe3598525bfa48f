"""Fixtures shared by every test tier.

`stack` starts the real thing once per session on a free range of ports:
PostgreSQL, NATS with JetStream, Redis, every service and Envoy, from the
pip-installed wheels. Later tests reuse it through `database_url`, `nats_url`,
`redis_url` and `edge`.

A test marked `replicas` that takes `target` runs twice: against `stack`
(`[stack]`) and against `replicated_stack` (`[replicated_stack]`), a second stack
with 2 replicas of every stateless service (tests/replicas.py); marked
`replicas(only=True)`, against the replicated one alone. The replicated
runs are moved to the end of the session, so that their stack, started at the
first of them, lives only while they run; `-k replicated_stack` runs them alone.

A module marked `own_stack` has a stack of its own (`own_stack`, which `target`
is then): its tests change what every other test shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from cex_stack import probes
from cex_stack.supervisor import Stack, embedded_env
from cex_stack.topology import free_ports
from services.chassis import ServiceCredentials
from services.chassis.authn import service_auth_interceptors
from tests.replicas import REPLICATED, Target


def _stack(folder: Path, replicas: dict[str, int] | None = None) -> Stack:
    # The tests bring up their own embedded parts, whatever the shell points at.
    return Stack(folder, free_ports(), embedded_env(), replicas=replicas)


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with _stack(tmp_path_factory.mktemp("cex-state")) as running:
        yield running


@pytest.fixture(scope="session")
async def replicated_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """2 replicas of every stateless service (match, the single writer, runs once)."""
    async with _stack(tmp_path_factory.mktemp("cex-replicated"), REPLICATED) as running:
        yield running


@pytest.fixture(scope="module")
async def own_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The module's own stack, which `target` is in a module marked `own_stack`: for
    tests that change what every other test shares (a market's status, the fee
    schedule, the markets listed)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    async with _stack(tmp_path_factory.mktemp(name)) as running:
        yield running


@pytest.fixture(scope="session")
def replicated_credentials(replicated_stack: Stack) -> ServiceCredentials:
    return replicated_stack.credentials("tests")


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Target:
    """The stack this run of the test is for: `stack`, unless the test is marked
    `replicas` and this is its `[replicated_stack]` run, or `own_stack`."""
    if request.node.get_closest_marker("own_stack") is not None:
        own: Stack = request.getfixturevalue("own_stack")
        return Target(own, own.credentials("tests"))
    if getattr(request, "param", "stack") == "replicated_stack":
        return Target(
            request.getfixturevalue("replicated_stack"),
            request.getfixturevalue("replicated_credentials"),
        )
    return Target(request.getfixturevalue("stack"), request.getfixturevalue("service_credentials"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("replicas")
    if "target" in metafunc.fixturenames and marker is not None:
        # `replicas(only=True)`: a test of what only a replicated stack has
        only = marker.kwargs.get("only", False)
        stacks = ["replicated_stack"] if only else ["stack", "replicated_stack"]
        metafunc.parametrize("target", stacks, indirect=True)


def _on_replicas(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("target") == "replicated_stack"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the replicated stack last, in their order: one start of that
    stack, and its processes are not idling beside the rest of the session."""
    items[:] = [i for i in items if not _on_replicas(i)] + [i for i in items if _on_replicas(i)]


@pytest.fixture(scope="session")
def database_url(stack: Stack) -> str:
    return stack.database_url


@pytest.fixture(scope="session")
def nats_url(stack: Stack) -> str:
    return stack.nats_url


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.redis_url


@pytest.fixture(scope="session")
def edge(stack: Stack) -> str:
    return stack.edge


@pytest.fixture(scope="session")
def service_credentials(stack: Stack) -> ServiceCredentials:
    """The `svc:tests` credential, as a service of the stack holds one (renewed near expiry)."""
    return stack.credentials("tests")


@dataclass(frozen=True)
class Trust:
    """How a test's own copy of a service joins the stack's trust: its server checks
    tokens against auth's JWKS (`jwks_url`, or `env` for a process), and the test's
    clients present the `svc:tests` token (`channel`)."""

    jwks_url: str
    credentials: ServiceCredentials
    service_secret: str  # what a test's own service presents to the stack's auth...
    edge: str  # ...through the stack's edge, for its service token

    @property
    def env(self) -> dict[str, str]:
        return {"CEX_JWKS_URL": self.jwks_url, "CEX_SERVICE_SECRET": self.service_secret}

    def channel(self, target: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            target, interceptors=service_auth_interceptors(self.credentials)
        )


@pytest.fixture(scope="session")
def trust(stack: Stack, service_credentials: ServiceCredentials) -> Trust:
    return Trust(stack.ports.jwks_url, service_credentials, stack.service_secret, stack.edge)


@pytest.fixture
async def service_token(service_credentials: ServiceCredentials) -> str:
    """A valid `svc:tests` access token (scope `internal`)."""
    return await service_credentials.token()


@pytest.fixture
async def fresh_database_url(stack: Stack) -> str:
    """A new, empty database on the stack's PostgreSQL, for a test that runs its own
    copy of a service (so it never shares a schema with the stack's process)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(stack.admin_database_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return stack.database_url.rsplit("/", 1)[0] + f"/{name}"


@contextlib.asynccontextmanager
async def nats_server(folder: Path) -> AsyncIterator[str]:
    """A NATS server with JetStream of its own (subjects and streams unshared)."""
    port = free_ports().nats
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "nats-server"),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "--jetstream",
        "-sd",
        str(folder / "nats"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if await probes.nats_ok(url):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("private nats-server did not come up")
        yield url
    finally:
        process.kill()
        await process.wait()


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[str]:
    """A NATS server with JetStream of the test's own."""
    async with nats_server(tmp_path) as url:
        yield url


@pytest.fixture(scope="module")
async def module_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A NATS server with JetStream of the module's own (for module-scoped worlds)."""
    async with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url
