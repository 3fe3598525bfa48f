"""match service: proto <-> the group's writer, and errors.

SubmitCommands pipelines: a stream's requests are read and handed to the
writers as they arrive (at most ``_IN_FLIGHT`` requests per stream waiting for
their journal commit, which bounds memory), and answered in request order.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc

from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.type.v1 import types_pb2
from services.chassis import (
    INTERNAL,
    AlreadyExists,
    ChassisSettings,
    ErrorDetails,
    ExchangeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Market,
    NotFound,
    PermissionDenied,
    Rule,
    Server,
    Violations,
    batch_size,
    connect,
    current_auth,
    require_request_id,
    sees_every_account,
    user,
)
from services.chassis.db import migrate
from services.chassis.listings import listed_market, listed_spec
from services.chassis.markets import Catalog, load_catalog
from services.chassis.money import MoneyError, parse_decimal
from services.chassis.settings import require
from services.chassis.tracing import context_of
from services.ledger.store import MIGRATIONS as LEDGER_MIGRATIONS
from services.ledger.store import Store as LedgerStore

from .config import MatchSettings
from .domain import Side
from .engine import MarketEngine, check_reason, decode, status_name
from .funds import Funds
from .publisher import Publisher
from .retention import Retention
from .store import Journal, Listings
from .writer import Sequencer

__all__ = ["MIGRATIONS", "POLICY", "MatchService", "build_server"]

# Services talk to match (order submits commands, consumers replay events); an
# operator (admin scope) sets a market's status, through the edge.
POLICY: dict[str, Rule] = {
    "SubmitCommands": INTERNAL,
    "GetOrderBook": INTERNAL,
    "ReplayEvents": INTERNAL,
    "SetMarketStatus": user("admin", services=True),
    "CreateMarket": user("admin", services=True),
    "ListListedMarkets": INTERNAL,
}
_SYMBOL = re.compile(r"^[A-Z0-9]{1,16}$")

MIGRATIONS = Path(__file__).with_name("migrations")
_IN_FLIGHT = 64


def _resolved(result: match_pb2.CommandResult) -> asyncio.Future[match_pb2.CommandResult]:
    future: asyncio.Future[match_pb2.CommandResult] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class MatchService(match_pb2_grpc.MatchServiceServicer):
    """cex.match.v1.MatchService."""

    def __init__(
        self,
        catalog: Catalog,
        writer: Sequencer,
        settings: MatchSettings,
        listings: Listings,
    ) -> None:
        self._catalog = catalog
        # Static markets of other writer groups (not the catalog's later additions:
        # Funds adds listings to it, even one whose commit failed and may be retried).
        self._others = frozenset(catalog.markets) - set(writer.markets)
        self._writer = writer
        self._settings = settings
        self._listings = listings

    def _market(self, market: str, field: str = "market") -> Market:
        found = self._writer.markets.get(market)
        if found is not None:
            return found
        if self._catalog.market(market) is None:
            raise NotFound(
                "MATCH_UNKNOWN_MARKET",
                f"no market {market!r}",
                violations=[FieldViolation(field, "not a market", "MATCH_UNKNOWN_MARKET")],
            )
        raise FailedPrecondition("MATCH_NOT_MARKET_OWNER", f"this replica does not write {market}")

    def _dispatch(self, command: match_pb2.Command) -> asyncio.Future[match_pb2.CommandResult]:
        try:
            self._writer.require_serving()
            if not command.market:  # funds: the ledger's transfers, hold expiry
                return self._writer.submit_funds(command)
            market = self._market(command.market, "command.market")
            trace_context = None
            if command.trace_context:  # not part of the command (neither journaled nor compared)
                trace_context = context_of(command.trace_context)
                command.ClearField("trace_context")
            return self._writer.submit(decode(market, command), trace_context)
        except ExchangeError as error:
            return _resolved(
                match_pb2.CommandResult(
                    command_id=command.command_id,
                    market=command.market,
                    status=error.to_status("match"),
                )
            )

    async def SubmitCommands(
        self,
        request_iterator: AsyncIterator[match_pb2.SubmitCommandsRequest],
        context: grpc.aio.ServicerContext[
            match_pb2.SubmitCommandsRequest, match_pb2.SubmitCommandsResponse
        ],
    ) -> AsyncIterator[match_pb2.SubmitCommandsResponse]:
        self._writer.require_serving()
        waiting: asyncio.Queue[list[asyncio.Future[match_pb2.CommandResult]] | None] = (
            asyncio.Queue(maxsize=_IN_FLIGHT)
        )
        limit = self._settings.max_commands_per_request

        async def read() -> None:
            try:
                async for request in request_iterator:
                    try:
                        batch_size(
                            len(request.commands),
                            minimum=0,
                            maximum=limit,
                            field="commands",
                            reason="MATCH_BATCH_TOO_LARGE",
                        )
                    except InvalidArgument as too_many:
                        futures = [
                            _resolved(
                                match_pb2.CommandResult(
                                    command_id=c.command_id,
                                    market=c.market,
                                    status=too_many.to_status("match"),
                                )
                            )
                            for c in request.commands
                        ]
                    else:
                        futures = [self._dispatch(c) for c in request.commands]
                    await waiting.put(futures)
            finally:
                await waiting.put(None)

        reader = asyncio.create_task(read())
        try:
            while (futures := await waiting.get()) is not None:
                results = [await future for future in futures]
                yield match_pb2.SubmitCommandsResponse(results=results)
            await reader  # surfaces a failed read
        finally:
            reader.cancel()

    async def GetOrderBook(
        self,
        request: match_pb2.GetOrderBookRequest,
        context: grpc.aio.ServicerContext[
            match_pb2.GetOrderBookRequest, match_pb2.GetOrderBookResponse
        ],
    ) -> match_pb2.GetOrderBookResponse:
        self._writer.require_serving()
        if request.depth < 0:
            raise InvalidArgument(
                "MATCH_INVALID_DEPTH",
                "depth must not be negative",
                violations=[FieldViolation("depth", "must be >= 0")],
            )
        self._market(request.market)
        depth = request.depth or None
        async with self._writer.view(request.market) as engine:
            return match_pb2.GetOrderBookResponse(
                book=_book(engine, request.level == match_pb2.BOOK_LEVEL_L3, depth)
            )

    async def ReplayEvents(
        self,
        request: match_pb2.ReplayEventsRequest,
        context: grpc.aio.ServicerContext[
            match_pb2.ReplayEventsRequest, match_pb2.ReplayEventsResponse
        ],
    ) -> AsyncIterator[match_pb2.ReplayEventsResponse]:
        self._writer.require_serving()
        violations = []
        if request.from_seq < 0:
            violations.append(FieldViolation("from_seq", "must be >= 0"))
        if request.to_seq < 0 or (request.to_seq and request.to_seq < request.from_seq):
            violations.append(FieldViolation("to_seq", "must be 0 or >= from_seq"))
        if violations:
            raise InvalidArgument("MATCH_INVALID_RANGE", "bad event range", violations=violations)
        log = self._writer.logs[self._market(request.market).symbol]
        next_seq = max(request.from_seq, 1)
        last = request.to_seq
        while True:
            while events := await log.events(next_seq, last or log.committed_seq):
                yield match_pb2.ReplayEventsResponse(events=events)
                next_seq = events[-1].seq + 1
            if last or not request.follow:
                return
            await log.wait_beyond(next_seq - 1)

    async def SetMarketStatus(
        self,
        request: match_pb2.SetMarketStatusRequest,
        context: grpc.aio.ServicerContext[
            match_pb2.SetMarketStatusRequest, match_pb2.SetMarketStatusResponse
        ],
    ) -> match_pb2.SetMarketStatusResponse:
        actor, request_id = self._operator_call(request.request_id, "setting a market's status")
        v = Violations()
        if not request.market:
            v.add("market", "required", "MATCH_FIELD_REQUIRED")
        if status_name(request.status) == str(request.status):
            v.add(
                "status",
                "TRADING, POST_ONLY, CANCEL_ONLY, HALTED or DELISTED",
                "MATCH_INVALID_ENUM",
            )
        check_reason(v, request.reason, "why (kept in the journal and shown)")
        v.raise_if_any("MATCH_REQUEST_INVALID")
        market = self._market(request.market)
        # The journal's (market, command_id) makes the call idempotent by request_id.
        command = match_pb2.Command(
            command_id=f"status:{_key(request_id)}",
            market=market.symbol,
            set_status=match_pb2.SetMarketStatusCommand(
                status=request.status,
                reason=request.reason,
                request_id=request_id,
                updated_by=actor,
            ),
        )
        out = match_pb2.SetMarketStatusResponse()
        for event in await self._operator_command(market, command):
            kind = event.WhichOneof("kind")
            if kind == "status_changed":
                out.change.CopyFrom(event.status_changed)
                out.seq = event.seq
                out.update_time.CopyFrom(event.event_time)
            elif kind == "cancelled" and event.cancelled.remaining_quantity in ("0", ""):
                out.cancelled_orders += 1
        return out

    async def CreateMarket(
        self,
        request: match_pb2.CreateMarketRequest,
        context: grpc.aio.ServicerContext[
            match_pb2.CreateMarketRequest, match_pb2.CreateMarketResponse
        ],
    ) -> match_pb2.CreateMarketResponse:
        actor, request_id = self._operator_call(request.request_id, "listing a market")
        market = self._new_market(request)
        # Idempotent by request_id: the journal's (market, command_id) answers a retry
        # with the first listing; a symbol listed otherwise is ALREADY_EXISTS (the
        # writer decides, in its order: two listings of one symbol race there).
        if market.symbol in self._others:
            raise _exists(market.symbol)  # another writer group's market
        command = match_pb2.Command(
            command_id=f"list:{_key(request_id)}",
            market=market.symbol,
            list_market=match_pb2.ListMarketCommand(
                market=listed_spec(market),
                reason=request.reason,
                request_id=request_id,
                listed_by=actor,
            ),
        )
        out = match_pb2.CreateMarketResponse()
        for event in await self._operator_command(market, command):
            if event.WhichOneof("kind") == "market_listed":
                out.listing.CopyFrom(event.market_listed)
                out.seq = event.seq
                out.create_time.CopyFrom(event.event_time)
        return out

    def _operator_call(self, request_id: str, doing: str) -> tuple[str, str]:
        """Who makes an operator's call, and its request_id; refused unless this
        writer serves and the caller sees every account."""
        self._writer.require_serving()
        if not sees_every_account(current_auth()):
            raise PermissionDenied("MATCH_ADMIN_REQUIRED", f"{doing} needs admin")
        return _actor(), require_request_id(request_id, "MATCH_REQUEST_INVALID")

    async def _operator_command(
        self, market: Market, command: match_pb2.Command
    ) -> Sequence[match_pb2.MatchEvent]:
        """The events of an operator's command, journaled by the writer as any other."""
        result = await self._writer.submit(decode(market, command))
        if result.status.code:
            raise ErrorDetails.from_status(result.status).error("MATCH_REFUSED")
        return result.events

    def _new_market(self, request: match_pb2.CreateMarketRequest) -> Market:
        """The market a CreateMarket asks for; INVALID_ARGUMENT naming every bad field."""
        v = Violations()
        assets = self._catalog.assets
        for name in ("base", "quote"):
            symbol = getattr(request, name)
            if not symbol:
                v.add(name, "required: an asset symbol", "MATCH_FIELD_REQUIRED")
            elif symbol not in assets:
                v.add(
                    name,
                    f"{symbol!r} is not an asset (assets: {', '.join(sorted(assets))}; a new "
                    "asset is added to the catalog, CEX_MARKETS, with a rolling restart)",
                    "MATCH_UNKNOWN_ASSET",
                )
        if request.base and request.base == request.quote:
            v.add("quote", "must differ from base", "MATCH_CONFLICT")
        if not request.symbol:
            v.add("symbol", "required: BASE-QUOTE", "MATCH_FIELD_REQUIRED")
        elif request.symbol != f"{request.base}-{request.quote}" or not all(
            _SYMBOL.match(part) for part in request.symbol.split("-")
        ):
            v.add(
                "symbol",
                f"must be BASE-QUOTE in upper case ({request.base}-{request.quote})",
                "MATCH_INVALID_SYMBOL",
            )

        amount = functools.partial(_amount, request, v)
        tick, lot = amount("tick_size"), amount("lot_size")
        min_qty = amount("min_quantity", required=False) or lot
        max_qty = amount("max_quantity")
        min_notional = amount("min_notional", positive=False)
        band = amount("price_band", required=False)
        if band is not None and band > 1:
            v.add("price_band", "at most 1 (100%)", "OUT_OF_RANGE")
        if min_qty is not None and max_qty is not None and max_qty < min_qty:
            v.add("max_quantity", "must be >= min_quantity", "OUT_OF_RANGE")
        check_reason(v, request.reason, "why (kept in the journal and shown)")
        v.raise_if_any("MATCH_REQUEST_INVALID")
        assert tick and lot and min_qty and max_qty and min_notional is not None
        base, quote = assets[request.base], assets[request.quote]
        if lot % base.unit or min_qty % lot:
            field = "lot_size" if lot % base.unit else "min_quantity"
            v.add(field, f"must sit on the grids ({base.symbol} minor unit {base.unit})",
                  "MATCH_INVALID_GRID")  # fmt: skip
        if (tick * lot) % quote.unit:
            v.add(
                "tick_size",
                f"tick_size x lot_size must be a whole number of {quote.symbol} minor units "
                f"({quote.unit})",
                "MATCH_INVALID_GRID",
            )
        v.raise_if_any("MATCH_REQUEST_INVALID")
        market = Market(
            symbol=request.symbol, base=base, quote=quote, tick_size=tick, lot_size=lot,
            min_quantity=min_qty, max_quantity=max_qty, min_notional=min_notional,
            price_band=band or Decimal(0),
        )  # fmt: skip
        # Normalized as the journal keeps it ("0.0100" -> "0.01").
        return listed_market(listed_spec(market), assets)

    async def ListListedMarkets(
        self,
        request: match_pb2.ListListedMarketsRequest,
        context: grpc.aio.ServicerContext[
            match_pb2.ListListedMarketsRequest, match_pb2.ListListedMarketsResponse
        ],
    ) -> match_pb2.ListListedMarketsResponse:
        # The table (every writer group's listings), committed with the journal.
        return match_pb2.ListListedMarketsResponse(
            markets=[
                match_pb2.MarketListed.FromString(x.listing) for x in await self._listings.all()
            ]
        )


