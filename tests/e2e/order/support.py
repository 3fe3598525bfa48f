"""Real users on the real stack, through Envoy: accounts, keys, tokens, deposits,
and an order client that carries the user's token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.marketdata.v1 import marketdata_pb2 as md
from cex.marketdata.v1 import marketdata_pb2_grpc
from cex.match.v1 import match_pb2, match_pb2_grpc
from cex.order.v1 import order_pb2, order_pb2_grpc
from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES
from services.chassis import ErrorDetails
from services.chassis.authn import ServiceCredentials
from services.chassis.db import postgres
from services.chassis.listings import listed_market
from services.chassis.markets import DEFAULT_CATALOG, Catalog
from services.chassis.server import background
from services.ledger.store import Store as LedgerStore
from services.match.funds import Funds
from services.match.store import Journal, Listings
from services.match.writer import Sequencer
from tests.replicas import grew, replica_names, served

MATCH = next(s for s in SERVICES if s.name == "match")

BUY, SELL = t.SIDE_BUY, t.SIDE_SELL
MARKET = "BTC-USDT"
_PLACEMENT_ATTEMPTS = 24  # each lands on the wanted one of 2 replicas half the time


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def uid(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass
class Trader:
    account_id: str
    token: str
    orders: order_pb2_grpc.OrderServiceStub

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)

    async def place(self, **fields: object) -> order_pb2.Order:
        fields.setdefault("client_order_id", uid())
        fields.setdefault("market", MARKET)
        fields.setdefault("type", t.ORDER_TYPE_LIMIT)
        reply = await self.orders.PlaceOrder(
            order_pb2.PlaceOrderRequest(**fields),  # type: ignore[arg-type]
            metadata=self.md,
            timeout=20,
        )
        return reply.order

    async def get(self, order_id: str) -> order_pb2.Order:
        reply = await self.orders.GetOrder(
            order_pb2.GetOrderRequest(order_id=order_id), metadata=self.md, timeout=10
        )
        return reply.order

    async def cancel(self, order_id: str) -> order_pb2.Order:
        reply = await self.orders.CancelOrder(
            order_pb2.CancelOrderRequest(order_id=order_id, request_id=uid("r")),
            metadata=self.md,
            timeout=20,
        )
        return reply.order

    async def settled(self, order_id: str, state: int, within_s: float = 10.0) -> order_pb2.Order:
        """The order once the consumer has stored it in `state`."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            order = await self.get(order_id)
            if order.state == state or asyncio.get_running_loop().time() > deadline:
                return order
            await asyncio.sleep(0.05)


