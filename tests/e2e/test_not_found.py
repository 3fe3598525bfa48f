"""Another account's resource is NOT_FOUND everywhere (issue 19).

Through the edge, a user (mallory, scopes read, trade and withdraw, not admin)
names alice's existing ids in every public method that takes one (enumerated
from proto/cex/*/v1/*.proto: order ids, client order ids, API key ids, transfer
ids, deposit ids, withdrawal ids, saga ids, withdrawal address ids, account
ids), and then ids of the same shape that exist nowhere. The two answers must
be indistinguishable: the same code, the same ErrorInfo reason and domain, the
same message once the id itself is blanked out; so an id cannot be probed.
Where the call is refused, it is NOT_FOUND (GetSaga, ListSagas,
ApproveWithdrawal and RejectWithdrawal refuse a non-admin whatever the id:
PERMISSION_DENIED by scope, before any id is looked at).

Methods of match (every one INTERNAL) and the catalogue of market data (no
account's resources) take no id of an account's resource.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2 as L
from cex.ledger.v1 import ledger_pb2_grpc
from cex.order.v1 import order_pb2 as O
from cex.order.v1 import order_pb2_grpc
from cex.risk.v1 import risk_pb2 as R
from cex.risk.v1 import risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from cex_stack.funds import chain_deposit
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails, ServiceCredentials
from tests.e2e.order.support import Exchange, bearer, exchange_on, uid
from tests.integration.funding.support import ETH_ADDRESS

NF = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class User:
    account_id: str
    api_key_id: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)


@dataclass
class Alices:
    """alice's ids, one of each kind a public method takes."""

    account_id: str
    api_key_id: str
    order_id: str
    client_order_id: str
    transfer_id: str
    deposit_id: str
    withdrawal_id: str
    saga_id: str
    address_id: str  # a withdrawal address on her allowlist


def lookalike(real: str) -> str:
    """An id of the same shape as `real` (its prefix kept, every other letter and
    digit drawn anew) that names nothing."""
    cut = max(real.find("_"), real.find("-")) + 1
    out = []
    for c in real[cut:]:
        if c.isdigit():
            out.append(random.choice(string.digits))
        elif c.islower():
            out.append(random.choice(string.ascii_lowercase))
        elif c.isupper():
            out.append(random.choice(string.ascii_uppercase))
        else:
            out.append(c)
    return real[:cut] + "".join(out)


async def _user(exchange: Exchange, name: str) -> User:
    auth = exchange.auth
    account = await auth.CreateAccount(
        auth_pb2.CreateAccountRequest(request_id=uid("acc"), display_name=name),
        metadata=exchange.svc,
        timeout=10,
    )
    account_id = account.account.account_id
    key = await auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            request_id=uid("key"),
            account_id=account_id,
            label=name,
            scopes=[
                auth_pb2.API_KEY_SCOPE_READ,
                auth_pb2.API_KEY_SCOPE_TRADE,
                auth_pb2.API_KEY_SCOPE_WITHDRAW,
            ],
            allowed_cidrs=["0.0.0.0/0", "::/0"],
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    token = await auth.IssueToken(
        auth_pb2.IssueTokenRequest(api_key_id=key.api_key.api_key_id, api_key_secret=key.secret),
        timeout=10,
    )
    return User(account_id, key.api_key.api_key_id, token.access_token)


