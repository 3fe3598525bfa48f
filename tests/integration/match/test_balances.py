"""The writer owns balances (ADR 0013): an order's hold is decided before the book, its
trades are settled after it, and both are in the ledger's tables when the command is
answered, because they are committed with the journal. A refused hold journals nothing.
A restarted writer goes on from the tables; a second writer group cannot start."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import grpc
import pytest

from cex.ledger.v1 import ledger_pb2 as K
from cex.match.v1 import match_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import ChassisSettings, ErrorDetails
from services.match.config import MatchSettings
from services.match.server import build_server
from tests.conftest import Trust
from tests.integration.ledger.support import Ledger, deposit, running_ledger
from tests.integration.match.match_client import Client, limit, place

BUYER, SELLER = "bal-buyer", "bal-seller"


def held(command: match_pb2.PlaceCommand, asset: str, amount: str) -> match_pb2.PlaceCommand:
    command.hold_asset, command.hold_amount = asset, amount
    return command


async def balance(ledger: Ledger, account: str, asset: str) -> tuple[Decimal, Decimal]:
    """(available, held)"""
    found = await ledger.balance(account, asset)
    return Decimal(found.available), Decimal(found.held)


async def journaled(database_url: str, command_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM match.journal WHERE command_id = $1", command_id
            )
        )
    finally:
        await conn.close()


async def test_holds_trades_and_releases_are_committed_with_the_journal(
    fresh_database_url: str, trust: Trust, private_nats: str
) -> None:
    async with running_ledger(fresh_database_url, trust, private_nats) as ledger:
        await ledger.ok(deposit("d-buyer", BUYER, "1000"), deposit("d-seller", SELLER, "1", "BTC"))
        match = Client(ledger.match)

        # More than the buyer has: refused before the book, nothing journaled or held.
        (refused,) = await match.submit(
            [place("p-big", held(limit("big", BUYER, t.SIDE_BUY, "20", "100"), "USDT", "2000"))]
        )
        assert refused.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert ErrorDetails.from_status(refused.status).reason == "LEDGER_INSUFFICIENT_FUNDS"
        assert not refused.events
        assert await journaled(fresh_database_url, "p-big") == 0
        assert await balance(ledger, BUYER, "USDT") == (Decimal(1000), 0)

        # A resting sell holds its base quantity.
        (sell,) = await match.submit(
            [place("p-sell", held(limit("sell", SELLER, t.SIDE_SELL, "0.5", "100"), "BTC", "0.5"))]
        )
        assert sell.status.code == 0, sell.status
        assert await balance(ledger, SELLER, "BTC") == (Decimal("0.5"), Decimal("0.5"))

        # A crossing buy: held, matched and settled by the time it is answered. The
        # taker pays 0.1 % of the base it receives, the maker 0.05 % of the quote.
        (buy,) = await match.submit(
            [place("p-buy", held(limit("buy", BUYER, t.SIDE_BUY, "0.2", "100"), "USDT", "20"))]
        )
        assert [e.WhichOneof("kind") for e in buy.events].count("trade") == 1
        assert await balance(ledger, BUYER, "USDT") == (Decimal(980), 0)
        assert await balance(ledger, BUYER, "BTC") == (Decimal("0.1998"), 0)
        assert await balance(ledger, SELLER, "USDT") == (Decimal("19.99"), 0)
        assert await balance(ledger, SELLER, "BTC") == (Decimal("0.5"), Decimal("0.3"))

        # A cancel releases what the order still holds.
        cancel = match_pb2.CancelCommand(order_id="sell", account_id=SELLER)
        (cancelled,) = await match.submit(
            [match_pb2.Command(command_id="c-sell", market="BTC-USDT", cancel=cancel)]
        )
        assert "cancelled" in [e.WhichOneof("kind") for e in cancelled.events]
        assert await balance(ledger, SELLER, "BTC") == (Decimal("0.8"), 0)
        audit = await ledger.audit()
        assert audit.balanced, audit

        # The same command again is its first outcome, and moves nothing twice.
        (again,) = await match.submit(
            [place("p-buy", held(limit("buy", BUYER, t.SIDE_BUY, "0.2", "100"), "USDT", "20"))]
        )
        assert again.duplicate and list(again.events) == list(buy.events)
        assert await balance(ledger, BUYER, "USDT") == (Decimal(980), 0)


async def test_a_restarted_writer_goes_on_from_the_tables(
    fresh_database_url: str, trust: Trust, private_nats: str
) -> None:
    async with running_ledger(fresh_database_url, trust, private_nats) as ledger:
        await ledger.ok(deposit("d-buyer", BUYER, "100"))
        (first,) = await Client(ledger.match).submit(
            [place("p-1", held(limit("o-1", BUYER, t.SIDE_BUY, "0.6", "100"), "USDT", "60"))]
        )
        assert first.status.code == 0
    # A new writer on the same database: the 60 held is still held, so 60 more is refused.
    async with running_ledger(fresh_database_url, trust, private_nats) as ledger:
        assert await balance(ledger, BUYER, "USDT") == (Decimal(40), Decimal(60))
        match = Client(ledger.match)
        (second,) = await match.submit(
            [place("p-2", held(limit("o-2", BUYER, t.SIDE_BUY, "0.6", "100"), "USDT", "60"))]
        )
        assert ErrorDetails.from_status(second.status).reason == "LEDGER_INSUFFICIENT_FUNDS"
        cancel = match_pb2.CancelCommand(order_id="o-1", account_id=BUYER)
        await match.submit([match_pb2.Command(command_id="c-1", market="BTC-USDT", cancel=cancel)])
        (third,) = await match.submit(
            [place("p-2", held(limit("o-2", BUYER, t.SIDE_BUY, "0.6", "100"), "USDT", "60"))]
        )
        assert third.status.code == 0, third.status
        assert await balance(ledger, BUYER, "USDT") == (Decimal(40), Decimal(60))
        transfers = await ledger.stub.ListTransfers(K.ListTransfersRequest(account_id=BUYER))
        assert {x.id for x in transfers.transfers} >= {"hold:o-1", "release:o-1", "hold:o-2"}


async def test_one_writer_group_owns_the_balances(
    fresh_database_url: str, trust: Trust, private_nats: str
) -> None:
    """A second group on the same database cannot start: it would decide on balances
    the first one holds in memory."""
    async with running_ledger(fresh_database_url, trust, private_nats):
        settings = ChassisSettings(
            service="match",
            database_url=fresh_database_url,
            nats_url=private_nats,
            jwks_url=trust.jwks_url,
        )
        other = MatchSettings(group="other", markets=("ETH-USDT",), ownership_wait_s=0.5)
        with pytest.raises(RuntimeError, match="balances"):
            await build_server(settings, match_settings=other)
