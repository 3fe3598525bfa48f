"""Funding through Envoy on the whole stack: a user's deposit from the chain simulator
is credited by the stack's funding, then withdrawn (ledger and risk through the mesh),
over gRPC and REST."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

import grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex.funding.v1 import funding_pb2 as F
from cex.funding.v1 import funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex_stack.supervisor import Stack
from services.chassis import ErrorDetails, ServiceCredentials
from tests.cli import cex
from tests.integration.funding.support import ETH_ADDRESS

READ, WITHDRAW, ADMIN = (
    auth_pb2.API_KEY_SCOPE_READ,
    auth_pb2.API_KEY_SCOPE_WITHDRAW,
    auth_pb2.API_KEY_SCOPE_ADMIN,
)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _user(
    stack: Stack, operator: str, scopes: tuple[int, ...] = (READ, WITHDRAW)
) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        account = (
            await stub.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="e2e"),
                metadata=_bearer(operator),
            )
        ).account.account_id
        key = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex,
                account_id=account,
                scopes=list(scopes),
                allowed_cidrs=["0.0.0.0/0"],
            ),
            metadata=_bearer(operator),
        )
        token = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(api_key_id=key.api_key.api_key_id, api_key_secret=key.secret)
        )
    return account, token.access_token


async def _chain(stack: Stack, method: str, request: dict[str, str]) -> dict[str, str]:
    async with grpc.aio.insecure_channel(f"{stack.ports.host}:{stack.ports.chainsim}") as channel:
        call = channel.unary_unary(
            f"/chainsim.Chain/{method}",
            request_serializer=lambda r: json.dumps(r).encode(),
            response_deserializer=json.loads,
        )
        reply: dict[str, str] = await call(request, timeout=5)
        return reply


def _rest(
    stack: Stack, path: str, token: str, body: dict[str, str] | None = None
) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://{stack.edge}{path}",
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def _rest_error(
    stack: Stack, path: str, token: str, body: dict[str, str]
) -> tuple[int, dict[str, object]]:
    try:
        _rest(stack, path, token, body)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    raise AssertionError(f"POST {path} succeeded")


async def _deposit(
    stack: Stack, funding: funding_pb2_grpc.FundingServiceAsyncStub, md: object, amount: str
) -> None:
    address = (
        await funding.GetDepositAddress(F.GetDepositAddressRequest(asset="USDT"), metadata=md)
    ).deposit_address
    txid = (
        await _chain(
            stack, "Deposit", {"address": address.address, "asset": "USDT", "amount": amount}
        )
    )["txid"]
    until = time.monotonic() + 60
    while True:
        deposits = (await funding.ListDeposits(F.ListDepositsRequest(), metadata=md)).deposits
        if any(d.txid == txid and d.state == F.DEPOSIT_STATE_CREDITED for d in deposits):
            return
        assert time.monotonic() < until, deposits
        await asyncio.sleep(0.2)


async def test_deposit_then_withdrawal_through_envoy(
    stack: Stack, service_credentials: ServiceCredentials
) -> None:
    operator = await service_credentials.token()
    account, token = await _user(stack, operator)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        md = _bearer(token)
        address = (
            await funding.GetDepositAddress(F.GetDepositAddressRequest(asset="USDT"), metadata=md)
        ).deposit_address
        assert address.account_id == account and address.network == "ethereum"
        txid = (await _chain(stack, "Deposit", {"address": address.address, "asset": "USDT",
                                                "amount": "25"}))["txid"]  # fmt: skip
        until = time.monotonic() + 60
        while True:
            deposits = (await funding.ListDeposits(F.ListDepositsRequest(), metadata=md)).deposits
            if deposits and deposits[0].state == F.DEPOSIT_STATE_CREDITED:
                break
            assert time.monotonic() < until, deposits
            await asyncio.sleep(0.2)
        assert deposits[0].txid == txid and deposits[0].amount == "25"
        w = (
            await funding.RequestWithdrawal(
                F.RequestWithdrawalRequest(
                    request_id=uuid.uuid4().hex, asset="USDT", amount="10", address=ETH_ADDRESS
                ),
                metadata=md,
            )
        ).withdrawal
        while True:
            w = (
                await funding.GetWithdrawal(
                    F.GetWithdrawalRequest(withdrawal_id=w.withdrawal_id), metadata=md
                )
            ).withdrawal
            if w.state not in (F.WITHDRAWAL_STATE_PENDING, F.WITHDRAWAL_STATE_BROADCAST):
                break
            assert time.monotonic() < until, w
            await asyncio.sleep(0.2)
        assert w.state == F.WITHDRAWAL_STATE_COMPLETED, w
        balances = await ledger_pb2_grpc.LedgerServiceStub(channel).GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=account, assets=["USDT"]),
            metadata=_bearer(operator),
        )
        assert balances.balances[0].available == "14"  # 25 - 10 - fee 1
        # Operators only: the saga and its step log.
        try:
            await funding.GetSaga(F.GetSagaRequest(saga_id=w.saga_id), metadata=md)
            raise AssertionError("a user read a saga")
        except grpc.aio.AioRpcError as error:
            assert ErrorDetails.from_rpc_error(error).reason == "AUTH_SCOPE_MISSING"
        saga = (
            await funding.GetSaga(F.GetSagaRequest(saga_id=w.saga_id), metadata=_bearer(operator))
        ).saga
        assert saga.state == F.SAGA_STATE_COMPLETED and saga.steps
    rest = await asyncio.to_thread(_rest, stack, f"/v1/withdrawals/{w.withdrawal_id}", token)
    assert rest["withdrawal"]["state"] == "WITHDRAWAL_STATE_COMPLETED"  # type: ignore[index]


async def _withdrawal_in(
    funding: funding_pb2_grpc.FundingServiceAsyncStub, md: object, wid: str, states: set[int]
) -> F.Withdrawal:
    until = time.monotonic() + 60
    while True:
        w = (
            await funding.GetWithdrawal(F.GetWithdrawalRequest(withdrawal_id=wid), metadata=md)
        ).withdrawal
        if w.state in states:
            return w
        assert time.monotonic() < until, w
        await asyncio.sleep(0.2)


async def test_operators_approve_over_rest_and_reject_with_the_cli(
    stack: Stack, service_credentials: ServiceCredentials
) -> None:
    """Withdrawals above the stack's USDT threshold (250,000) wait for an operator: one is
    approved over REST by another account's admin key and completes, one is rejected
    with `cex withdrawal reject` and its hold is voided."""
    operator = await service_credentials.token()
    account, token = await _user(stack, operator)
    _, admin = await _user(stack, operator, (READ, ADMIN))
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        md = _bearer(token)
        await _deposit(stack, funding, md, "500010")
        big = []
        for _ in range(2):
            w = (
                await funding.RequestWithdrawal(
                    F.RequestWithdrawalRequest(
                        request_id=uuid.uuid4().hex, asset="USDT", amount="250001",
                        address=ETH_ADDRESS,
                    ),
                    metadata=md,
                )
            ).withdrawal  # fmt: skip
            assert w.approval_required
            big.append(w.withdrawal_id)
        for wid in big:
            await _withdrawal_in(funding, md, wid, {F.WITHDRAWAL_STATE_AWAITING_APPROVAL})
        approve = f"/v1/admin/withdrawals/{big[0]}:approve"
        body = {"request_id": uuid.uuid4().hex, "reason": "checked by phone"}
        # The owner's key has no admin scope.
        code, refused = await asyncio.to_thread(_rest_error, stack, approve, token, body)
        assert code == 403 and "AUTH_SCOPE_MISSING" in json.dumps(refused)
        approved = await asyncio.to_thread(_rest, stack, approve, admin, body)
        assert approved["withdrawal"]["review"] == "WITHDRAWAL_REVIEW_APPROVED"  # type: ignore[index]
        rejected = await asyncio.to_thread(
            cex, stack, "withdrawal", "reject", big[1], "--reason", "address flagged"
        )
        assert rejected == f"{big[1]} WITHDRAWAL_STATE_REJECTED WITHDRAWAL_REVIEW_REJECTED"
        done = await _withdrawal_in(funding, md, big[0], {F.WITHDRAWAL_STATE_COMPLETED})
        assert done.reviewed_by and done.review_reason == "checked by phone"
        balances = await ledger_pb2_grpc.LedgerServiceStub(channel).GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=account, assets=["USDT"]),
            metadata=_bearer(operator),
        )
        assert balances.balances[0].available == "250008"  # 500010 - 250001 - fee 1
        assert balances.balances[0].held == "0"
    rest = await asyncio.to_thread(_rest, stack, f"/v1/withdrawals/{big[1]}", token)
    assert rest["withdrawal"]["state"] == "WITHDRAWAL_STATE_REJECTED"  # type: ignore[index]


async def test_a_frozen_accounts_withdrawal_awaiting_approval_never_broadcasts(
    stack: Stack, service_credentials: ServiceCredentials
) -> None:
    """Issue 21: a withdrawal waiting for an operator when its account is suspended
    stops before the broadcast, even if an operator approves it then; its hold is
    released and the account's new withdrawals are refused at once."""
    operator = await service_credentials.token()
    account, token = await _user(stack, operator)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        md, op = _bearer(token), _bearer(operator)
        deposit = uuid.uuid4().hex
        credited = await ledger.CreateTransfers(
            ledger_pb2.CreateTransfersRequest(
                transfers=[
                    ledger_pb2.Transfer(
                        id=deposit, debit_account_id="sys:custody", credit_account_id=account,
                        asset="USDT", amount="250010", kind=ledger_pb2.TRANSFER_KIND_DEPOSIT,
                        reference=deposit,
                    )
                ]
            ),
            metadata=op,
        )  # fmt: skip
        assert credited.results[0].status.code == 0, credited
        w = (
            await funding.RequestWithdrawal(
                F.RequestWithdrawalRequest(
                    request_id=uuid.uuid4().hex, asset="USDT", amount="250001",
                    address=ETH_ADDRESS,
                ),
                metadata=md,
            )
        ).withdrawal  # fmt: skip
        assert w.approval_required
        await _withdrawal_in(funding, md, w.withdrawal_id, {F.WITHDRAWAL_STATE_AWAITING_APPROVAL})
        await auth_pb2_grpc.AuthServiceStub(channel).SetAccountState(
            auth_pb2.SetAccountStateRequest(
                request_id=uuid.uuid4().hex,
                account_id=account,
                state=auth_pb2.ACCOUNT_STATE_SUSPENDED,
                reason="e2e: compliance hold",
            ),
            metadata=op,
        )
        # An operator's approval after the freeze does not let it out.
        try:
            await funding.ApproveWithdrawal(
                F.ApproveWithdrawalRequest(
                    request_id=uuid.uuid4().hex, withdrawal_id=w.withdrawal_id, reason="ok"
                ),
                metadata=op,
            )
        except grpc.aio.AioRpcError as error:  # the saga stopped first: no longer waiting
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        stopped = await _withdrawal_in(
            funding,
            md,
            w.withdrawal_id,
            {F.WITHDRAWAL_STATE_REJECTED, F.WITHDRAWAL_STATE_COMPLETED},
        )
        assert stopped.state == F.WITHDRAWAL_STATE_REJECTED, stopped
        assert ErrorDetails.from_status(stopped.failure).reason == "FUNDING_ACCOUNT_SUSPENDED"
        assert not stopped.txid
        saga = (await funding.GetSaga(F.GetSagaRequest(saga_id=w.saga_id), metadata=op)).saga
        assert saga.state == F.SAGA_STATE_COMPENSATED
        assert not [s for s in saga.steps if s.name == "custody_broadcast"], saga.steps
        balances = await ledger.GetBalances(
            ledger_pb2.GetBalancesRequest(account_id=account, assets=["USDT"]), metadata=op
        )
        assert (balances.balances[0].available, balances.balances[0].held) == ("250010", "0")
        # The same token's next withdrawal is refused; its reads still work.
        try:
            await funding.RequestWithdrawal(
                F.RequestWithdrawalRequest(
                    request_id=uuid.uuid4().hex, asset="USDT", amount="10", address=ETH_ADDRESS
                ),
                metadata=md,
            )
            raise AssertionError("a suspended account requested a withdrawal")
        except grpc.aio.AioRpcError as error:
            refused = ErrorDetails.from_rpc_error(error)
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_ACCOUNT_SUSPENDED",
        )
        listed = await funding.ListWithdrawals(F.ListWithdrawalsRequest(), metadata=md)
        assert [x.withdrawal_id for x in listed.withdrawals] == [w.withdrawal_id]