def _amount(
    request: match_pb2.CreateMarketRequest,
    v: Violations,
    name: str,
    *,
    required: bool = True,
    positive: bool = True,
) -> Decimal | None:
    """A CreateMarket decimal field, or None (with its violation, if any)."""
    text = getattr(request, name)
    if not text:
        if required:
            v.add(name, "required: a decimal string", "MATCH_FIELD_REQUIRED")
        return None
    try:
        value = parse_decimal(text)
    except MoneyError as error:
        v.add(name, str(error), "MATCH_INVALID_DECIMAL")
        return None
    if value < 0 or (positive and value == 0):
        v.add(name, "must be positive" if positive else "must be >= 0", "OUT_OF_RANGE")
        return None
    return value


def _actor() -> str:
    ctx = current_auth()
    if ctx.account_id:
        return ctx.account_id + (f" via svc:{ctx.service}" if ctx.service else "")
    return f"svc:{ctx.service}"


def _key(request_id: str) -> str:
    """A request_id as the tail of a command_id (hashed if long)."""
    return request_id if len(request_id) <= 100 else hashlib.sha256(request_id.encode()).hexdigest()


def _exists(symbol: str) -> AlreadyExists:
    return AlreadyExists(
        "MATCH_MARKET_EXISTS", f"{symbol} is already a market", metadata={"market": symbol}
    )


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _book(engine: MarketEngine, l3: bool, depth: int | None) -> match_pb2.OrderBook:
    market, book = engine.market, engine.book
    out = match_pb2.OrderBook(
        market=market.symbol,
        seq=engine.seq,
        state_hash=engine.state_hash(),
        status=engine.status,
        status_reason=engine.status_reason,
    )
    if l3:
        for view in book.l3():
            orders = out.bid_orders if view.side is Side.BUY else out.ask_orders
            if depth is None or len(orders) < depth:
                order_id, account_id = engine.wire_ids(view.order_id)
                orders.add(
                    order_id=order_id,
                    account_id=account_id,
                    price=market.price(view.price or 0),
                    quantity=market.quantity(view.leaves),
                    priority=view.priority,
                )
        return out
    bids, asks = book.l2(depth)
    for levels, side, target in ((bids, Side.BUY, out.bids), (asks, Side.SELL, out.asks)):
        for price, qty in levels:
            target.append(
                types_pb2.PriceLevel(
                    price=market.price(price),
                    quantity=market.quantity(qty),
                    order_count=book.level_size(side, price),
                )
            )
    return out


