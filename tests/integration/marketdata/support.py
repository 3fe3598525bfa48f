"""Match and market data side by side for the tests, and a client keeping a local book."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from decimal import Decimal

import grpc

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex_stack.supervisor import Stack
from services.chassis import ChassisSettings, Server
from services.marketdata.config import MarketDataSettings
from services.marketdata.server import build_server as build_marketdata
from services.match.config import MatchSettings
from services.match.server import build_server as build_match
from tests.conftest import Trust
from tests.integration.match.match_client import Client
from tests.process import ServiceProcess

MARKET = "BTC-USDT"


def md_config(**overrides: object) -> MarketDataSettings:
    base: dict[str, object] = {
        "markets": (MARKET,),
        "heartbeat_s": 0.2,
        "idle_check_s": 0.5,
        "ticker_interval_s": 0.2,
        "redis_interval_s": 0.1,
        "nats_snapshot_s": 0.5,
        "nats_depth": 20,
    }
    base.update(overrides)
    return MarketDataSettings(**base)  # type: ignore[arg-type]


class MatchInProcess:
    """A match of the test's own; it checks tokens against the stack's auth (`trust`)."""

    def __init__(self, database_url: str, nats_url: str, trust: Trust) -> None:
        self.trust = trust
        self.settings = ChassisSettings(
            service="match",
            database_url=database_url,
            nats_url=nats_url,
            shutdown_grace_s=1,
            jwks_url=trust.jwks_url,
        )
        self.server: Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self.port = 0

    async def start(self) -> Client:
        self.server = await build_match(
            self.settings, match_settings=MatchSettings(markets=(MARKET,), snapshot_every=200)
        )
        self.port = await self.server.start()
        self.channel = self.trust.channel(f"127.0.0.1:{self.port}")
        return Client(match_pb2_grpc.MatchServiceStub(self.channel))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0.5)


class MarketDataInProcess:
    """Market data of the test's own: it gets its `svc:marketdata` token from the stack's
    auth (through Envoy, as in the stack) and calls the test's match directly."""

    def __init__(
        self,
        stack: Stack,
        database_url: str,
        nats_url: str,
        redis_url: str | None = None,
        **overrides: object,
    ) -> None:
        self.settings = ChassisSettings(
            service="marketdata",
            database_url=database_url,
            nats_url=nats_url,
            redis_url=redis_url,
            mesh_addr=stack.edge,
            service_secret=stack.service_secret,
            shutdown_grace_s=0.5,
        )
        self.overrides = overrides
        self.server: Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: marketdata_pb2_grpc.MarketDataServiceStub | None = None

    async def start(self, match_target: str) -> marketdata_pb2_grpc.MarketDataServiceStub:
        config = md_config(match_target=match_target, **self.overrides)
        self.server = await build_marketdata(self.settings, config=config)
        port = await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = marketdata_pb2_grpc.MarketDataServiceStub(self.channel)
        return self.stub

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0.2)


def marketdata_process(
    stack: Stack, database_url: str, nats_url: str, match_target: str
) -> ServiceProcess:
    """`python -m services.marketdata.main` on the test's match, without Redis."""
    env = {
        "REDIS_URL": "",
        "CEX_MESH_ADDR": stack.edge,
        "CEX_SERVICE_SECRET": stack.service_secret,
        "DATABASE_URL": database_url,
        "NATS_URL": nats_url,
        "MARKETDATA_MARKETS": MARKET,
        "MARKETDATA_MATCH_TARGET": match_target,
        "MARKETDATA_HEARTBEAT_S": "0.2",
        "MARKETDATA_IDLE_CHECK_S": "0.5",
    }
    return ServiceProcess(
        "services.marketdata.main",
        env,
        health_service="cex.marketdata.v1.MarketDataService",
        quiet=True,
    )


def levels(pb_levels: object) -> list[tuple[str, str, int]]:
    return [(lv.price, lv.quantity, lv.order_count) for lv in pb_levels]  # type: ignore[attr-defined]


def checksum(bids: list[tuple[str, str, int]], asks: list[tuple[str, str, int]]) -> int:
    """The documented checksum, written again from the proto comment."""
    parts = []
    for i in range(25):
        if i < len(bids):
            parts.append(f"{bids[i][0]}:{bids[i][1]}")
        if i < len(asks):
            parts.append(f"{asks[i][0]}:{asks[i][1]}")
    return zlib.crc32(":".join(parts).encode())


class GapDetected(Exception):
    pass


@dataclass
class LocalBook:
    """What a client keeps from StreamOrderBook (or md.<market>.book): prices -> level."""

    depth: int
    seq: int = -1
    bids: dict[str, tuple[str, int]] = field(default_factory=dict)
    asks: dict[str, tuple[str, int]] = field(default_factory=dict)
    snapshots: int = 0
    resynced: int = 0
    deltas: int = 0

    def side(self, name: str) -> list[tuple[str, str, int]]:
        book = self.bids if name == "bids" else self.asks
        ordered = sorted(book, key=Decimal, reverse=name == "bids")
        return [(p, book[p][0], book[p][1]) for p in ordered]

    def apply(self, message: md.StreamOrderBookResponse) -> None:
        """Apply one message; GapDetected if it does not follow, or the checksum is off."""
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            s = message.snapshot
            self.bids = {lv.price: (lv.quantity, lv.order_count) for lv in s.bids}
            self.asks = {lv.price: (lv.quantity, lv.order_count) for lv in s.asks}
            self.seq = s.seq
            self.snapshots += 1
            self.resynced += message.resynced
            expected = s.checksum
        else:
            d = message.delta
            if self.seq < 0 or d.prev_seq != self.seq:
                raise GapDetected(f"delta {d.prev_seq}->{d.seq} after {self.seq}")
            for side, changes in ((self.bids, d.bids), (self.asks, d.asks)):
                for lv in changes:
                    if lv.quantity == "0":
                        side.pop(lv.price, None)
                    else:
                        side[lv.price] = (lv.quantity, lv.order_count)
            self.seq = d.seq
            self.deltas += 1
            expected = d.checksum
        if checksum(self.side("bids"), self.side("asks")) != expected:
            raise GapDetected(f"checksum mismatch at {self.seq}")


async def follow(
    stub: marketdata_pb2_grpc.MarketDataServiceStub,
    book: LocalBook,
    *,
    drop_every: int = 0,
    gaps: list[int] | None = None,
) -> None:
    """Keep `book` from StreamOrderBook until cancelled; resubscribe on a gap. With
    `drop_every`, throw away every n-th delta on purpose."""
    received = 0
    while True:
        call = stub.StreamOrderBook(md.StreamOrderBookRequest(market=MARKET, depth=book.depth))
        try:
            async for message in call:
                received += 1
                if (
                    drop_every
                    and message.WhichOneof("kind") == "delta"
                    and received % drop_every == 0
                ):
                    continue
                book.apply(message)
        except GapDetected:
            if gaps is not None:
                gaps.append(book.seq)
            book.seq = -1
        except grpc.aio.AioRpcError:  # the server went away: subscribe again
            book.seq = -1
            await asyncio.sleep(0.1)
        finally:
            call.cancel()


async def converged(book: LocalBook, client: Client, within_s: float = 15.0) -> match_pb2.OrderBook:
    """Wait until the local book is at match's seq; returns match's book at its depth."""
    engine = await client.book(MARKET, depth=book.depth)
    for _ in range(int(within_s / 0.05)):
        if book.seq == engine.seq:
            return engine
        await asyncio.sleep(0.05)
    raise AssertionError(f"local book at seq {book.seq}, match at {engine.seq}")