class Exchange:
    """Helpers acting as operators with the tests' service credential."""

    def __init__(
        self, stack: Stack, credentials: ServiceCredentials, channel: grpc.aio.Channel
    ) -> None:
        self.traders: list[Trader] = []
        self.homes: dict[str, str] = {}  # account -> its order replica, if several
        self._first_home: int | None = None
        self.stack = stack
        self.credentials = credentials
        self.service_token = ""
        self.channel = channel
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(channel)

    async def keep_token(self) -> None:
        """Hold a valid service token for `svc`, renewed near expiry (a long chaos
        test outlives one token); run it in the background for the test's life."""
        while True:
            self.service_token = await self.credentials.token()
            await asyncio.sleep(15)

    @property
    def svc(self) -> tuple[tuple[str, str]]:
        return bearer(self.service_token)

    async def trader(
        self, funds: dict[str, str] | None = None, name: str = "t", *, withdraw: bool = False
    ) -> Trader:
        """A new account with `funds`, and a token that reads and trades (and
        withdraws, if asked).

        With several order replicas the edge sends each account to one of them (a
        hash of the account), and a test's traders take turns on them, starting
        with the replica that has served least so far: accounts are made until one
        lands where wanted. So a test with two traders uses both replicas, and tests
        with one use each in turn."""
        wanted = await self._next_home()
        for _ in range(_PLACEMENT_ATTEMPTS):
            account_id, token = await self._account(name, withdraw)
            if wanted is None or await self.home_of(token) == wanted:
                break
        else:
            pytest.fail(f"none of {_PLACEMENT_ATTEMPTS} new accounts landed on {wanted}")
        if wanted is not None:
            self.homes[account_id] = wanted
        for asset, amount in (funds or {}).items():
            await self.deposit(account_id, asset, amount)
        trader = Trader(account_id, token, order_pb2_grpc.OrderServiceStub(self.channel))
        self.traders.append(trader)
        return trader

    async def _account(self, name: str, withdraw: bool) -> tuple[str, str]:
        """A new account and a 15-minute token of a key of its (read, trade[, withdraw])."""
        account = await self.auth.CreateAccount(
            auth_pb2.CreateAccountRequest(request_id=uid("acc"), display_name=name),
            metadata=self.svc,
            timeout=10,
        )
        account_id = account.account.account_id
        key = await self.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uid("key"),
                account_id=account_id,
                label="tests",
                scopes=[
                    auth_pb2.API_KEY_SCOPE_READ,
                    auth_pb2.API_KEY_SCOPE_TRADE,
                    *([auth_pb2.API_KEY_SCOPE_WITHDRAW] if withdraw else []),
                ],
                # A withdrawing key needs an allow-list: the tests' address is loopback.
                allowed_cidrs=["127.0.0.0/8"] if withdraw else [],
            ),
            metadata=self.svc,
            timeout=10,
        )
        token = await self.auth.IssueToken(
            auth_pb2.IssueTokenRequest(
                api_key_id=key.api_key.api_key_id,
                api_key_secret=key.secret,
                ttl=duration_pb2.Duration(seconds=900),  # the longest auth gives: a whole test
            ),
            timeout=10,
        )
        return account_id, token.access_token

    async def _next_home(self) -> str | None:
        """The order replica the next trader should live on (None: only one)."""
        names = replica_names(self.stack, "order")
        if len(names) == 1:
            return None
        if self._first_home is None:
            counts = await served(self.stack, "order")
            self._first_home = names.index(min(names, key=lambda n: counts[n]))
        return names[(self._first_home + len(self.traders)) % len(names)]

    async def home_of(self, token: str) -> str:
        """The order replica the edge sends this token's account to: the one whose
        count of ListFills went up by a ListFills of the account's."""
        stub = order_pb2_grpc.OrderServiceStub(self.channel)
        for _ in range(5):  # again if another ListFills ran at the same time
            before = await served(self.stack, "order", "ListFills")
            await stub.ListFills(
                order_pb2.ListFillsRequest(page_size=1), metadata=bearer(token), timeout=10
            )
            moved = grew(before, await served(self.stack, "order", "ListFills"))
            if len(moved) == 1:
                return moved.pop()
        pytest.fail("could not tell which order replica serves an account")

    async def assert_stayed_home(self) -> None:
        """Each trader's calls still go to the replica it was placed on (the edge's
        hash is sticky: what a replica answered and has not stored yet is only there)."""
        now = {t.account_id: await self.home_of(t.token) for t in self.traders}
        assert now == self.homes, f"accounts moved between order replicas: {self.homes} -> {now}"

    async def clean_up(self) -> None:
        """Cancel what the test's traders left working (the book is shared by all tests)."""
        for trader in self.traders:
            await trader.orders.CancelAllOrders(
                order_pb2.CancelAllOrdersRequest(request_id=uid("clean")),
                metadata=trader.md,
                timeout=20,
            )

    async def lift_limits(
        self, *traders: Trader, per_second: int = 10_000, open_orders: int = 100_000
    ) -> None:
        """Risk limits of the traders' own, above what a burst needs (the defaults,
        100 orders/s and 1,000 open, are not what such a test is about)."""
        risk = risk_pb2_grpc.RiskServiceStub(self.channel)
        for trader in traders:
            await risk.SetLimits(
                risk_pb2.SetLimitsRequest(
                    request_id=uid("l"),
                    limits=risk_pb2.Limits(
                        account_id=trader.account_id,
                        max_orders_per_second=per_second,
                        max_open_orders=open_orders,
                    ),
                ),
                metadata=self.svc,
                timeout=10,
            )

    async def deposit(self, account_id: str, asset: str, amount: str) -> None:
        tid = uid("dep")
        reply = await self.ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(
                transfers=[
                    ledger_pb2.Transfer(
                        id=tid,
                        debit_account_id="sys:custody",
                        credit_account_id=account_id,
                        asset=asset,
                        amount=amount,
                        kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                        reference=tid,
                    )
                ]
            ),
            metadata=self.svc,
            timeout=10,
        )
        assert reply.results[0].status.code == 0, reply.results[0].status

    async def balances(self, account_id: str) -> dict[str, tuple[Decimal, Decimal]]:
        """asset -> (available, held)."""
        reply = await self.ledger.GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=account_id), metadata=self.svc, timeout=10
        )
        return {b.asset: (Decimal(b.available), Decimal(b.held)) for b in reply.balances}

    async def audit(self) -> ledger_pb2.AuditLedgerResponse:
        return await self.ledger.AuditLedger(
            ledger_pb2.AuditLedgerRequest(), metadata=self.svc, timeout=30
        )

    async def assert_balanced(self, within_s: float = 30.0) -> None:
        """The ledger audit passes within `within_s` (what a killed writer committed
        may take a moment to reach the audit's reads)."""
        for _ in range(int(within_s / 0.5)):
            audit = await self.audit()
            if audit.balanced:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"the ledger audit does not balance: {audit}")

    async def held(
        self, account_id: str, asset: str, want: Decimal, within_s: float = 10.0
    ) -> Decimal:
        """The account's held amount of `asset` once it equals `want`, or as it is."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            got = (await self.balances(account_id)).get(asset, (Decimal(0), Decimal(0)))[1]
            if got == want or asyncio.get_running_loop().time() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def hold_settles(
        self, account_id: str, expect: dict[str, tuple[str, str]], within_s: float = 10.0
    ) -> dict[str, tuple[Decimal, Decimal]]:
        """Balances once they equal `expect` (asset -> (available, held)), or as they are."""
        want = {a: (Decimal(v[0]), Decimal(v[1])) for a, v in expect.items()}
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            found = await self.balances(account_id)
            got = {a: found.get(a, (Decimal(0), Decimal(0))) for a in want}
            if got == want or asyncio.get_running_loop().time() > deadline:
                return got
            await asyncio.sleep(0.05)


def error_of(failure: BaseException) -> ErrorDetails:
    assert isinstance(failure, grpc.RpcError)
    return ErrorDetails.from_rpc_error(failure)


def fields(details: ErrorDetails) -> Sequence[str]:
    return [v.field for v in details.violations]


@contextlib.asynccontextmanager
async def exchange_of(stack: Stack) -> AsyncIterator[Exchange]:
    """An Exchange through `stack`'s edge with the tests' own credential on it."""
    async with (
        grpc.aio.insecure_channel(stack.edge) as channel,
        exchange_on(stack, stack.credentials("tests"), channel) as exchange,
    ):
        yield exchange


@contextlib.asynccontextmanager
async def exchange_on(
    stack: Stack, credentials: ServiceCredentials, channel: grpc.aio.Channel
) -> AsyncIterator[Exchange]:
    """An Exchange on `channel` holding a fresh service token; cleans up after."""
    exchange = Exchange(stack, credentials, channel)
    exchange.service_token = await credentials.token()
    async with background(exchange.keep_token(), "service token"):
        try:
            yield exchange
        finally:
            await exchange.clean_up()
        if exchange.homes:
            await exchange.assert_stayed_home()


async def session_owners(database_url: str) -> dict[str, str]:
    """Open session -> the replica holding it (`order`, `order-2`, ...; "" if detached)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch('SELECT session_id, owner FROM "order".sessions WHERE open')
    finally:
        await conn.close()
    return {r["session_id"]: (r["owner"] or "").split("/")[0] for r in rows}