async def build_server(
    settings: ChassisSettings,
    *,
    match_settings: MatchSettings | None = None,
    catalog: Catalog | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> Server:
    match_settings = match_settings or MatchSettings.from_env()
    catalog = catalog or load_catalog()
    server = Server(settings)
    # No session reset: the writer's session locks are released explicitly
    # (Journal.ownership); everything else is transaction-scoped.
    infra = await connect(
        server, schema="match", migrations=MIGRATIONS, nats=True, session_reset=False
    )
    assert infra.pool is not None and infra.nats is not None
    journal = Journal(infra.pool, match_settings.group)
    # The writer owns balances and writes the ledger's tables in its commits.
    conn = await asyncpg.connect(require(settings.database_url, "DATABASE_URL"))
    try:
        await migrate(conn, "ledger", LEDGER_MIGRATIONS)
    finally:
        await conn.close()
    funds = Funds(LedgerStore(infra.pool, catalog.assets), catalog)
    js = infra.nats.jetstream()
    await Publisher.ensure_stream(js, match_settings.events_max_age_s or None)
    markets: list[Market] = []
    for symbol in match_settings.markets or tuple(catalog.markets):
        market = catalog.market(symbol)
        if market is None:
            raise ValueError(f"CEX_MATCH_MARKETS names {symbol!r}, which is not a market")
        markets.append(market)
    # Markets this group listed at runtime (ADR 0018), on top of the static catalog.
    listings = Listings(infra.pool)
    for listing in await listings.all(match_settings.group):
        spec = match_pb2.MarketListed.FromString(listing.listing).market
        if spec.symbol not in catalog.markets:
            market = listed_market(spec, catalog.assets)
            catalog.add(market)  # the balance owner settles its trades (Funds)
            markets.append(market)
    service = match_pb2.DESCRIPTOR.services_by_name["MatchService"]
    publishing: list[asyncio.Task[None]] = []

    def publish(market: Market) -> None:
        """Publish a market's committed events (its log) to JetStream from now on."""
        publishing.append(
            asyncio.create_task(
                Publisher(js, writer.logs[market.symbol]).run(), name=f"publish-{market.symbol}"
            )
        )

    async def on_serving(serving: bool) -> None:
        """Publish and take calls while holding the lease; a standby does neither."""
        if serving:
            for log in writer.logs.values():
                publish(log.market)
        else:
            for task in publishing:
                task.cancel()
            await asyncio.gather(*publishing, return_exceptions=True)
            publishing.clear()
        await server.set_serving(service.full_name, serving)

    writer = Sequencer(
        markets,
        journal,
        funds,
        clock=clock,
        max_batch=match_settings.max_batch,
        snapshot_every=match_settings.snapshot_every,
        on_serving=on_serving,
        on_listed=publish,  # a market listed while serving
    )
    await server.set_serving(service.full_name, False)
    await writer.start(ownership_wait_s=match_settings.ownership_wait_s)
    server.on_stop(writer.stop)
    server.on_stop(lambda: on_serving(False))
    if match_settings.journal_retention_every_s > 0:  # rounds run while the writer serves
        retention = Retention(
            journal,
            list(writer.markets),
            retain=match_settings.journal_retain,
            retain_s=match_settings.journal_retain_s,
            readers=match_settings.journal_readers,
            archive_dir=match_settings.journal_archive_dir or None,
            clock=clock,
        )
        rounds = asyncio.create_task(
            retention.run(match_settings.journal_retention_every_s, lambda: writer.serving)
        )
        server.on_stop(lambda: _cancelled(rounds))
    server.add(
        service,
        match_pb2_grpc.add_MatchServiceServicer_to_server,
        MatchService(catalog, writer, match_settings, listings),
        policy=POLICY,
    )
    return server
