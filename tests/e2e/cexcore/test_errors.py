"""Each CCXT exception class that `cexcore` raises, provoked once on the real
stack; the class comes from the ErrorInfo reason of the google.rpc.Status the
edge answers (never from its message), and the reason is in the exception's text."""

from __future__ import annotations

import uuid
from pathlib import Path

import ccxt
import grpc
import pytest

from cex.risk.v1 import risk_pb2, risk_pb2_grpc
from cex_ccxt import async_support
from cex_stack.supervisor import Stack
from cex_stack.topology import SERVICES, free_ports
from services.chassis import ServiceCredentials
from tests.e2e.cexcore.conftest import MakeUser
from tests.e2e.test_edge import _second_edge

BTC = "BTC/USDT"


async def test_each_error_class_once(make_user: MakeUser) -> None:
    user = await make_user({"USDT": "100"})
    exchange = user.aio()
    stranger = async_support.cexcore({**user.config, "secret": "sk_not-the-secret"})
    try:
        await exchange.load_markets()
        with pytest.raises(ccxt.InsufficientFunds, match="LEDGER_INSUFFICIENT_FUNDS"):
            await exchange.create_order(BTC, "limit", "buy", 5, 100)
        with pytest.raises(ccxt.InvalidOrder, match="ORDER_NOTIONAL_TOO_SMALL"):
            await exchange.create_order(BTC, "limit", "buy", 0.01, 100)
        with pytest.raises(ccxt.OrderNotFound, match="ORDER_NOT_FOUND"):
            await exchange.fetch_order("o-no-such-order", BTC)
        with pytest.raises(ccxt.OrderNotFound):
            await exchange.cancel_order("o-no-such-order", BTC)
        with pytest.raises(ccxt.AuthenticationError, match="AUTH_"):
            await stranger.fetch_balance()
        with pytest.raises(ccxt.PermissionDenied, match="AUTH_SCOPE_MISSING"):
            await exchange.withdraw("USDT", 10, "0x1111111111111111111111111111111111111111")
        with pytest.raises(ccxt.BadRequest, match="EDGE_UNKNOWN_FIELD"):
            await exchange.create_order(BTC, "limit", "buy", 0.1, 100, {"post_onyl": True})
        with pytest.raises(ccxt.ArgumentsRequired, match="needs a price"):
            await exchange.create_order(BTC, "limit", "buy", 0.1)
        with pytest.raises(ccxt.InvalidOrder, match="'stop'"):
            await exchange.create_order(BTC, "stop", "buy", 0.1, 100)
    finally:
        await exchange.close()
        await stranger.close()


async def test_an_account_over_its_order_rate_gets_rate_limit_exceeded(
    stack: Stack, service_credentials: ServiceCredentials, make_user: MakeUser
) -> None:
    user = await make_user({"USDT": "100"})
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        await risk_pb2_grpc.RiskServiceStub(channel).SetLimits(
            risk_pb2.SetLimitsRequest(
                request_id=uuid.uuid4().hex,
                limits=risk_pb2.Limits(account_id=user.account_id, max_orders_per_second=2),
            ),
            metadata=(("authorization", f"Bearer {await service_credentials.token()}"),),
            timeout=10,
        )
    exchange = user.aio()
    try:
        with pytest.raises(ccxt.RateLimitExceeded, match="RISK_RATE_LIMITED"):
            for _ in range(40):  # risk reloads limits every 0.5 s: until it applies 2/s
                await exchange.create_order(BTC, "limit", "buy", 0.06, 95.5)
    finally:
        await exchange.close()


async def test_a_service_behind_the_edge_away_is_exchange_not_available(
    stack: Stack, tmp_path: Path
) -> None:
    """A second Envoy like the stack's whose market data cluster points at a port
    nothing listens on: the edge answers UNAVAILABLE (EDGE_UNAVAILABLE)."""
    marketdata = next(s for s in SERVICES if s.name == "marketdata")
    live, dead = stack.ports.grpc(marketdata), free_ports().edge

    def away(node: object) -> None:
        if isinstance(node, dict):
            if node.get("port_value") == live:
                node["port_value"] = dead
            for value in node.values():
                away(value)
        elif isinstance(node, list):
            for value in node:
                away(value)

    def change(config: dict[str, object]) -> None:
        clusters = config["static_resources"]["clusters"]  # type: ignore[index]
        away(next(c for c in clusters if c["name"] == "marketdata"))

    async with _second_edge(stack, tmp_path, change=change) as edge:
        exchange = async_support.cexcore({"hostname": edge})
        try:
            with pytest.raises(ccxt.ExchangeNotAvailable, match="UNAVAILABLE"):
                await exchange.fetch_markets()
        finally:
            await exchange.close()