async def _healthy(stack: Stack, name: str, replica: int = 1, *, serving: bool = True) -> bool:
    """The component answers; a service's replica also serves its service (with
    `serving`; a writer's standby does not until it takes over)."""
    spec = next((s for s in SERVICES if s.name == name), None)
    if spec is None:  # infrastructure: the supervisor's own probe
        return await stack.component(name).probe()
    target = f"{stack.ports.host}:{stack.ports.grpc(spec, replica)}"
    service = spec.grpc_service if serving else ""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.aio.AioRpcError:
        return False


async def kill(stack: Stack, name: str) -> None:
    """SIGKILL the component (a service, or postgres, nats, redis) and wait until the
    supervisor's restart of it is healthy again."""
    component = stack.component(name)
    assert component.process is not None
    old = component.process.pid
    os.kill(old, signal.SIGKILL)
    for _ in range(300):
        if component.process.pid != old and await _healthy(stack, name):
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"{name} did not come back: {stack.log_tail(name)}")


async def _writer(stack: Stack) -> int:
    """The match replica that writes: the one whose health says it serves MatchService."""
    replicas = range(1, stack.replica_count(MATCH) + 1)
    serving = [r for r in replicas if await _healthy(stack, "match", r)]
    assert len(serving) == 1, f"match replicas serving: {serving}"
    return serving[0]


