"""A market listed at runtime (ADR 0018), on the writer and its standby, on a real
PostgreSQL: the listing is a journaled command (the market's first), kept in the
markets table in the same commit; the standby's replay builds the market from the
journal, a restart from the table (its snapshot is later than the listing), and
both agree with the writer byte for byte."""

from __future__ import annotations

import asyncio
import time

import grpc

from cex.ledger.v1 import ledger_pb2 as K
from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import ErrorDetails, postgres
from services.chassis.listings import listed_market, listed_spec
from services.chassis.markets import DEFAULT_CATALOG, Catalog, Market
from services.ledger.store import Store as LedgerStore
from services.match.engine import decode
from services.match.funds import Funds
from services.match.server import MIGRATIONS
from services.match.store import Journal, Listings
from services.match.writer import Sequencer
from tests.integration.match.match_client import limit, place
from tests.integration.match.test_writer import (
    _funds,
    _held,
    _ledger_migrated,
    _transfer,
    _until,
)

OLD = DEFAULT_CATALOG.markets["BTC-USDT"]
NEW = Market(
    symbol="BTC-ETH", base=DEFAULT_CATALOG.assets["BTC"], quote=DEFAULT_CATALOG.assets["ETH"],
    tick_size=OLD.tick_size.scaleb(-1), lot_size=OLD.lot_size, min_quantity=OLD.lot_size,
    max_quantity=OLD.max_quantity, min_notional=OLD.min_notional.scaleb(-3),
)  # fmt: skip


def _catalog() -> Catalog:
    """A service's own copy (listings are added to it)."""
    catalog = DEFAULT_CATALOG
    return Catalog(dict(catalog.assets), dict(catalog.markets), catalog.fees)


def _listing(request_id: str, market: Market = NEW, reason: str = "new pair") -> match_pb2.Command:
    return match_pb2.Command(
        command_id=f"list:{request_id}",
        market=market.symbol,
        list_market=match_pb2.ListMarketCommand(
            market=listed_spec(market), reason=reason, request_id=request_id, listed_by="admin"
        ),
    )


async def _submit(writer: Sequencer, command: match_pb2.Command) -> match_pb2.CommandResult:
    if not command.market:
        return await writer.submit_funds(command)
    market = writer.markets.get(command.market) or listed_market(command.list_market.market)
    return await writer.submit(decode(market, command))


async def test_a_listed_market_trades_replays_on_the_standby_and_survives_a_restart(
    fresh_database_url: str,
) -> None:
    await _ledger_migrated(fresh_database_url)
    async with postgres(fresh_database_url, schema="match", migrations=MIGRATIONS) as pool:
        started: list[str] = []

        def writer(markets: list[Market], catalog: Catalog) -> Sequencer:
            funds = Funds(LedgerStore(pool, catalog.assets), catalog)
            return Sequencer(
                markets, Journal(pool, "main"), funds, clock=time.time_ns, snapshot_every=3,
                on_listed=lambda market: started.append(market.symbol),
            )  # fmt: skip

        first, second = writer([OLD], _catalog()), writer([OLD], _catalog())
        await first.start()
        await second.start()
        try:

            async def ok(command: match_pb2.Command) -> match_pb2.CommandResult:
                result = await _submit(first, command)
                assert result.status.code == 0, result.status
                return result

            deposit = K.TRANSFER_KIND_DEPOSIT
            single = match_pb2.FundsTransfer.OP_SINGLE
            await ok(_funds("f1",
                _transfer("d1", single, "sys:custody", "buyer", "ETH", "100", kind=deposit),
                _transfer("d2", single, "sys:custody", "seller", "BTC", "2", kind=deposit),
            ))  # fmt: skip
            listed = await ok(_listing("l1"))
            (event,) = listed.events
            assert event.seq == 1 and event.market == NEW.symbol
            assert event.market_listed.market == listed_spec(NEW)
            assert event.market_listed.listed_by == "admin"
            assert started == [NEW.symbol] and NEW.symbol in first.markets
            (row,) = await Listings(pool).all("main")
            assert row.symbol == NEW.symbol and row.group_seq == 2  # after the deposits
            assert match_pb2.MarketListed.FromString(row.listing) == event.market_listed

            # The same request again: the first answer; another listing of it: refused.
            again = await _submit(first, _listing("l1"))
            assert again.duplicate and list(again.events) == list(listed.events)
            other = await _submit(first, _listing("l2"))
            assert other.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            assert ErrorDetails.from_status(other.status).reason == "MATCH_MARKET_EXISTS"
            taken = await _submit(first, _listing("l3", OLD))  # a static market
            assert ErrorDetails.from_status(taken.status).reason == "MATCH_MARKET_EXISTS"

            # It trades, funds held and settled like any market's.
            ask = _held(limit("s1", "seller", t.SIDE_SELL, "1", "20"), "BTC", "1")
            bid = _held(limit("b1", "buyer", t.SIDE_BUY, "0.5", "20.5"), "ETH", "10.25")
            for number, order in enumerate((ask, bid)):
                command = place(f"p{number}", order)
                command.market = NEW.symbol
                await ok(command)
            assert first.engines[NEW.symbol].book.l2(None)[1]  # half the ask rests
            assert first.logs[NEW.symbol].committed_seq > 1
            await _until(lambda: second.following is not None
                         and second.following.group_seq == first.group_seq)  # fmt: skip
            assert NEW.symbol in second.following.engines  # type: ignore[union-attr]
            assert await first.replayed() == first.document()
            await first.verify()

            # A restart: the latest snapshot holds the new market; the table gives it.
            for _ in range(100):
                if (snapshot := await first._journal.latest_snapshot()) is not None:
                    break
                await asyncio.sleep(0.05)
            assert snapshot is not None
            assert NEW.symbol.encode() in snapshot.state
            listings = await Listings(pool).all("main")
            catalog = _catalog()
            markets = [OLD]
            for listing in listings:
                market = listed_market(match_pb2.MarketListed.FromString(listing.listing).market)
                catalog.add(market)
                markets.append(market)
            restarted = writer(markets, catalog)
            await restarted.verify()
            assert restarted.state_hash() == first.state_hash()

            # The standby takes over (the writer's session ends) with the new market.
            pid = first._lease.conn.get_server_pid()
            await pool.execute("SELECT pg_terminate_backend($1)", pid)
            await _until(lambda: second.serving)
            assert second.state_hash() == first.state_hash()
            assert NEW.symbol in second.markets and NEW.symbol in second.logs
            more = place("p9", _held(limit("b2", "buyer", t.SIDE_BUY, "0.5", "20"), "ETH", "10"))
            more.market = NEW.symbol
            result = await _submit(second, more)
            assert result.status.code == 0, result.status
            assert [e.WhichOneof("kind") for e in result.events][:2] == ["accepted", "trade"]
            await second.verify()
        finally:
            await first.stop()
            await second.stop()