async def _alices(stack: Stack, exchange: Exchange, alice: User) -> Alices:
    """alice deposits through the chain, rests a buy order and withdraws."""
    channel = exchange.channel
    funding = funding_pb2_grpc.FundingServiceStub(channel)
    address = (
        await funding.GetDepositAddress(
            F.GetDepositAddressRequest(asset="USDT"), metadata=alice.md, timeout=10
        )
    ).deposit_address
    txid = await chain_deposit(
        f"{stack.ports.host}:{stack.ports.chainsim}", address.address, "USDT", "30"
    )
    until = time.monotonic() + 60
    while True:
        found = [
            d
            for d in (
                await funding.ListDeposits(F.ListDepositsRequest(), metadata=alice.md, timeout=10)
            ).deposits
            if d.txid == txid
        ]
        if found and found[0].state == F.DEPOSIT_STATE_CREDITED:
            deposit = found[0]
            break
        assert time.monotonic() < until, found
        await asyncio.sleep(0.2)
    orders = order_pb2_grpc.OrderServiceStub(channel)
    client_order_id = uid("nf")
    order = (
        await orders.PlaceOrder(
            O.PlaceOrderRequest(
                client_order_id=client_order_id,
                market="BTC-USDT",
                side=t.SIDE_BUY,
                type=t.ORDER_TYPE_LIMIT,
                price="95",
                quantity="0.1",
            ),
            metadata=alice.md,
            timeout=20,
        )
    ).order
    withdrawal = (
        await funding.RequestWithdrawal(
            F.RequestWithdrawalRequest(
                request_id=uid("w"), asset="USDT", amount="10", address=ETH_ADDRESS
            ),
            metadata=alice.md,
            timeout=20,
        )
    ).withdrawal
    allowed = (
        await funding.AddWithdrawalAddress(
            F.AddWithdrawalAddressRequest(request_id=uid("a"), asset="USDT", address=ETH_ADDRESS),
            metadata=alice.md,
            timeout=10,
        )
    ).withdrawal_address
    transfers = (
        await ledger_pb2_grpc.LedgerServiceStub(channel).ListTransfers(
            L.ListTransfersRequest(), metadata=alice.md, timeout=10
        )
    ).transfers
    assert transfers
    return Alices(
        account_id=alice.account_id,
        api_key_id=alice.api_key_id,
        order_id=order.order_id,
        client_order_id=client_order_id,
        transfer_id=transfers[0].id,
        deposit_id=deposit.deposit_id,
        withdrawal_id=withdrawal.withdrawal_id,
        saga_id=withdrawal.saga_id,
        address_id=allowed.address_id,
    )


World = tuple[grpc.aio.Channel, User, User, Alices]  # the edge, alice, mallory, alice's ids


@pytest.fixture(scope="module")
async def world(stack: Stack, service_credentials: ServiceCredentials) -> AsyncIterator[World]:
    async with (
        grpc.aio.insecure_channel(stack.edge) as channel,
        exchange_on(stack, service_credentials, channel) as exchange,
    ):
        alice = await _user(exchange, "alice")
        mallory = await _user(exchange, "mallory")
        ids = await _alices(stack, exchange, alice)
        yield channel, alice, mallory, ids
        await order_pb2_grpc.OrderServiceStub(channel).CancelAllOrders(
            O.CancelAllOrdersRequest(request_id=uid("clean")), metadata=alice.md, timeout=20
        )


STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "auth": auth_pb2_grpc.AuthServiceStub,
    "risk": risk_pb2_grpc.RiskServiceStub,
    "ledger": ledger_pb2_grpc.LedgerServiceStub,
    "order": order_pb2_grpc.OrderServiceStub,
    "funding": funding_pb2_grpc.FundingServiceStub,
}
SCOPE_READ = auth_pb2.API_KEY_SCOPE_READ


@dataclass(frozen=True)
class Case:
    name: str  # service.Method(field)
    kind: str  # which of alice's ids (an Alices field)
    request: Callable[[str], Message]  # the request naming that id
    refused: grpc.StatusCode = NF  # the code when refused

    @property
    def service(self) -> str:
        return self.name.split(".")[0]

    @property
    def method(self) -> str:
        return self.name.split(".")[1].split("(")[0]