async def writer_of(stack: Stack) -> str:
    """The component name of the match replica that writes (`match` or `match-2`)."""
    return stack.replica_name(MATCH, await _writer(stack))


async def kill_writer(stack: Stack) -> float:
    """SIGKILL whichever match replica writes (the one serving MatchService) and return
    the seconds until another replica serves it: its standby's takeover. Then wait
    for the killed one to be back, standing by, so that a next kill has a standby."""
    replicas = range(1, stack.replica_count(MATCH) + 1)
    writer = await _writer(stack)
    component = stack.component(stack.replica_name(MATCH, writer))
    assert component.process is not None
    old = component.process.pid
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    others = [r for r in replicas if r != writer]
    while not any([await _healthy(stack, "match", r) for r in others]):
        if time.monotonic() - killed > 60:
            pytest.fail(f"no standby took over: {stack.log_tail(component.name)}")
        await asyncio.sleep(0.01)
    takeover = time.monotonic() - killed
    for _ in range(300):
        up = component.process.pid != old
        if up and await _healthy(stack, "match", writer, serving=False):
            return takeover
        await asyncio.sleep(0.2)
    pytest.fail(f"{component.name} did not come back: {stack.log_tail(component.name)}")


async def book_of(exchange: Exchange, accounts: set[str]) -> dict[str, Decimal]:
    """Match's resting orders of `accounts` on BTC-USDT: order id -> remaining quantity."""
    stub = match_pb2_grpc.MatchServiceStub(exchange.channel)
    reply = await stub.GetOrderBook(
        match_pb2.GetOrderBookRequest(market="BTC-USDT", level=match_pb2.BOOK_LEVEL_L3),
        metadata=exchange.svc,
        timeout=10,
    )
    book = reply.book
    return {
        o.order_id: Decimal(o.quantity)
        for o in (*book.bid_orders, *book.ask_orders)
        if o.account_id in accounts
    }


async def working_of(trader: Trader) -> dict[str, order_pb2.Order]:
    out: dict[str, order_pb2.Order] = {}
    token = ""
    while True:
        page = await trader.orders.ListOrders(
            order_pb2.ListOrdersRequest(
                status=order_pb2.ORDER_STATUS_FILTER_OPEN, page_size=1000, page_token=token
            ),
            metadata=trader.md,
            timeout=10,
        )
        out.update({o.order_id: o for o in page.orders})
        token = page.next_page_token
        if not token:
            return out


async def agreed(
    exchange: Exchange, *traders: Trader, within_s: float = 60.0
) -> tuple[dict[str, Decimal], dict[str, order_pb2.Order]]:
    """Match's book of the traders' orders (id -> remaining) and order's working
    orders of theirs, once the two agree; fails the test with the difference."""
    ours = {t.account_id for t in traders}
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        book = await book_of(exchange, ours)
        working: dict[str, order_pb2.Order] = {}
        for trader in traders:
            working.update(await working_of(trader))
        views = {oid: Decimal(o.remaining_quantity) for oid, o in working.items()}
        if views == book:
            return book, working
        if asyncio.get_running_loop().time() > deadline:
            only_order = {k: working[k] for k in set(views) - set(book)}
            only_match = {k: book[k] for k in set(book) - set(views)}
            differ = {k: (views[k], book[k]) for k in set(views) & set(book) if views[k] != book[k]}
            pytest.fail(f"order and match disagree: {only_order=} {only_match=} {differ=}")
        await asyncio.sleep(0.5)


async def journal_replays(exchange: Exchange) -> None:
    """A replay of match's journal from its latest snapshot, books AND balances,
    equals what a restarted writer recovers (the balances from the ledger's tables):
    every balance change the writer committed is in its journal (ADR 0013)."""
    async with postgres(exchange.stack.database_url, schema="match") as pool:
        # The static catalog and the markets listed at runtime (ADR 0018), as match
        # loads them at start.
        catalog = Catalog(
            dict(DEFAULT_CATALOG.assets), dict(DEFAULT_CATALOG.markets), DEFAULT_CATALOG.fees
        )
        markets = list(catalog.markets.values())
        for listing in await Listings(pool).all("main"):
            spec = match_pb2.MarketListed.FromString(listing.listing).market
            market = listed_market(spec, catalog.assets)
            if catalog.add(market):
                markets.append(market)
        funds = Funds(LedgerStore(pool, catalog.assets), catalog)
        writer = Sequencer(markets, Journal(pool, "main"), funds, clock=time.time_ns)
        await writer.verify()


