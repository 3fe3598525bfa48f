"""Master and sub-accounts on the real stack (issue 21, ADR 0017).

A master creates two sub-accounts (gRPC and REST), gives each its own API key
and funds it (gRPC, REST and the `cex` CLI); each sub trades with its own key,
sub B on its own stream session; the master lists their balances and orders
and may not trade for them; sub A sees neither sub B's nor the master's
resources (NOT_FOUND, the answer a made-up id gets); a transfer retried with
the same request id moves funds once; one beyond the balance is refused with
LEDGER_INSUFFICIENT_FUNDS; a frozen sub's funds do not move; the master sets a
sub's limits within its own; the ledger audit passes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

import grpc
from google.protobuf import duration_pb2

from cex.auth.v1 import auth_pb2
from cex.ledger.v1 import ledger_pb2 as L
from cex.order.v1 import order_pb2 as O
from cex.order.v1 import order_pb2_grpc
from cex.risk.v1 import risk_pb2 as RK
from cex.risk.v1 import risk_pb2_grpc
from cex.type.v1 import types_pb2 as t
from tests.cli import cex
from tests.e2e.order.support import BUY, SELL, Exchange, Trader, bearer, error_of, uid
from tests.e2e.order.test_streams import Client, R, place
from tests.e2e.test_not_found import lookalike
from tests.rest import rest

D = Decimal
NF = grpc.StatusCode.NOT_FOUND
READ_TRADE = [auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE]


@dataclass
class Key:
    account_id: str
    key_id: str
    secret: str


async def _token(exchange: Exchange, key: Key) -> str:
    reply = await exchange.auth.IssueToken(
        auth_pb2.IssueTokenRequest(
            api_key_id=key.key_id,
            api_key_secret=key.secret,
            ttl=duration_pb2.Duration(seconds=900),
        ),
        timeout=10,
    )
    return reply.access_token


def _cex(exchange: Exchange, key: Key, *args: str) -> str:
    """The `cex` CLI acting with `key` (the API key it signs in with)."""
    env = {"CEX_API_KEY_ID": key.key_id, "CEX_API_KEY_SECRET": key.secret}
    return cex(exchange.stack, *args, env=env)


async def _answer(call: object, request: object, md: object) -> tuple[object, ...]:
    """What a caller learns: code, reason, domain, message, or the reply."""
    try:
        reply = await call(request, metadata=md, timeout=10)  # type: ignore[operator]
    except grpc.aio.AioRpcError as error:
        e = error_of(error)
        return (e.code, e.reason, e.domain, e.message)
    return (grpc.StatusCode.OK, str(reply))


async def _balance(exchange: Exchange, md: object, account_id: str, asset: str) -> D:
    reply = await exchange.ledger.GetBalances(
        L.GetBalancesRequest(account_id=account_id, assets=[asset]), metadata=md, timeout=10
    )
    return D(reply.balances[0].available)


async def test_a_master_runs_two_sub_accounts(exchange: Exchange) -> None:
    ledger, auth = exchange.ledger, exchange.auth
    # The master: an account with a read+trade key, funded.
    created = await auth.CreateAccount(
        auth_pb2.CreateAccountRequest(
            request_id=uid("acc"), display_name="firm", type=auth_pb2.ACCOUNT_TYPE_MARKET_MAKER
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    master_id = created.account.account_id
    made = await auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(request_id=uid("k"), account_id=master_id, scopes=READ_TRADE),
        metadata=exchange.svc,
        timeout=10,
    )
    master = Key(master_id, made.api_key.api_key_id, made.secret)
    await exchange.deposit(master_id, "USDT", "1000")
    await exchange.deposit(master_id, "BTC", "2")
    md = bearer(await _token(exchange, master))

    # Two subs: one by gRPC (a retry with its request id returns the same one),
    # one by REST.
    request = auth_pb2.CreateSubAccountRequest(request_id=uid("s"), display_name="desk-a")
    sub_a = (await auth.CreateSubAccount(request, metadata=md, timeout=10)).account
    again = (await auth.CreateSubAccount(request, metadata=md, timeout=10)).account
    assert again.account_id == sub_a.account_id and sub_a.master_account_id == master_id
    assert sub_a.type == auth_pb2.ACCOUNT_TYPE_MARKET_MAKER
    status, body = await asyncio.to_thread(
        rest, exchange.stack, "/v1/subAccounts", md[0][1][7:],
        {"request_id": uid("s"), "display_name": "desk-b"},
    )  # fmt: skip
    assert status == 200, body
    account = body["account"]
    assert isinstance(account, dict) and account["master_account_id"] == master_id, body
    b_id = str(account["account_id"])
    a_id = sub_a.account_id

    # The token issued before the subs existed does not name them; a new one does.
    old = await _answer(auth.ListApiKeys, auth_pb2.ListApiKeysRequest(account_id=a_id), md)
    assert old[:2] == (NF, "AUTH_ACCOUNT_NOT_FOUND"), old
    md = bearer(await _token(exchange, master))
    listed = await auth.ListSubAccounts(auth_pb2.ListSubAccountsRequest(), metadata=md, timeout=10)
    assert [a.account_id for a in listed.accounts] == [a_id, b_id]

    # The master creates each sub's own key (at most its own scopes).
    keys = {}
    for sub_id in (a_id, b_id):
        reply = await auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(request_id=uid("k"), account_id=sub_id, scopes=READ_TRADE),
            metadata=md,
            timeout=10,
        )
        assert reply.api_key.account_id == sub_id
        keys[sub_id] = Key(sub_id, reply.api_key.api_key_id, reply.secret)
    too_much = await _answer(
        auth.CreateApiKey,
        auth_pb2.CreateApiKeyRequest(
            request_id=uid("k"), account_id=a_id, scopes=[auth_pb2.API_KEY_SCOPE_WITHDRAW]
        ),
        md,
    )
    assert too_much[0] == grpc.StatusCode.PERMISSION_DENIED, too_much
    out = _cex(exchange, master, "subaccount", "apikey", b_id, "--scopes", "read")
    assert "CEX_API_KEY_ID=" in out
    stub = order_pb2_grpc.OrderServiceStub(exchange.channel)
    a = Trader(a_id, await _token(exchange, keys[a_id]), stub)
    b = Trader(b_id, await _token(exchange, keys[b_id]), stub)
    exchange.traders += [a, b]  # cancelled at the end

    # Funding: gRPC (retried with the same request id: moved once), REST, CLI.
    move = L.TransferSubAccountFundsRequest(
        request_id=uid("m"), from_account_id=master_id, to_account_id=a_id, asset="USDT",
        amount="300",
    )  # fmt: skip
    first = (await ledger.TransferSubAccountFunds(move, metadata=md, timeout=20)).transfer
    retried = (await ledger.TransferSubAccountFunds(move, metadata=md, timeout=20)).transfer
    assert retried.id == first.id and retried.sequence == first.sequence
    assert first.kind == L.TRANSFER_KIND_SUB_ACCOUNT
    assert await _balance(exchange, md, a_id, "USDT") == D(300)
    assert await _balance(exchange, md, master_id, "USDT") == D(700)
    other = L.TransferSubAccountFundsRequest()
    other.CopyFrom(move)
    other.amount = "301"
    reused = await _answer(ledger.TransferSubAccountFunds, other, md)
    assert reused[0] == grpc.StatusCode.ALREADY_EXISTS, reused
    status, body = await asyncio.to_thread(
        rest, exchange.stack, "/v1/subAccounts/transfers", md[0][1][7:],
        {"request_id": uid("m"), "from_account_id": master_id, "to_account_id": b_id,
         "asset": "BTC", "amount": "1"},
    )  # fmt: skip
    assert status == 200, body
    out = await asyncio.to_thread(
        _cex, exchange, master, "subaccount", "transfer", "--from", master_id, "--to", b_id,
        "--asset", "USDT", "--amount", "50",
    )  # fmt: skip
    assert out.endswith(f"50 USDT {master_id} -> {b_id}"), out
    # Beyond the balance: refused, with the reason; nothing moved.
    beyond = L.TransferSubAccountFundsRequest(
        request_id=uid("m"), from_account_id=b_id, to_account_id=master_id, asset="BTC",
        amount="1.5",
    )  # fmt: skip
    refused = await _answer(ledger.TransferSubAccountFunds, beyond, md)
    assert refused[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "LEDGER_INSUFFICIENT_FUNDS")
    assert await _balance(exchange, md, b_id, "BTC") == D(1)
    for amount in ("0", "abc", "1.000000001"):
        bad = L.TransferSubAccountFundsRequest()
        bad.CopyFrom(beyond)
        bad.request_id, bad.amount = uid("m"), amount
        invalid = await _answer(ledger.TransferSubAccountFunds, bad, md)
        assert invalid[0] == grpc.StatusCode.INVALID_ARGUMENT, (amount, invalid)

    # Each sub trades with its own key: B quotes on its own stream session, A hits it.
    session = Client(b)
    await session.send(R(subscribe=O.StreamSubscribe()))
    subscribed = await session.next("subscribed")
    assert subscribed.subscribed.session_id
    await session.send(place(side=SELL, price="96.5", quantity="0.5"))
    ask = (await session.next("ack")).ack.place.order
    assert ask.account_id == b_id
    hit = await a.place(side=BUY, price="96.5", quantity="0.5")
    assert hit.state == t.ORDER_STATE_FILLED, hit
    assert hit.account_id == a_id
    await session.next("execution_report")
    await b.settled(ask.order_id, t.ORDER_STATE_FILLED)
    # One session per sub at once: A's own, beside B's.
    session_a = Client(a)
    await session_a.send(R(subscribe=O.StreamSubscribe()))
    own = await session_a.next("subscribed")
    assert own.subscribed.session_id != subscribed.subscribed.session_id
    await session_a.send(place(side=BUY, price="95", quantity="0.1"))
    resting = (await session_a.next("ack")).ack.place.order
    assert resting.account_id == a_id
    for ended in (session, session_a):
        await ended.send(None)  # the sessions end

    # The master reads its subs' balances and orders (gRPC and the CLI) ...
    bought = (await exchange.balances(a_id))["BTC"][0]
    assert bought > 0
    assert await _balance(exchange, md, a_id, "BTC") == bought
    orders = await a.orders.ListOrders(
        O.ListOrdersRequest(account_id=a_id), metadata=md, timeout=10
    )
    assert {o.order_id for o in orders.orders} == {hit.order_id, resting.order_id}
    got = await a.orders.GetOrder(
        O.GetOrderRequest(account_id=b_id, order_id=ask.order_id), metadata=md, timeout=10
    )
    assert got.order.state == t.ORDER_STATE_FILLED
    shown = await asyncio.to_thread(_cex, exchange, master, "subaccount", "orders", a_id)
    assert resting.order_id in shown and hit.order_id in shown
    shown = await asyncio.to_thread(_cex, exchange, master, "subaccount", "balances", b_id)
    assert shown.splitlines()[0].startswith("BTC")
    # ... but neither trades nor cancels for them.
    for_a = await _answer(
        a.orders.CancelOrder,
        O.CancelOrderRequest(request_id=uid("c"), account_id=a_id, order_id=resting.order_id),
        md,
    )
    assert for_a[:2] == (NF, "ORDER_ACCOUNT_NOT_FOUND"), for_a

    # A sub sees neither its sibling nor its master: NOT_FOUND, as for a made-up id.
    for target in (b_id, master_id):
        for call, make in (
            (ledger.GetBalances, lambda i: L.GetBalancesRequest(account_id=i)),
            (a.orders.ListOrders, lambda i: O.ListOrdersRequest(account_id=i)),
            (auth.GetAccount, lambda i: auth_pb2.GetAccountRequest(account_id=i)),
            (auth.ListSubAccounts, lambda i: auth_pb2.ListSubAccountsRequest(master_account_id=i)),
            (
                ledger.TransferSubAccountFunds,
                lambda i: L.TransferSubAccountFundsRequest(
                    request_id="x", from_account_id=a_id, to_account_id=i, asset="USDT", amount="1"
                ),
            ),
        ):
            theirs = await _answer(call, make(target), a.md)
            made_up = await _answer(call, make(lookalike(target)), a.md)
            assert theirs == made_up and theirs[0] == NF, (theirs, made_up)
    theirs = await _answer(a.orders.GetOrder, O.GetOrderRequest(order_id=ask.order_id), a.md)
    made_up = await _answer(
        a.orders.GetOrder, O.GetOrderRequest(order_id=lookalike(ask.order_id)), a.md
    )
    assert theirs[0] == NF and theirs[:2] == made_up[:2], (theirs, made_up)
    # Nor may a sub make subs of its own.
    nested = await _answer(
        auth.CreateSubAccount,
        auth_pb2.CreateSubAccountRequest(request_id=uid("s"), display_name="x"),
        a.md,
    )
    assert nested[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "AUTH_SUB_ACCOUNT_NESTED")

    # The master sets a sub's limits within its own, which an operator set.
    risk = risk_pb2_grpc.RiskServiceStub(exchange.channel)
    await risk.SetLimits(
        RK.SetLimitsRequest(
            request_id=uid("l"),
            limits=RK.Limits(account_id=master_id, max_orders_per_second=50, max_open_orders=200),
        ),
        metadata=exchange.svc,
        timeout=10,
    )
    above = await _answer(
        risk.SetSubAccountLimits,
        RK.SetSubAccountLimitsRequest(
            request_id=uid("l"), limits=RK.Limits(account_id=a_id, max_orders_per_second=51)
        ),
        md,
    )
    assert above[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "RISK_ABOVE_MASTER_LIMITS"), above
    out = await asyncio.to_thread(
        _cex, exchange, master, "subaccount", "limits", a_id, "--orders-per-second", "20"
    )
    assert out.startswith(f"{a_id} 20 orders/s, 200 open"), out
    shown = await risk.GetLimits(RK.GetLimitsRequest(account_id=a_id), metadata=md, timeout=10)
    assert (shown.limits.max_orders_per_second, shown.limits.max_open_orders) == (20, 200)
    for call, make in (
        (risk.GetLimits, lambda i: RK.GetLimitsRequest(account_id=i)),
        (
            risk.SetSubAccountLimits,
            lambda i: RK.SetSubAccountLimitsRequest(
                request_id="x", limits=RK.Limits(account_id=i, max_open_orders=1)
            ),
        ),
    ):
        theirs = await _answer(call, make(b_id), a.md)
        made_up = await _answer(call, make(lookalike(b_id)), a.md)
        assert theirs[0] == NF and theirs[:3] == made_up[:3], (theirs, made_up)

    # A frozen sub's funds stay where they are, until it is thawed.
    for state in (auth_pb2.ACCOUNT_STATE_SUSPENDED, auth_pb2.ACCOUNT_STATE_ACTIVE):
        await auth.SetAccountState(
            auth_pb2.SetAccountStateRequest(
                request_id=uid("f"), account_id=b_id, state=state, reason="review"
            ),
            metadata=exchange.svc,
            timeout=10,
        )
        out_of_b = L.TransferSubAccountFundsRequest(
            request_id=uid("m"), from_account_id=b_id, to_account_id=master_id, asset="USDT",
            amount="1",
        )  # fmt: skip
        for _ in range(100):  # the freeze reaches the ledger within a second
            answer = await _answer(ledger.TransferSubAccountFunds, out_of_b, md)
            frozen = answer[:2] == (grpc.StatusCode.PERMISSION_DENIED, "AUTH_ACCOUNT_SUSPENDED")
            if frozen == (state == auth_pb2.ACCOUNT_STATE_SUSPENDED):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the ledger does not follow the freeze: {answer}")

    # The master takes funds back, and the books balance.
    back = L.TransferSubAccountFundsRequest(
        request_id=uid("m"), from_account_id=a_id, to_account_id=master_id, asset="BTC",
        amount=str(bought),
    )  # fmt: skip
    await ledger.TransferSubAccountFunds(back, metadata=md, timeout=20)
    assert await _balance(exchange, md, a_id, "BTC") == 0
    await exchange.clean_up()
    await exchange.assert_balanced()