CASES = [
    Case("auth.GetAccount", "account_id", lambda i: auth_pb2.GetAccountRequest(account_id=i)),
    Case("auth.CreateApiKey", "account_id",
         lambda i: auth_pb2.CreateApiKeyRequest(request_id=uid("k"), account_id=i,
                                                scopes=[SCOPE_READ])),
    Case("auth.ListApiKeys", "account_id", lambda i: auth_pb2.ListApiKeysRequest(account_id=i)),
    Case("auth.RevokeApiKey", "api_key_id",
         lambda i: auth_pb2.RevokeApiKeyRequest(request_id=uid("r"), api_key_id=i)),
    Case("auth.CreateSubAccount", "account_id",
         lambda i: auth_pb2.CreateSubAccountRequest(request_id=uid("s"), display_name="x",
                                                    master_account_id=i)),
    Case("auth.ListSubAccounts", "account_id",
         lambda i: auth_pb2.ListSubAccountsRequest(master_account_id=i)),
    Case("risk.GetLimits", "account_id", lambda i: R.GetLimitsRequest(account_id=i)),
    Case("risk.SetSubAccountLimits", "account_id",
         lambda i: R.SetSubAccountLimitsRequest(request_id=uid("l"),
                                                limits=R.Limits(account_id=i))),
    Case("ledger.TransferSubAccountFunds(to_account_id)", "account_id",
         lambda i: L.TransferSubAccountFundsRequest(request_id=uid("m"), to_account_id=i,
                                                    from_account_id="acc_mallory", asset="USDT",
                                                    amount="1")),
    Case("ledger.GetTransfer", "transfer_id", lambda i: L.GetTransferRequest(id=i)),
    Case("ledger.GetBalances", "account_id", lambda i: L.GetBalancesRequest(account_id=i)),
    Case("ledger.ListTransfers", "account_id", lambda i: L.ListTransfersRequest(account_id=i)),
    Case("order.GetOrder(order_id)", "order_id", lambda i: O.GetOrderRequest(order_id=i)),
    Case("order.GetOrder(client_order_id)", "client_order_id",
         lambda i: O.GetOrderRequest(client_order_id=i)),
    Case("order.GetOrder(account_id)", "account_id",
         lambda i: O.GetOrderRequest(account_id=i, client_order_id="x")),
    Case("order.AmendOrder(order_id)", "order_id",
         lambda i: O.AmendOrderRequest(request_id=uid("a"), order_id=i, quantity="0.2")),
    Case("order.AmendOrder(client_order_id)", "client_order_id",
         lambda i: O.AmendOrderRequest(request_id=uid("a"), client_order_id=i, quantity="0.2")),
    Case("order.CancelOrder(order_id)", "order_id",
         lambda i: O.CancelOrderRequest(request_id=uid("c"), order_id=i)),
    Case("order.CancelOrder(client_order_id)", "client_order_id",
         lambda i: O.CancelOrderRequest(request_id=uid("c"), client_order_id=i)),
    Case("order.CancelAllOrders(account_id)", "account_id",
         lambda i: O.CancelAllOrdersRequest(request_id=uid("c"), account_id=i)),
    Case("order.ListOrders(account_id)", "account_id",
         lambda i: O.ListOrdersRequest(account_id=i)),
    Case("order.ListFills(account_id)", "account_id", lambda i: O.ListFillsRequest(account_id=i)),
    Case("order.ListFills(order_id)", "order_id", lambda i: O.ListFillsRequest(order_id=i)),
    Case("funding.GetDepositAddress", "account_id",
         lambda i: F.GetDepositAddressRequest(account_id=i, asset="USDT")),
    Case("funding.GetDeposit", "deposit_id", lambda i: F.GetDepositRequest(deposit_id=i)),
    Case("funding.ListDeposits", "account_id", lambda i: F.ListDepositsRequest(account_id=i)),
    Case("funding.GetWithdrawal", "withdrawal_id",
         lambda i: F.GetWithdrawalRequest(withdrawal_id=i)),
    Case("funding.CancelWithdrawal", "withdrawal_id",
         lambda i: F.CancelWithdrawalRequest(request_id=uid("c"), withdrawal_id=i)),
    Case("funding.ListWithdrawals", "account_id",
         lambda i: F.ListWithdrawalsRequest(account_id=i)),
    Case("funding.AddWithdrawalAddress", "account_id",
         lambda i: F.AddWithdrawalAddressRequest(request_id=uid("a"), account_id=i, asset="USDT",
                                                 address=ETH_ADDRESS)),
    Case("funding.RemoveWithdrawalAddress", "address_id",
         lambda i: F.RemoveWithdrawalAddressRequest(request_id=uid("r"), address_id=i)),
    Case("funding.ListWithdrawalAddresses", "account_id",
         lambda i: F.ListWithdrawalAddressesRequest(account_id=i)),
    Case("funding.GetWithdrawalAllowlist", "account_id",
         lambda i: F.GetWithdrawalAllowlistRequest(account_id=i)),
    Case("funding.SetWithdrawalAllowlist", "account_id",
         lambda i: F.SetWithdrawalAllowlistRequest(request_id=uid("l"), account_id=i,
                                                   enabled=True)),
    # Operators only: refused by scope before any id is read.
    Case("funding.ApproveWithdrawal", "withdrawal_id",
         lambda i: F.ApproveWithdrawalRequest(request_id=uid("a"), withdrawal_id=i), DENIED),
    Case("funding.RejectWithdrawal", "withdrawal_id",
         lambda i: F.RejectWithdrawalRequest(request_id=uid("r"), withdrawal_id=i,
                                             reason="x"), DENIED),
    Case("funding.GetSaga", "saga_id", lambda i: F.GetSagaRequest(saga_id=i), DENIED),
    Case("funding.ListSagas(account_id)", "account_id",
         lambda i: F.ListSagasRequest(account_id=i), DENIED),
]  # fmt: skip

