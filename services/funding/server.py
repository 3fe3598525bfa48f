"""funding service: proto <-> domain and errors, and the composition root.

`build_server` wires the pool, the clients (ledger and risk through the mesh
with funding's service credential, custody directly), the saga orchestrator
with the deposit and withdrawal sagas, the chain watcher and the outbox relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import grpc
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from cex.funding.v1 import funding_pb2, funding_pb2_grpc
from cex.ledger.v1 import ledger_pb2_grpc
from cex.risk.v1 import risk_pb2_grpc
from services.chassis import (
    AlreadyExists,
    Catalog,
    ChassisSettings,
    FieldViolation,
    InvalidArgument,
    Rule,
    Server,
    Unavailable,
    background,
    connect,
    current_auth,
    load_catalog,
    mesh_channel,
    metrics_registry,
    optional_time,
    owned_account,
    owned_resource,
    page_size,
    postgres,
    service_credentials,
    time_key_after,
    time_keyed_page,
    timestamp,
    timestamp_or_none,
    user,
)
from services.chassis.settings import require

from . import deposits, domain, store, withdrawals
from .config import FundingConfig
from .custody import CustodyClient, CustodyRejected
from .orchestrator import CrashAt, Orchestrator, SagaMetrics, no_crash
from .outbox import OutboxRelay

__all__ = ["POLICY", "FundingService", "build_server"]

MIGRATIONS = Path(__file__).with_name("migrations")
_log = logging.getLogger("cex.funding")

# Users act on their own account (reads need `read`, withdrawals `withdraw`);
# services may name any account. Saga inspection is for operators (`admin`).
POLICY: dict[str, Rule] = {
    "GetDepositAddress": user("read", services=True),
    "GetDeposit": user("read", services=True),
    "ListDeposits": user("read", services=True),
    "RequestWithdrawal": user("withdraw", services=True),
    "CancelWithdrawal": user("withdraw", services=True),
    "GetWithdrawal": user("read", services=True),
    "ListWithdrawals": user("read", services=True),
    "ListSagas": user("admin", services=True),
    "GetSaga": user("admin", services=True),
    # The allowlist guards the account's withdrawals: changing it takes `withdraw`.
    "AddWithdrawalAddress": user("withdraw", services=True),
    "RemoveWithdrawalAddress": user("withdraw", services=True),
    "ListWithdrawalAddresses": user("read", services=True),
    "GetWithdrawalAllowlist": user("read", services=True),
    "SetWithdrawalAllowlist": user("withdraw", services=True),
    # Operators review withdrawals above their asset's threshold.
    "ApproveWithdrawal": user("admin", services=True),
    "RejectWithdrawal": user("admin", services=True),
}

F = funding_pb2
_WITHDRAWAL_STATES = {
    "PENDING": F.WITHDRAWAL_STATE_PENDING,
    "AWAITING_APPROVAL": F.WITHDRAWAL_STATE_AWAITING_APPROVAL,
    "BROADCAST": F.WITHDRAWAL_STATE_BROADCAST,
    "COMPLETED": F.WITHDRAWAL_STATE_COMPLETED,
    "CANCELLED": F.WITHDRAWAL_STATE_CANCELLED,
    "REJECTED": F.WITHDRAWAL_STATE_REJECTED,
    "FAILED": F.WITHDRAWAL_STATE_FAILED,
}
_REVIEWS = {
    "": F.WITHDRAWAL_REVIEW_UNSPECIFIED,
    domain.APPROVED: F.WITHDRAWAL_REVIEW_APPROVED,
    domain.REJECTED: F.WITHDRAWAL_REVIEW_REJECTED,
    domain.EXPIRED: F.WITHDRAWAL_REVIEW_EXPIRED,
}
_DEPOSIT_STATES = {
    "PENDING": F.DEPOSIT_STATE_PENDING,
    "CREDITED": F.DEPOSIT_STATE_CREDITED,
    "CANCELLED": F.DEPOSIT_STATE_CANCELLED,
    "REJECTED": F.DEPOSIT_STATE_REJECTED,
}
_SAGA_STATES = {
    "RUNNING": F.SAGA_STATE_RUNNING,
    "COMPENSATING": F.SAGA_STATE_COMPENSATING,
    "COMPLETED": F.SAGA_STATE_COMPLETED,
    "COMPENSATED": F.SAGA_STATE_COMPENSATED,
    "STUCK": F.SAGA_STATE_STUCK,
}
_STEP_STATES = {
    "STARTED": F.SAGA_STEP_STATE_STARTED,
    "SUCCEEDED": F.SAGA_STEP_STATE_SUCCEEDED,
    "RETRYING": F.SAGA_STEP_STATE_RETRYING,
    "FAILED": F.SAGA_STEP_STATE_FAILED,
}
_KINDS = {"deposit": F.SAGA_KIND_DEPOSIT, "withdrawal": F.SAGA_KIND_WITHDRAWAL}


def _status(raw: bytes | None) -> status_pb2.Status | None:
    return status_pb2.Status.FromString(raw) if raw else None


def _name(mapping: dict[str, Any], value: int, field: str) -> str:
    if value == 0:
        return ""
    for name, number in mapping.items():
        if number == value:
            return name
    raise InvalidArgument(
        "FUNDING_FILTER_INVALID",
        f"{field}: unknown value {value}",
        violations=[FieldViolation(field, "unknown enum value")],
    )


_PAGE_TOKEN_INVALID = "FUNDING_PAGE_TOKEN_INVALID"


def _page_size(size: int) -> int:
    return page_size(size, default=100, maximum=1000, reason="FUNDING_PAGE_SIZE_INVALID")


_Row = TypeVar("_Row")


async def _paged(
    size: int,
    token: str,
    kind: str,
    position: Callable[[_Row], tuple[datetime, str]],
    fetch: Callable[[store.Page, int], Awaitable[Sequence[_Row]]],
) -> tuple[Sequence[_Row], str]:
    """A page of at most `size` rows of list `kind` (newest first: time, id) and the
    token that continues it: `fetch(after, limit)` reads one more than that from
    where `token` left off."""
    found = time_key_after(token, kind, reason=_PAGE_TOKEN_INVALID)
    after = store.Page() if found is None else store.Page(*found)
    return time_keyed_page(await fetch(after, size + 1), size, kind, position)


def _range(request: Any) -> tuple[datetime | None, datetime | None]:
    return optional_time(request, "start_time"), optional_time(request, "end_time")


class _Owned(Protocol):
    @property
    def account_id(self) -> str: ...


_Found = TypeVar("_Found", bound=_Owned)


def _of_account(found: _Found | None, account: str, resource: str) -> _Found:
    """A resource looked up by id, if it is the account's the call acts on (a service
    names the account too): another's answers exactly as a made-up id."""
    mine = found if found is not None and found.account_id == account else None
    return owned_resource(current_auth(), mine, component="FUNDING", resource=resource)