async def settled_and_balanced(
    exchange: Exchange, seller: Trader, buyer: Trader, working: dict[str, order_pb2.Order]
) -> None:
    """Each side holds exactly what its working orders at 100 still need (the ledger's
    consumer may take its ack_wait, 30 s, to see again what a killed ledger had
    fetched), and the ledger audit passes."""
    want_btc = sum(
        (Decimal(o.remaining_quantity) for o in working.values() if o.side == SELL), Decimal(0)
    )
    want_usdt = sum(
        (Decimal(o.remaining_quantity) * 100 for o in working.values() if o.side == BUY),
        Decimal(0),
    )
    got_btc = await exchange.held(seller.account_id, "BTC", want_btc, within_s=60)
    got_usdt = await exchange.held(buyer.account_id, "USDT", want_usdt, within_s=60)
    assert (got_btc, got_usdt) == (want_btc, want_usdt)
    await exchange.assert_balanced()


class Session:
    """One market maker's stream (StreamOrders), read in the background."""

    def __init__(self, trader: Trader, stub: order_pb2_grpc.OrderServiceStub) -> None:
        self.trader = trader
        self.outbox: asyncio.Queue[order_pb2.StreamOrdersRequest | None] = asyncio.Queue()
        self.call = stub.StreamOrders(self._requests(), metadata=trader.md)
        self.received: list[order_pb2.StreamOrdersResponse] = []
        self.ended: BaseException | None = None
        self.reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[order_pb2.StreamOrdersRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.received.append(message)
        except BaseException as error:  # the stream broke (its replica was killed)
            self.ended = error
            raise

    async def wait_for(self, kind: str, count: int = 1, within_s: float = 15.0) -> list[object]:
        async with asyncio.timeout(within_s):
            while True:
                found = [getattr(m, kind) for m in self.received if m.WhichOneof("payload") == kind]
                if len(found) >= count:
                    return found
                if self.reader.done():
                    pytest.fail(f"stream ended waiting for {kind}: {self.ended!r}")
                await asyncio.sleep(0.02)

    async def subscribe(self, **fields: object) -> order_pb2.StreamSubscribed:
        subscribe = order_pb2.StreamSubscribe(**fields)  # type: ignore[arg-type]
        await self.outbox.put(order_pb2.StreamOrdersRequest(subscribe=subscribe))
        return (await self.wait_for("subscribed"))[0]  # type: ignore[return-value]

    async def quote(self, side: int, price: str, quantity: str = "0.1") -> str:
        before = len([m for m in self.received if m.HasField("ack") or m.HasField("reject")])
        await self.outbox.put(
            order_pb2.StreamOrdersRequest(
                place=order_pb2.PlaceOrderRequest(
                    client_order_id=uid(), market="BTC-USDT", side=side,  # type: ignore[arg-type]
                    type=t.ORDER_TYPE_LIMIT, price=price, quantity=quantity,
                )
            )
        )  # fmt: skip
        async with asyncio.timeout(15):
            while True:
                answers = [m for m in self.received if m.HasField("ack") or m.HasField("reject")]
                if len(answers) > before:
                    answer = answers[before]
                    assert answer.HasField("ack"), answer
                    return answer.ack.place.order.order_id
                await asyncio.sleep(0.02)

    def reports(self) -> list[order_pb2.ExecutionReport]:
        return [m.execution_report for m in self.received if m.HasField("execution_report")]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.outbox.put(None)
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


class BookWatcher:
    """A StreamOrderBook subscriber of `market`, read in the background: each status
    it was told (a change appended once) and every ask price it saw."""

    def __init__(self, channel: grpc.aio.Channel, market: str) -> None:
        stub = marketdata_pb2_grpc.MarketDataServiceStub(channel)
        self.call = stub.StreamOrderBook(md.StreamOrderBookRequest(market=market, depth=10))
        self.statuses: list[int] = []
        self.asks: list[str] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            part = getattr(message, message.WhichOneof("kind") or "snapshot")
            if not self.statuses or self.statuses[-1] != part.status:
                self.statuses.append(part.status)
            self.asks += [level.price for level in part.asks]

    async def sees(self, check: Callable[[], bool], within_s: float = 15.0) -> None:
        async with asyncio.timeout(within_s):
            while not check():
                assert not self.task.done(), self.task
                await asyncio.sleep(0.05)

    async def sees_status(self, status: int) -> None:
        await self.sees(lambda: bool(self.statuses) and self.statuses[-1] == status)

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