# Methods of services another engineer is rewriting (order, ledger, funding,
# match) that answer another account's id differently from a made-up one; they
# are fixed there, not here (strict: the xfail goes once they are).
XFAIL: dict[str, str] = {}


async def _answer(
    case: Case, channel: grpc.aio.Channel, i: str, md: tuple[tuple[str, str]]
) -> tuple[object, ...]:
    """What a caller learns: the code, reason, domain and message (the id blanked),
    or for a success the response with the id blanked."""
    call = getattr(STUBS[case.service](channel), case.method)
    try:
        reply = await call(case.request(i), metadata=md, timeout=10)
    except grpc.aio.AioRpcError as error:
        e = ErrorDetails.from_rpc_error(error)
        return (e.code, e.reason, e.domain, e.message.replace(i, "<id>"))
    return (grpc.StatusCode.OK, str(reply).replace(i, "<id>"))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c.name]))
        if c.name in XFAIL
        else pytest.param(c, id=c.name)
        for c in CASES
    ],
)
async def test_another_accounts_id_answers_as_a_made_up_one(world: World, case: Case) -> None:
    channel, _, mallory, alices = world
    real = getattr(alices, case.kind)
    theirs = await _answer(case, channel, real, mallory.md)
    made_up = await _answer(case, channel, lookalike(real), mallory.md)
    assert theirs == made_up, f"{case.name}: {theirs} != {made_up}"
    assert theirs[0] in (grpc.StatusCode.OK, case.refused), theirs


async def test_alices_order_is_untouched(world: World) -> None:
    """After every call above (amends, cancels and a cancel-all naming alice's ids),
    her order rests as she placed it: the refused calls changed nothing."""
    channel, alice, _, alices = world
    order = (
        await order_pb2_grpc.OrderServiceStub(channel).GetOrder(
            O.GetOrderRequest(order_id=alices.order_id), metadata=alice.md, timeout=10
        )
    ).order
    # (Another test's sell may fill it; none of mallory's calls may cancel or amend it.)
    assert order.state != t.ORDER_STATE_CANCELLED, order
    assert Decimal(order.quantity) == Decimal("0.1"), order
