"""ledger service: proto <-> domain and errors, and the composition root.

`build_server` wires the pool, the channel to the balance owner (the match
group's writer, which applies every transfer: ADR 0013) and the auditor into
one `Server`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from prometheus_client import CollectorRegistry

from cex.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from cex.match.v1 import match_pb2
from services.chassis import (
    INTERNAL,
    AccountStates,
    Catalog,
    ChassisSettings,
    CommandStream,
    ExchangeError,
    FieldViolation,
    InvalidArgument,
    MoneyError,
    NotFound,
    Rule,
    Server,
    background,
    batch_size,
    connect,
    current_auth,
    load_catalog,
    mesh_channel,
    metrics_registry,
    owned_account,
    page_size,
    page_token,
    parse_page_token,
    require_request_id,
    sees_every_account,
    service_credentials,
    user,
)

from .auditor import Auditor, AuditReport, LedgerMetrics
from .config import LedgerConfig
from .domain import MAX_BATCH, Account, Kind, Op, Transfer, TransferInput, sub_transfer
from .owner import BalanceOwner
from .store import MIGRATIONS, Store

__all__ = ["POLICY", "LedgerService", "build_server"]

_MATCH_SERVICE = match_pb2.DESCRIPTOR.services_by_name["MatchService"].full_name


# Money moves only at the hands of services (order holds, funding sagas,
# settlement); a user may read their own balances and transfers.
POLICY: dict[str, Rule] = {
    "CreateTransfers": INTERNAL,
    "PostPendingTransfer": INTERNAL,
    "VoidPendingTransfer": INTERNAL,
    "GetTransfer": user("read", services=True),
    "GetBalances": user("read", services=True),  # a master's subs too (ADR 0017)
    # A master moves funds to and from its sub-accounts (ADR 0017).
    "TransferSubAccountFunds": user("trade"),
    "ListTransfers": user("read", services=True),
    "AuditLedger": user("admin", services=True),
}

_log = logging.getLogger("cex.ledger")


def _amount(catalog: Catalog, asset: str, text: str, field: str) -> int:
    known = catalog.assets.get(asset)
    if known is None:
        raise NotFound("LEDGER_ASSET_NOT_FOUND", f"unknown asset {asset!r}")
    try:
        return known.to_minor(text)
    except MoneyError as error:
        raise InvalidArgument(
            "LEDGER_AMOUNT_INVALID",
            f"{field}: {error}",
            violations=[FieldViolation(field, str(error), error.reason)],
        ) from None


def _fmt(units: int, scale: int) -> str:
    """Minor units as the canonical decimal string (what Asset.format gives, faster)."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**scale)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{str(frac).rjust(scale, '0').rstrip('0')}"