def _account(requested: str, *, mutate: bool = False) -> str:
    """The account a call acts on (chassis' rule); an admin reads any account's
    data but moves only their own funds: only a service acts for others."""
    ctx = current_auth()
    if mutate and not ctx.is_service:
        ctx = replace(ctx, scopes=ctx.scopes - {"admin"})
    return owned_account(ctx, requested, component="FUNDING")


def _mutating(request: Any) -> str:
    """The account a call that changes state acts on, once its request_id is valid."""
    account = _account(request.account_id, mutate=True)
    domain.check_request_id(request.request_id)
    return account


class _Conflict(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Keyed:
    """An idempotency key in its call's transaction: `seen`, the target of the
    same call made before with it (None if new), and `remember` for a new one."""

    conn: store.Connection
    actor: str
    request_id: str
    method: str
    fingerprint: str
    seen: str | None

    @classmethod
    async def look_up(
        cls, conn: store.Connection, actor: str, request_id: str, method: str, *fields: str
    ) -> _Keyed:
        """ALREADY_EXISTS if the key named another call."""
        fingerprint = domain.request_fingerprint(method, *fields)
        stored = await store.keyed_request(conn, actor, request_id)
        if stored is not None:
            domain.same_request(stored=stored, fingerprint=fingerprint, target=stored[1])
        seen = None if stored is None else stored[1]
        return cls(conn, actor, request_id, method, fingerprint, seen)

    async def remember(self, target: str) -> None:
        await store.save_keyed_request(
            self.conn,
            self.actor,
            self.request_id,
            method=self.method,
            fingerprint=self.fingerprint,
            target=target,
        )


@dataclass(kw_only=True, slots=True, eq=False)
class FundingService(funding_pb2_grpc.FundingServiceServicer):
    """cex.funding.v1.FundingService."""

    pool: asyncpg.Pool
    orchestrator: Orchestrator
    custody: CustodyClient
    catalog: Catalog
    config: FundingConfig
    clock: Callable[[], float]
    # Approval thresholds in minor units (assets the catalog does not know never
    # reach a withdrawal).
    _thresholds: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self._thresholds = {
            symbol: self.catalog.assets[symbol].to_minor(amount)
            for symbol, amount in self.config.approval_thresholds.items()
            if symbol in self.catalog.assets
        }

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # -- conversions ---------------------------------------------------------

    def _fmt(self, asset: str, minor: int) -> str:
        return self.catalog.assets[asset].format(minor)

    def _withdrawal(self, row: store.WithdrawalRow) -> funding_pb2.Withdrawal:
        return F.Withdrawal(
            withdrawal_id=row.withdrawal_id,
            request_id=row.request_id,
            account_id=row.account_id,
            asset=row.asset,
            network=row.network,
            amount=self._fmt(row.asset, row.amount),
            fee=self._fmt(row.asset, row.fee),
            address=row.address,
            memo=row.memo,
            state=_WITHDRAWAL_STATES[row.state],
            txid=row.txid,
            confirmations=row.confirmations,
            required_confirmations=row.required_confirmations,
            failure=_status(row.failure) if row.state in ("REJECTED", "FAILED") else None,
            saga_id=row.saga_id,
            create_time=timestamp(row.create_time),
            update_time=timestamp(row.update_time),
            complete_time=timestamp_or_none(row.complete_time),
            approval_required=row.approval_required,
            approval_deadline_time=timestamp_or_none(row.approval_deadline),
            review=_REVIEWS[row.review],
            reviewed_by=row.reviewed_by,
            review_reason=row.review_reason,
            review_time=timestamp_or_none(row.review_time),
        )

    @staticmethod
    def _address(row: store.AddressRow) -> funding_pb2.WithdrawalAddress:
        return F.WithdrawalAddress(
            address_id=row.address_id,
            account_id=row.account_id,
            asset=row.asset,
            network=row.network,
            address=row.address,
            label=row.label,
            create_time=timestamp(row.create_time),
            usable_time=timestamp(row.usable_time),
            remove_time=timestamp_or_none(row.remove_time),
        )

    def _allowlist(self, row: store.AllowlistRow) -> funding_pb2.WithdrawalAllowlist:
        on = domain.allowlist_on(row.enabled, row.disable_time, self._now())
        return F.WithdrawalAllowlist(
            account_id=row.account_id,
            enabled=on,
            disable_time=timestamp(row.disable_time) if on and row.disable_time else None,
            update_time=timestamp_or_none(row.update_time),
        )

    def _deposit(self, row: store.DepositRow) -> funding_pb2.Deposit:
        return F.Deposit(
            deposit_id=row.deposit_id,
            account_id=row.account_id,
            asset=row.asset,
            network=row.network,
            amount=self._fmt(row.asset, row.amount),
            address=row.address,
            memo=row.memo,
            txid=row.txid,
            output_index=row.output_index,
            confirmations=row.confirmations,
            required_confirmations=row.required_confirmations,
            state=_DEPOSIT_STATES[row.state],
            ledger_transfer_id=row.ledger_transfer_id,
            saga_id=row.saga_id,
            detect_time=timestamp(row.detect_time),
            credit_time=timestamp_or_none(row.credit_time),
            update_time=timestamp(row.update_time),
        )

    def _saga(self, row: store.SagaRow) -> funding_pb2.Saga:
        return F.Saga(
            saga_id=row.saga_id,
            kind=_KINDS[row.kind],
            reference_id=row.reference_id,
            account_id=row.account_id,
            state=_SAGA_STATES[row.state],
            current_step=row.current_step,
            steps=[
                F.SagaStep(
                    index=s.idx,
                    name=s.name,
                    compensation=s.compensation,
                    state=_STEP_STATES[s.state],
                    attempt=s.attempt,
                    error=_status(s.error),
                    outputs=s.outputs,
                    record_time=timestamp(s.record_time),
                )
                for s in row.steps
            ],
            create_time=timestamp(row.create_time),
            update_time=timestamp(row.update_time),
        )

    def _asset_network(self, asset: str, network: str) -> tuple[str, str]:
        rule = self.config.assets.get(asset)
        if rule is None or asset not in self.catalog.assets:
            raise InvalidArgument(
                "FUNDING_ASSET_UNSUPPORTED",
                f"asset: {asset!r} is not supported",
                violations=[FieldViolation("asset", "not supported")],
            )
        if network and network != rule.network:
            raise InvalidArgument(
                "FUNDING_NETWORK_UNSUPPORTED",
                f"network: {asset} moves on {rule.network} only",
                violations=[FieldViolation("network", f"{asset} moves on {rule.network} only")],
            )
        return asset, rule.network

    async def _account_page(
        self,
        request: Any,
        kind: str,
        fetch: Callable[[asyncpg.Pool, store.AccountPage], Awaitable[list[_Row]]],
        states: dict[str, Any],
        position: Callable[[_Row], tuple[datetime, str]],
    ) -> tuple[Sequence[_Row], str]:
        """A page of an account's deposits or withdrawals, as ListDeposits and
        ListWithdrawals filter them (asset, state, time range), newest first."""
        account = _account(request.account_id)
        size = _page_size(request.page_size)
        start, end = _range(request)
        query = store.AccountPage(
            account_id=account,
            asset=request.asset,
            state=_name(states, request.state, "state"),
            start=start,
            end=end,
        )
        return await _paged(
            size,
            request.page_token,
            kind,
            position,
            lambda after, limit: fetch(self.pool, replace(query, after=after, limit=limit)),
        )

    # -- deposits ---------------------------------------------------------------

    async def GetDepositAddress(
        self,
        request: funding_pb2.GetDepositAddressRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.GetDepositAddressResponse:
        account = _account(request.account_id)
        asset, network = self._asset_network(request.asset, request.network)
        row = await store.deposit_address(self.pool, account, asset, network)
        if row is None:
            try:
                address = await self.custody.new_address(account, asset, network)
            except (grpc.aio.AioRpcError, CustodyRejected) as error:
                raise Unavailable(
                    "FUNDING_CUSTODY_UNAVAILABLE", f"custody did not answer: {error}"
                ) from None
            async with self.pool.acquire() as conn:
                row = await store.save_deposit_address(conn, account, asset, network, address)
        return F.GetDepositAddressResponse(
            deposit_address=F.DepositAddress(
                account_id=row["account_id"],
                asset=row["asset"],
                network=row["network"],
                address=row["address"],
                memo=row["memo"],
                create_time=timestamp(row["create_time"]),
            )
        )

    async def GetDeposit(
        self, request: funding_pb2.GetDepositRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> funding_pb2.GetDepositResponse:
        account = _account(request.account_id)
        found = await store.deposit(self.pool, request.deposit_id) if request.deposit_id else None
        row = _of_account(found, account, "deposit")
        return F.GetDepositResponse(deposit=self._deposit(row))

    async def ListDeposits(
        self, request: funding_pb2.ListDepositsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> funding_pb2.ListDepositsResponse:
        rows, token = await self._account_page(
            request,
            "deposits",
            store.list_deposits,
            _DEPOSIT_STATES,
            lambda r: (r.detect_time, r.deposit_id),
        )
        return F.ListDepositsResponse(
            deposits=[self._deposit(r) for r in rows], next_page_token=token
        )

    # -- withdrawals ------------------------------------------------------------

    async def RequestWithdrawal(
        self,
        request: funding_pb2.RequestWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.RequestWithdrawalResponse:
        account = _account(request.account_id, mutate=True)
        spec = domain.parse_withdrawal(
            request_id=request.request_id,
            asset_code=request.asset,
            network=request.network,
            amount=request.amount,
            address=request.address,
            memo=request.memo,
            max_fee=request.max_fee,
            assets=self.catalog.assets,
            rules=self.config.assets,
        )
        existing = await store.withdrawal_by_request(self.pool, account, request.request_id)
        if existing is None:
            try:
                existing = await self._create_withdrawal(account, request.request_id, spec)
                self.orchestrator.wake()
            except _Conflict:
                existing = await store.withdrawal_by_request(self.pool, account, request.request_id)
                assert existing is not None
        if existing.fingerprint != spec.fingerprint:
            raise AlreadyExists(
                "FUNDING_REQUEST_ID_REUSED",
                "request_id was used for a different withdrawal",
                metadata={"withdrawal_id": existing.withdrawal_id},
            )
        return F.RequestWithdrawalResponse(withdrawal=self._withdrawal(existing))

    async def _create_withdrawal(
        self, account: str, request_id: str, spec: domain.WithdrawalSpec
    ) -> store.WithdrawalRow:
        wid = f"wd_{uuid.uuid4().hex}"
        now = self._now()
        asset = self.catalog.assets[spec.asset]
        approval = domain.needs_approval(spec.amount, self._thresholds.get(spec.asset))
        wait_s = self.config.approval_timeout_s if approval else 0.0
        async with self.pool.acquire() as conn, conn.transaction():
            # The allowlist as it is now: a change to it waits for this request.
            await store.lock_allowlist(conn, account, shared=True)
            allowlist = await store.allowlist(conn, account)
            on = domain.allowlist_on(allowlist.enabled, allowlist.disable_time, now)
            listed = (
                await store.listed_address(conn, account, spec.asset, spec.address) if on else None
            )
            domain.check_destination(
                on=on,
                usable_time=listed.usable_time if listed else None,
                address=spec.address,
                asset=spec.asset,
                now=now,
            )
            saga_id = await self.orchestrator.create(
                conn,
                domain.WITHDRAWAL,
                reference_id=wid,
                account_id=account,
                data=domain.withdrawal_saga_data(
                    withdrawal_id=wid,
                    account_id=account,
                    spec=spec,
                    asset=asset,
                    approval_required=approval,
                ),
                extra_s=wait_s,
            )
            row = store.WithdrawalRow(
                withdrawal_id=wid,
                request_id=request_id,
                account_id=account,
                fingerprint=spec.fingerprint,
                asset=spec.asset,
                network=spec.network,
                amount=spec.amount,
                fee=spec.fee,
                address=spec.address,
                memo=spec.memo,
                state="PENDING",
                cancel_requested=False,
                broadcast_started=False,
                txid="",
                confirmations=0,
                required_confirmations=spec.required_confirmations,
                failure=None,
                saga_id=saga_id,
                create_time=now,
                update_time=now,
                complete_time=None,
                approval_required=approval,
                approval_deadline=domain.shift(now, wait_s) if approval else None,
            )
            if not await store.insert_withdrawal(conn, row):
                raise _Conflict  # the same request_id raced us: roll back our saga
            await store.emit(
                conn,
                "funding.withdrawals.pending",
                domain.withdrawal_event(
                    withdrawal_id=wid,
                    account_id=account,
                    asset=asset,
                    amount=spec.amount,
                    fee=spec.fee,
                    state="PENDING",
                    saga_id=saga_id,
                ),
            )
        return row

    async def _own_withdrawal(self, account: str, withdrawal_id: str) -> store.WithdrawalRow:
        found = await store.withdrawal(self.pool, withdrawal_id) if withdrawal_id else None
        return _of_account(found, account, "withdrawal")

    async def CancelWithdrawal(
        self,
        request: funding_pb2.CancelWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.CancelWithdrawalResponse:
        account = _mutating(request)
        row = await self._own_withdrawal(account, request.withdrawal_id)
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock order as the orchestrator's: the saga, then the withdrawal (the
            # cancel_requests row below key-share locks it too).
            await store.lock_saga_row(conn, row.saga_id)
            locked = await store.withdrawal(conn, row.withdrawal_id, lock=True)
            named = await store.record_cancel(conn, account, request.request_id, row.withdrawal_id)
            if named != row.withdrawal_id:
                raise AlreadyExists(
                    "FUNDING_REQUEST_ID_REUSED",
                    "request_id was used to cancel another withdrawal",
                    metadata={"withdrawal_id": named},
                )
            assert locked is not None
            if domain.cancel_withdrawal(
                locked.withdrawal_id,
                locked.state,
                locked.txid,
                cancel_requested=locked.cancel_requested,
                broadcast_started=locked.broadcast_started,
            ):
                await store.flag_withdrawal(conn, locked.withdrawal_id, cancel_requested=True)
                await self.orchestrator.nudge(conn, locked.saga_id)
        self.orchestrator.wake()
        current = await self._settled(row.withdrawal_id, context)
        return F.CancelWithdrawalResponse(withdrawal=self._withdrawal(current))

    async def _settled(
        self, withdrawal_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> store.WithdrawalRow:
        """The withdrawal once its cancel has run (a few seconds at most)."""
        remaining = context.time_remaining()
        until = time.monotonic() + min(5.0, (remaining - 0.5) if remaining else 5.0)
        while True:
            row = await store.withdrawal(self.pool, withdrawal_id)
            assert row is not None
            if row.state in domain.TERMINAL_WITHDRAWAL or time.monotonic() >= until:
                return row
            await asyncio.sleep(0.02)

    async def GetWithdrawal(
        self,
        request: funding_pb2.GetWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.GetWithdrawalResponse:
        account = _account(request.account_id)
        row = await self._own_withdrawal(account, request.withdrawal_id)
        return F.GetWithdrawalResponse(withdrawal=self._withdrawal(row))

    async def ListWithdrawals(
        self,
        request: funding_pb2.ListWithdrawalsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.ListWithdrawalsResponse:
        rows, token = await self._account_page(
            request,
            "withdrawals",
            store.list_withdrawals,
            _WITHDRAWAL_STATES,
            lambda r: (r.create_time, r.withdrawal_id),
        )
        return F.ListWithdrawalsResponse(
            withdrawals=[self._withdrawal(r) for r in rows], next_page_token=token
        )

    # -- the address allowlist --------------------------------------------------------

    async def AddWithdrawalAddress(
        self,
        request: funding_pb2.AddWithdrawalAddressRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.AddWithdrawalAddressResponse:
        account = _account(request.account_id, mutate=True)
        rule = domain.parse_withdrawal_address(
            request_id=request.request_id,
            asset_code=request.asset,
            network=request.network,
            address=request.address,
            label=request.label,
            rules=self.config.assets,
        )
        now = self._now()
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_allowlist(conn, account)
            key = await _Keyed.look_up(
                conn,
                account,
                request.request_id,
                "AddWithdrawalAddress",
                rule.asset,
                request.address,
                request.label,
            )
            if key.seen is not None:
                found = await store.withdrawal_address(conn, key.seen)
                assert found is not None
                return F.AddWithdrawalAddressResponse(withdrawal_address=self._address(found))
            new_id = f"wa_{uuid.uuid4().hex}"
            row = await store.add_withdrawal_address(
                conn,
                store.AddressRow(
                    address_id=new_id,
                    account_id=account,
                    asset=rule.asset,
                    network=rule.network,
                    address=request.address,
                    label=request.label,
                    create_time=now,
                    usable_time=domain.shift(now, self.config.address_cooling_s),
                    remove_time=None,
                ),
            )
            await key.remember(row.address_id)
            if row.address_id == new_id:  # not listed already
                await store.emit(
                    conn, "funding.withdrawal_addresses.added", self._address_event(row)
                )
        return F.AddWithdrawalAddressResponse(withdrawal_address=self._address(row))

    @staticmethod
    def _address_event(row: store.AddressRow) -> dict[str, Any]:
        return {
            "address_id": row.address_id,
            "account_id": row.account_id,
            "asset": row.asset,
            "address": row.address,
            "usable_time": row.usable_time.isoformat(),
        }

    async def RemoveWithdrawalAddress(
        self,
        request: funding_pb2.RemoveWithdrawalAddressRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.RemoveWithdrawalAddressResponse:
        account = _mutating(request)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_allowlist(conn, account)
            key = await _Keyed.look_up(
                conn, account, request.request_id, "RemoveWithdrawalAddress", request.address_id
            )
            found = (
                await store.withdrawal_address(conn, request.address_id)
                if request.address_id
                else None
            )
            row = _of_account(found, account, "withdrawal address")
            if row.remove_time is None:
                row = await store.remove_withdrawal_address(conn, row.address_id, self._now())
                await store.emit(
                    conn, "funding.withdrawal_addresses.removed", self._address_event(row)
                )
            if key.seen is None:
                await key.remember(row.address_id)
        return F.RemoveWithdrawalAddressResponse(withdrawal_address=self._address(row))

    async def ListWithdrawalAddresses(
        self,
        request: funding_pb2.ListWithdrawalAddressesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.ListWithdrawalAddressesResponse:
        account = _account(request.account_id)
        size = _page_size(request.page_size)
        rows, token = await _paged(
            size,
            request.page_token,
            "withdrawal_addresses",
            lambda r: (r.create_time, r.address_id),
            lambda after, limit: store.list_withdrawal_addresses(
                self.pool, account, asset=request.asset, after=after, limit=limit
            ),
        )
        return F.ListWithdrawalAddressesResponse(
            withdrawal_addresses=[self._address(r) for r in rows], next_page_token=token
        )

    async def GetWithdrawalAllowlist(
        self,
        request: funding_pb2.GetWithdrawalAllowlistRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.GetWithdrawalAllowlistResponse:
        account = _account(request.account_id)
        row = await store.allowlist(self.pool, account)
        return F.GetWithdrawalAllowlistResponse(withdrawal_allowlist=self._allowlist(row))

    async def SetWithdrawalAllowlist(
        self,
        request: funding_pb2.SetWithdrawalAllowlistRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.SetWithdrawalAllowlistResponse:
        account = _mutating(request)
        now = self._now()
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_allowlist(conn, account)
            current = await store.allowlist(conn, account)
            key = await _Keyed.look_up(
                conn, account, request.request_id, "SetWithdrawalAllowlist", str(request.enabled)
            )
            if key.seen is not None:
                return F.SetWithdrawalAllowlistResponse(
                    withdrawal_allowlist=self._allowlist(current)
                )
            enabled, disable_time = domain.allowlist_change(
                enabled=current.enabled,
                disable_time=current.disable_time,
                want=request.enabled,
                now=now,
                cooling_s=self.config.address_cooling_s,
            )
            row = current
            if (enabled, disable_time) != (current.enabled, current.disable_time):
                row = await store.save_allowlist(
                    conn, account, enabled=enabled, disable_time=disable_time, now=now
                )
                await store.emit(
                    conn,
                    "funding.withdrawal_allowlists.changed",
                    {
                        "account_id": account,
                        "enabled": enabled,
                        "disable_time": disable_time.isoformat() if disable_time else None,
                    },
                )
            await key.remember(account)
        return F.SetWithdrawalAllowlistResponse(withdrawal_allowlist=self._allowlist(row))

    # -- operators' reviews -------------------------------------------------------------

    async def ApproveWithdrawal(
        self,
        request: funding_pb2.ApproveWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.ApproveWithdrawalResponse:
        row = await self._review(request, domain.APPROVED)
        return F.ApproveWithdrawalResponse(withdrawal=self._withdrawal(row))

    async def RejectWithdrawal(
        self,
        request: funding_pb2.RejectWithdrawalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> funding_pb2.RejectWithdrawalResponse:
        domain.require_reason(request.reason)
        await self._review(request, domain.REJECTED)
        row = await self._settled(request.withdrawal_id, context)
        return F.RejectWithdrawalResponse(withdrawal=self._withdrawal(row))

    async def _review(
        self,
        request: funding_pb2.ApproveWithdrawalRequest | funding_pb2.RejectWithdrawalRequest,
        decision: str,
    ) -> store.WithdrawalRow:
        """Records an operator's decision under the saga's and the withdrawal's locks
        (the runner's order), and wakes the saga to act on it."""
        domain.check_request_id(request.request_id)
        ctx = current_auth()
        reviewer = ctx.key_id or ctx.service
        found = (
            await store.withdrawal(self.pool, request.withdrawal_id)
            if request.withdrawal_id
            else None
        )
        row = owned_resource(ctx, found, component="FUNDING", resource="withdrawal")
        domain.reviewer_may_review(ctx.account_id, row.account_id)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_saga_row(conn, row.saga_id)
            locked = await store.withdrawal(conn, row.withdrawal_id, lock=True)
            assert locked is not None
            key = await _Keyed.look_up(
                conn,
                f"review:{reviewer}",
                request.request_id,
                decision,
                row.withdrawal_id,
                request.reason,
            )
            if key.seen is not None:
                return locked
            if domain.review_withdrawal(
                locked.withdrawal_id,
                decision,
                state=locked.state,
                required=locked.approval_required,
                review=locked.review,
                cancel_requested=locked.cancel_requested,
                deadline=locked.approval_deadline,
                now=self._now(),
            ):
                locked = await store.review_withdrawal(
                    conn,
                    locked.withdrawal_id,
                    decision,
                    by=reviewer,
                    reason=request.reason,
                    now=self._now(),
                )
                await self.orchestrator.nudge(conn, locked.saga_id)
            await key.remember(locked.withdrawal_id)
        self.orchestrator.wake()
        return locked

    # -- operators -----------------------------------------------------------------

    async def ListSagas(
        self, request: funding_pb2.ListSagasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> funding_pb2.ListSagasResponse:
        size = _page_size(request.page_size)
        kind = _name(_KINDS, request.kind, "kind")
        state = _name(_SAGA_STATES, request.state, "state")
        rows, token = await _paged(
            size,
            request.page_token,
            "sagas",
            lambda r: (r.create_time, r.saga_id),
            lambda after, limit: store.list_sagas(
                self.pool,
                kind=kind,
                state=state,
                account_id=request.account_id,
                after=after,
                limit=limit,
            ),
        )
        return F.ListSagasResponse(sagas=[self._saga(r) for r in rows], next_page_token=token)

    async def GetSaga(
        self, request: funding_pb2.GetSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> funding_pb2.GetSagaResponse:
        async with self.pool.acquire() as conn:
            found = await store.saga(conn, request.saga_id) if request.saga_id else None
        row = owned_resource(current_auth(), found, component="FUNDING", resource="saga")
        return F.GetSagaResponse(saga=self._saga(row))


async def build_server(
    settings: ChassisSettings,
    *,
    config: FundingConfig | None = None,
    catalog: Catalog | None = None,
    clock: Callable[[], float] = time.time,
    registry: CollectorRegistry | None = None,
    crash_at: CrashAt = no_crash,
) -> Server:
    """The composition root. `crash_at` is the crash tests' fault injector (main.py)."""
    config = FundingConfig.from_env() if config is None else config
    catalog = load_catalog() if catalog is None else catalog
    registry = metrics_registry(registry, settings.metrics_port)
    server = Server(settings)
    infra = await connect(server, nats=config.outbox)
    # Each running saga step holds a connection for its two short transactions.
    pool = await server.enter(
        postgres(
            require(settings.database_url, "DATABASE_URL"),
            schema="funding",
            migrations=MIGRATIONS,
            max_size=max(10, min(40, config.concurrency // 2 + 8)),
        )
    )
    credentials = service_credentials(settings)
    ledger_target = config.ledger_target or settings.mesh_addr
    risk_target = config.risk_target or settings.mesh_addr
    if ledger_target is None or risk_target is None:
        raise ValueError("funding needs CEX_MESH_ADDR (or FUNDING_LEDGER/RISK_TARGET)")
    ledger_channel = await server.enter(mesh_channel(ledger_target, credentials=credentials))
    risk_channel = await server.enter(mesh_channel(risk_target, credentials=credentials))
    custody_channel = grpc.aio.insecure_channel(config.chain_target)
    server.on_stop(custody_channel.close)
    custody = CustodyClient(custody_channel, timeout_s=config.step_timeout_s)
    ledger = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
    withdrawal_steps = withdrawals.WithdrawalSteps(
        ledger=ledger,
        risk=risk_pb2_grpc.RiskServiceStub(risk_channel),
        custody=custody,
        assets=catalog.assets,
        step_timeout_s=config.step_timeout_s,
        confirmation_poll_s=config.confirmation_poll_s,
        deadline_s=config.withdrawal_deadline_s,
        compensation_window_s=config.compensation_window_s,
        pool=pool,
        approval_poll_s=config.approval_poll_s,
        clock=clock,
        account_states=server.follow_account_states(),
        account_state_max_age_s=config.account_state_max_age_s,
    )
    deposit_steps = deposits.DepositSteps(
        pool=pool,
        ledger=ledger,
        assets=catalog.assets,
        step_timeout_s=config.step_timeout_s,
        poll_s=config.confirmation_poll_s,
        deadline_s=config.deposit_deadline_s,
    )
    orchestrator = Orchestrator(
        pool,
        [withdrawal_steps.definition(), deposit_steps.definition()],
        owner=config.instance,
        metrics=SagaMetrics(registry),
        clock=clock,
        concurrency=config.concurrency,
        lease_s=config.lease_s,
        poll_s=config.poll_s,
        crash_at=crash_at,
    )
    server.on_stop(orchestrator.close)
    await server.enter(background(orchestrator.run(), "funding-sagas"))
    if config.watch_chain:
        watcher = deposits.ChainWatcher(
            pool=pool,
            custody=custody,
            orchestrator=orchestrator,
            assets=catalog.assets,
            rules=config.assets,
            poll_s=config.chain_poll_s,
            clock=clock,
            metrics=deposits.ChainMetrics(registry),
        )
        await server.enter(background(watcher.run(), "funding-chain-watcher"))
    if config.outbox and infra.nats is not None:
        relay = OutboxRelay(pool, infra.nats.jetstream(), poll_s=config.outbox_poll_s)
        await server.enter(background(relay.run(), "funding-outbox"))
    server.add(
        funding_pb2.DESCRIPTOR.services_by_name["FundingService"],
        funding_pb2_grpc.add_FundingServiceServicer_to_server,
        FundingService(
            pool=pool,
            orchestrator=orchestrator,
            custody=custody,
            catalog=catalog,
            config=config,
            clock=clock,
        ),
        policy=POLICY,
    )
    return server