def _duration_ns(value: duration_pb2.Duration) -> int:
    return value.seconds * 1_000_000_000 + value.nanos


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    """cex.ledger.v1.LedgerService."""

    def __init__(
        self,
        store: Store,
        owner: BalanceOwner,
        auditor: Auditor,
        catalog: Catalog,
        account_states: AccountStates | None = None,
    ) -> None:
        self._states = account_states  # the frozen accounts (ADR 0004), for sub transfers
        self._store = store
        self._owner = owner
        self._auditor = auditor
        self._catalog = catalog
        self._stamp = (-1, timestamp_pb2.Timestamp())

    # -- conversions ---------------------------------------------------------

    def _input(self, t: ledger_pb2.Transfer, field: str, asset_hint: str) -> TransferInput:
        # A transfer's id is its idempotency key: required, as every request_id
        # (ADR 0003); the domain checks its characters.
        def at(name: str) -> str:  # the field's path in the request
            return f"{field}.{name}" if field else name

        require_request_id(t.id, "LEDGER_ID_INVALID", field=at("id"))
        flags = t.flags
        if sum((flags.pending, flags.post_pending, flags.void_pending)) > 1:
            raise InvalidArgument(
                "LEDGER_FLAGS_INVALID",
                "at most one of pending, post_pending, void_pending",
                violations=[FieldViolation(at("flags"), "conflicting flags")],
            )
        op = (
            Op.PENDING
            if flags.pending
            else Op.POST
            if flags.post_pending
            else Op.VOID
            if flags.void_pending
            else Op.SINGLE
        )
        if t.kind not in Kind._value2member_map_:
            raise InvalidArgument("LEDGER_KIND_INVALID", f"unknown kind {t.kind}")
        amount: int | None = None
        if t.amount:
            if op in (Op.POST, Op.VOID) and not (t.asset or asset_hint):
                raise InvalidArgument(
                    "LEDGER_ASSET_REQUIRED",
                    "asset is needed to read the amount of a post",
                    violations=[FieldViolation(at("asset"), "required with amount")],
                )
            amount = _amount(self._catalog, t.asset or asset_hint, t.amount, at("amount"))
        elif op in (Op.SINGLE, Op.PENDING):
            raise InvalidArgument(
                "LEDGER_AMOUNT_INVALID",
                "amount is required",
                violations=[FieldViolation(at("amount"), "required")],
            )
        if op in (Op.SINGLE, Op.PENDING) and t.asset not in self._catalog.assets:
            raise NotFound("LEDGER_ASSET_NOT_FOUND", f"unknown asset {t.asset!r}")
        return TransferInput(
            id=t.id,
            op=op,
            debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id,
            asset=t.asset,
            amount=amount,
            pending_id=t.pending_id,
            linked=t.flags.linked,
            timeout_ns=_duration_ns(t.timeout) if t.HasField("timeout") else 0,
            kind=Kind(t.kind),
            reference=t.reference,
        )

    def _transfer(self, t: Transfer) -> ledger_pb2.Transfer:
        asset = self._catalog.assets.get(t.asset)
        if self._stamp[0] != t.create_time_ns:
            self._stamp = (t.create_time_ns, _timestamp(t.create_time_ns))
        message = ledger_pb2.Transfer(
            id=t.id,
            debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id,
            asset=t.asset,
            amount=_fmt(t.amount, asset.scale) if asset else str(t.amount),
            pending_id=t.pending_id,
            flags=ledger_pb2.TransferFlags(
                linked=t.linked,
                pending=t.op == Op.PENDING,
                post_pending=t.op in (Op.POST, Op.CONSUME),
                void_pending=t.op == Op.VOID,
            ),
            kind=int(t.kind),  # type: ignore[arg-type]
            reference=t.reference,
            state=int(t.state),  # type: ignore[arg-type]
            sequence=t.sequence,
            create_time=self._stamp[1],
        )
        if t.timeout_ns:
            message.timeout.FromNanoseconds(t.timeout_ns)
        return message

    def _balance(self, a: Account) -> ledger_pb2.Balance:
        asset = self._catalog.assets.get(a.asset)
        fmt = asset.format if asset else str
        return ledger_pb2.Balance(
            account_id=a.account_id,
            asset=a.asset,
            debits_posted=fmt(a.debits_posted),
            credits_posted=fmt(a.credits_posted),
            debits_pending=fmt(a.debits_pending),
            credits_pending=fmt(a.credits_pending),
            available=fmt(a.available),
            held=fmt(a.debits_pending),
            total=fmt(a.credits_posted - a.debits_posted),
            update_time=_timestamp(a.update_time_ns) if a.update_time_ns else None,
        )

    async def _pending_asset(self, t: ledger_pb2.Transfer) -> str:
        """The asset of the pending transfer a post names, to read its amount."""
        if t.asset or not t.amount or not t.flags.post_pending:
            return ""
        found = await self._store.get_transfer(t.pending_id)
        return found.asset if found else ""

    async def _create(
        self, transfers: Sequence[ledger_pb2.Transfer], *, single: bool = False
    ) -> list[Transfer | ExchangeError]:
        items: list[TransferInput | ExchangeError] = []
        for index, t in enumerate(transfers):
            try:
                hint = await self._pending_asset(t)
                items.append(self._input(t, "" if single else f"transfers[{index}]", hint))
            except ExchangeError as error:
                items.append(error)
        return await self._owner.transfers(items, [t.flags.linked for t in transfers])

    # -- methods --------------------------------------------------------------

    async def CreateTransfers(
        self,
        request: ledger_pb2.CreateTransfersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ledger_pb2.CreateTransfersResponse:
        batch_size(
            len(request.transfers),
            maximum=MAX_BATCH,
            field="transfers",
            reason="LEDGER_BATCH_SIZE_INVALID",
        )
        outcomes = await self._create(request.transfers)
        results = []
        for t, outcome in zip(request.transfers, outcomes, strict=True):
            if isinstance(outcome, ExchangeError):
                results.append(
                    ledger_pb2.CreateTransferResult(id=t.id, status=outcome.to_status("ledger"))
                )
            else:
                results.append(
                    ledger_pb2.CreateTransferResult(id=t.id, transfer=self._transfer(outcome))
                )
        return ledger_pb2.CreateTransfersResponse(results=results)

    async def _single(self, transfer: ledger_pb2.Transfer) -> ledger_pb2.Transfer:
        (outcome,) = await self._create([transfer], single=True)
        if isinstance(outcome, ExchangeError):
            raise outcome
        return self._transfer(outcome)

    async def _close_pending(
        self,
        request: ledger_pb2.PostPendingTransferRequest | ledger_pb2.VoidPendingTransferRequest,
        flags: ledger_pb2.TransferFlags,
        amount: str = "",
    ) -> ledger_pb2.Transfer:
        """Post or void a pending transfer: one more transfer naming it."""
        transfer = ledger_pb2.Transfer(
            id=request.id,
            pending_id=request.pending_id,
            amount=amount,
            reference=request.reference,
            flags=flags,
        )
        return await self._single(transfer)

    async def TransferSubAccountFunds(
        self,
        request: ledger_pb2.TransferSubAccountFundsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ledger_pb2.TransferSubAccountFundsResponse:
        ctx = current_auth()
        require_request_id(request.request_id, "LEDGER_REQUEST_ID_REQUIRED")
        transfer_id = sub_transfer(
            ctx.account_id,
            ctx.subs,
            request.from_account_id,
            request.to_account_id,
            request.request_id,
        )
        # A frozen sub's funds stay where they are (its master's freeze refused the
        # call already): the freeze stops every movement but an operator's.
        if self._states is not None:
            other = request.to_account_id
            if other == ctx.account_id:
                other = request.from_account_id
            self._states.refuse_frozen(other)
        # One transfer through the balance owner, as every transfer (ADR 0013):
        # sequenced by the writer, refused there beyond the available balance.
        transfer = ledger_pb2.Transfer(
            id=transfer_id,
            debit_account_id=request.from_account_id,
            credit_account_id=request.to_account_id,
            asset=request.asset,
            amount=request.amount,
            kind=ledger_pb2.TRANSFER_KIND_SUB_ACCOUNT,
            reference=ctx.account_id,
        )
        return ledger_pb2.TransferSubAccountFundsResponse(transfer=await self._single(transfer))

    async def PostPendingTransfer(
        self,
        request: ledger_pb2.PostPendingTransferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ledger_pb2.PostPendingTransferResponse:
        flags = ledger_pb2.TransferFlags(post_pending=True)
        transfer = await self._close_pending(request, flags, request.amount)
        return ledger_pb2.PostPendingTransferResponse(transfer=transfer)

    async def VoidPendingTransfer(
        self,
        request: ledger_pb2.VoidPendingTransferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ledger_pb2.VoidPendingTransferResponse:
        flags = ledger_pb2.TransferFlags(void_pending=True)
        transfer = await self._close_pending(request, flags)
        return ledger_pb2.VoidPendingTransferResponse(transfer=transfer)

    async def GetTransfer(
        self, request: ledger_pb2.GetTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.GetTransferResponse:
        found = await self._store.get_transfer(request.id)
        ctx = current_auth()
        if found is None or not (
            sees_every_account(ctx)
            or ctx.account_id in (found.debit_account_id, found.credit_account_id)
        ):
            raise NotFound("LEDGER_TRANSFER_NOT_FOUND", f"no transfer {request.id}")
        return ledger_pb2.GetTransferResponse(transfer=self._transfer(found))

    async def GetBalances(
        self, request: ledger_pb2.GetBalancesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.GetBalancesResponse:
        account_id = owned_account(current_auth(), request.account_id, component="LEDGER")
        for asset in request.assets:
            if asset not in self._catalog.assets:
                raise NotFound("LEDGER_ASSET_NOT_FOUND", f"unknown asset {asset!r}")
        accounts = await self._store.balances(account_id, list(request.assets))
        # Zero is a balance: every asset asked for is answered (zero if never held);
        # without a filter, the assets the account has used, or every asset at
        # zero for an account that has used none (a new account is not an error).
        held = {a.asset for a in accounts}
        asked = list(dict.fromkeys(request.assets))
        wanted = asked or ([] if accounts else list(self._catalog.assets))
        accounts += [Account(account_id, asset) for asset in wanted if asset not in held]
        accounts.sort(key=lambda a: a.asset)
        return ledger_pb2.GetBalancesResponse(balances=[self._balance(a) for a in accounts])

    async def ListTransfers(
        self, request: ledger_pb2.ListTransfersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.ListTransfersResponse:
        size = page_size(
            request.page_size, default=100, maximum=1000, reason="LEDGER_PAGE_SIZE_INVALID"
        )
        after = parse_page_token(
            request.page_token, "transfers", int, parts=1, reason="LEDGER_PAGE_TOKEN_INVALID"
        )
        ctx = current_auth()
        account_id = request.account_id
        if not sees_every_account(ctx):  # who does may list every account's
            account_id = owned_account(ctx, account_id, component="LEDGER")
        found = await self._store.list_transfers(
            account_id=account_id,
            asset=request.asset,
            reference=request.reference,
            kind=int(request.kind),
            state=int(request.state),
            start_ns=request.start_time.ToNanoseconds() if request.HasField("start_time") else None,
            end_ns=request.end_time.ToNanoseconds() if request.HasField("end_time") else None,
            after_sequence=after or 0,
            limit=size + 1,
        )
        token = ""
        if len(found) > size:
            found = found[:size]
            token = page_token("transfers", str(found[-1].sequence))
        return ledger_pb2.ListTransfersResponse(
            transfers=[self._transfer(t) for t in found], next_page_token=token
        )

    async def AuditLedger(
        self, request: ledger_pb2.AuditLedgerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.AuditLedgerResponse:
        report = await self._auditor.audit(list(request.assets))
        return self._audit(report)

    def _audit(self, report: AuditReport) -> ledger_pb2.AuditLedgerResponse:
        results = []
        for a in report.assets:
            asset = self._catalog.assets.get(a.asset)
            fmt = asset.format if asset else str
            results.append(
                ledger_pb2.AssetAudit(
                    asset=a.asset,
                    debits_posted=fmt(a.debits_posted),
                    credits_posted=fmt(a.credits_posted),
                    debits_pending=fmt(a.debits_pending),
                    credits_pending=fmt(a.credits_pending),
                    balanced=a.balanced,
                    account_count=a.account_count,
                    negative_account_ids=a.negative_account_ids,
                    pending_transfer_count=a.pending_transfer_count,
                )
            )
        return ledger_pb2.AuditLedgerResponse(
            results=results,
            balanced=report.balanced,
            sequence=report.sequence,
            audit_time=_timestamp(time.time_ns()),
        )


async def build_server(
    settings: ChassisSettings,
    *,
    config: LedgerConfig | None = None,
    catalog: Catalog | None = None,
    match_target: str | None = None,
    registry: CollectorRegistry | None = None,
) -> Server:
    """The composition root. match_target overrides where the balance owner is."""
    config = LedgerConfig.from_env() if config is None else config
    catalog = load_catalog() if catalog is None else catalog
    registry = metrics_registry(registry, settings.metrics_port)
    metrics = LedgerMetrics(registry)
    server = Server(settings)
    infra = await connect(server, schema="ledger", migrations=MIGRATIONS, session_reset=False)
    pool = infra.pool
    assert isinstance(pool, asyncpg.Pool)
    store = Store(pool, catalog.assets)
    target = match_target or config.match_target or settings.mesh_addr
    if target is None:
        raise ValueError("the ledger needs LEDGER_MATCH_TARGET or CEX_MESH_ADDR")
    credentials = service_credentials(settings)
    channel = await server.enter(
        mesh_channel(target, credentials=credentials, authority="match", serving=_MATCH_SERVICE)
    )
    # One long-lived, batched command stream to the writer for every request
    # (a stream per request halved single transfers/s: docs/benchmarks.md).
    stream = CommandStream(
        channel,
        reason="LEDGER_UNAVAILABLE",
        name="ledger_transfers",
        token=credentials.token if credentials else None,
        max_weight=MAX_BATCH,
        weight=lambda command: len(command.transfers.transfers),
    )
    await server.enter(background(stream.run(), "ledger-command-stream"))
    auditor = Auditor(pool, metrics)
    if config.audit_interval_s > 0:
        await server.enter(background(auditor.run(config.audit_interval_s), "ledger-auditor"))
    server.add(
        ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server,
        LedgerService(
            store,
            BalanceOwner(stream, store),
            auditor,
            catalog,
            account_states=server.follow_account_states(),
        ),
        policy=POLICY,
    )
    return server
