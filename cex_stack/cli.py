"""`cex`: run the local exchange and look at it.

cex up              start every component, print the endpoints, run until Ctrl-C
                    (--replicas order=2,...: several processes of a service)
cex status          each component's health; exits non-zero unless all are healthy
cex account create  create an account (as the operator of the running stack)
cex apikey create   create an API key for an account; prints its id and secret once
cex token           exchange an API key for an access token (prints the JWT)
cex deposit         a real deposit through the chain simulator, waited for until credited
cex audit           the ledger's audit (AuditLedger) as the operator
cex withdrawal      approve or reject a withdrawal that waits for an operator
cex market status   move a market between TRADING, POST_ONLY, ... at runtime
cex fees            the fee schedule and accounts' fee tiers (show, set, assign, evaluate)
cex subaccount      a master's sub-accounts (create, list, apikey, transfer, limits,
                    balances, orders)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .supervisor import Stack, StackError
from .topology import SERVICES, Ports, parse_replicas

__all__ = ["main"]


def _state_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("CEX_STATE_DIR") or ".cex")


def _ports(arg: int | None) -> Ports:
    return Ports(base=arg or int(os.environ.get("CEX_PORT_BASE", "50050")))


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {right}" for left, right in rows)


async def _up(stack: Stack) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    starting = asyncio.create_task(stack.start())
    stopper = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:  # Ctrl-C during start: start() cleans up after itself
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 130
    try:
        took = starting.result()
    except StackError as error:
        print(f"cex: the stack did not come up: {error}", file=sys.stderr)
        return 1
    rows = [(c.name, c.endpoint) for c in stack.components()]
    print(f"cex: all {len(rows)} components healthy in {took:.1f}s\n{_table(rows)}")
    print(f"\n{_table(list(stack.endpoints().items()))}\n\nlogs: {stack.logs}   Ctrl-C stops")
    sys.stdout.flush()
    await stopper
    print("cex: stopping", file=sys.stderr)
    await stack.stop()
    print("cex: stopped", file=sys.stderr)
    return 0


async def _status(state_dir: Path) -> int:
    state_file = state_dir / "stack.json"
    if not state_file.exists():
        print(f"cex: no stack is running from {state_dir} (no {state_file.name})", file=sys.stderr)
        return 1
    state = json.loads(state_file.read_text())
    env = {
        "DATABASE_URL": state["database_url"],
        "NATS_URL": state["nats_url"],
        "REDIS_URL": state["redis_url"],
    }
    stack = Stack(
        state_dir,
        Ports(base=state["base_port"], host=state["host"]),
        env,
        replicas=state.get("replicas") or {},
    )
    health = await stack.health()
    rows = [(name, "healthy" if ok else "UNHEALTHY") for name, ok in health.items()]
    print(_table(rows))
    print(f"\n{_table(list(stack.endpoints().items()))}")
    return 0 if all(health.values()) else 1


async def _top(state_dir: Path, args: argparse.Namespace) -> int:
    from .top import watch

    state_file = state_dir / "stack.json"
    if not state_file.exists():
        raise SystemExit(f"cex: no stack is running from {state_dir} (start it: make run)")
    state = json.loads(state_file.read_text())
    ports = Ports(base=state["base_port"], host=state["host"])
    await watch(ports, SERVICES, interval_s=args.interval, rounds=1 if args.once else None)
    return 0


def _running_stack(state_dir: Path) -> Stack:
    """The stack running from `state_dir` (its ports and service secret)."""
    state_file = state_dir / "stack.json"
    if not state_file.exists():
        raise SystemExit(f"cex: no stack is running from {state_dir} (start it: make run)")
    state = json.loads(state_file.read_text())
    return Stack(state_dir, Ports(base=state["base_port"], host=state["host"]), dict(os.environ))


def _running(state_dir: Path) -> tuple[str, str]:
    """(edge address, service secret) of the stack running from `state_dir`."""
    stack = _running_stack(state_dir)
    return stack.edge, stack.service_secret


def _client(stack: Stack, *, operator: bool) -> Any:
    """A `cex_sdk.Client` of the stack: as its operator (`svc:cli`, from the service
    secret), or with the API key in CEX_API_KEY_ID / CEX_API_KEY_SECRET."""
    from cex_sdk import Client
    from services.chassis.authn import service_secret

    if operator:
        return Client.from_api_key(
            stack.edge, "svc:cli", service_secret(stack.service_secret, "cli")
        )
    key_id = os.environ.get("CEX_API_KEY_ID", "")
    secret = os.environ.get("CEX_API_KEY_SECRET", "")
    if not key_id or not secret:
        raise SystemExit("cex: give --account, or set CEX_API_KEY_ID and CEX_API_KEY_SECRET")
    return Client.from_api_key(stack.edge, key_id, secret)


def _failed(error: Exception) -> SystemExit:
    from cex_sdk import CexError

    if isinstance(error, CexError):
        return SystemExit(f"cex: {error.code.name} {error.reason}: {error.message}")
    return SystemExit(f"cex: {error}")


async def _deposit(state_dir: Path, args: argparse.Namespace) -> int:
    from cex.funding.v1 import funding_pb2 as F
    from cex_sdk import CexError

    from .funds import DepositFailed, deposit

    stack = _running_stack(state_dir)
    chain = f"{stack.ports.host}:{stack.ports.chainsim}"

    def progress(d: F.Deposit) -> None:
        print(
            f"cex: {d.amount} {d.asset} to {d.address} (tx {d.txid[:16]}...): "
            f"{d.confirmations}/{d.required_confirmations} confirmations",
            file=sys.stderr,
            flush=True,
        )

    async with _client(stack, operator=bool(args.account)) as client:
        try:
            done = await deposit(
                client,
                chain,
                args.asset,
                args.amount,
                account_id=args.account or "",
                timeout_s=args.timeout,
                progress=progress,
            )
        except (CexError, DepositFailed) as error:
            raise _failed(error) from None
    d, b = done.deposit, done.balance
    print(
        f"credited {d.amount} {d.asset} to {d.account_id} (deposit {d.deposit_id}); "
        f"balance {b.asset}: available {b.available}, held {b.held}"
    )
    return 0


async def _audit(state_dir: Path, args: argparse.Namespace) -> int:
    from cex.ledger.v1 import ledger_pb2 as L
    from cex_sdk import CexError

    async with _client(_running_stack(state_dir), operator=True) as client:
        try:
            reply = await client.call(
                "/cex.ledger.v1.LedgerService/AuditLedger",
                L.AuditLedgerRequest(assets=args.asset or []),
                L.AuditLedgerResponse,
                timeout_s=60,
            )
        except CexError as error:
            raise _failed(error) from None
    rows = [
        (
            a.asset,
            f"{'balanced' if a.balanced else 'UNBALANCED'}  debits {a.debits_posted} = "
            f"credits {a.credits_posted}, pending {a.debits_pending} = {a.credits_pending}, "
            f"{a.account_count} accounts, {a.pending_transfer_count} open holds"
            + (
                f", negative: {', '.join(a.negative_account_ids)}" if a.negative_account_ids else ""
            ),
        )
        for a in reply.results
    ]
    verdict = "balanced" if reply.balanced else "NOT BALANCED"
    print(f"ledger {verdict} at sequence {reply.sequence}")
    if rows:
        print(_table(rows))
    return 0 if reply.balanced else 1


_MARKET_STATUSES = ("trading", "post-only", "cancel-only", "halted", "delisted")


async def _market(state_dir: Path, args: argparse.Namespace) -> int:
    if args.action == "list-new":
        return await _market_list_new(state_dir, args)
    return await _market_status(state_dir, args)


async def _market_list_new(state_dir: Path, args: argparse.Namespace) -> int:
    """CreateMarket as the operator (ADR 0018); prints the market as listed."""
    import uuid

    from cex.match.v1 import match_pb2 as M
    from cex_sdk import CexError

    base, _, quote = args.market.partition("-")
    async with _client(_running_stack(state_dir), operator=True) as client:
        try:
            reply = await client.call(
                "/cex.match.v1.MatchService/CreateMarket",
                M.CreateMarketRequest(
                    symbol=args.market,
                    base=base,
                    quote=quote,
                    tick_size=args.tick_size,
                    lot_size=args.lot_size,
                    min_quantity=args.min_quantity or "",
                    max_quantity=args.max_quantity,
                    min_notional=args.min_notional,
                    price_band=args.price_band or "",
                    reason=args.reason,
                    request_id=args.request_id or str(uuid.uuid4()),
                ),
                M.CreateMarketResponse,
                timeout_s=30,
            )
        except CexError as error:
            raise _failed(error) from None
    m = reply.listing.market
    band = f", price band {m.price_band}" if m.price_band else ""
    print(
        f"{m.symbol} listed at seq {reply.seq}: tick {m.tick_size}, lot {m.lot_size}, "
        f"quantity {m.min_quantity}..{m.max_quantity}, min notional {m.min_notional}{band}"
    )
    return 0


async def _market_status(state_dir: Path, args: argparse.Namespace) -> int:
    """SetMarketStatus as the operator (ADR 0015); prints the change."""
    import uuid

    from cex.match.v1 import match_pb2 as M
    from cex.type.v1 import types_pb2 as T
    from cex_sdk import CexError

    status = T.MarketStatus.Value("MARKET_STATUS_" + args.status.upper().replace("-", "_"))
    async with _client(_running_stack(state_dir), operator=True) as client:
        try:
            reply = await client.call(
                "/cex.match.v1.MatchService/SetMarketStatus",
                M.SetMarketStatusRequest(
                    market=args.market,
                    status=status,
                    reason=args.reason,
                    request_id=args.request_id or str(uuid.uuid4()),
                ),
                M.SetMarketStatusResponse,
                timeout_s=30,
            )
        except CexError as error:
            raise _failed(error) from None
    c = reply.change
    name = T.MarketStatus.Name
    line = (
        f"{args.market} {name(c.previous_status)[14:]} -> {name(c.status)[14:]} at seq {reply.seq}"
    )
    if reply.cancelled_orders:
        line += f"; {reply.cancelled_orders} open orders cancelled, their funds released"
    print(line)
    return 0


async def _review(state_dir: Path, args: argparse.Namespace) -> int:
    """ApproveWithdrawal / RejectWithdrawal as the operator; prints the withdrawal's state."""
    import uuid

    from cex.funding.v1 import funding_pb2 as F
    from cex_sdk import CexError

    method, request, response = {
        "approve": ("ApproveWithdrawal", F.ApproveWithdrawalRequest, F.ApproveWithdrawalResponse),
        "reject": ("RejectWithdrawal", F.RejectWithdrawalRequest, F.RejectWithdrawalResponse),
    }[args.action]
    async with _client(_running_stack(state_dir), operator=True) as client:
        try:
            reply = await client.call(
                f"/cex.funding.v1.FundingService/{method}",
                request(
                    request_id=args.request_id or str(uuid.uuid4()),
                    withdrawal_id=args.withdrawal,
                    reason=args.reason or "",
                ),
                response,
                timeout_s=30,
            )
        except CexError as error:
            raise _failed(error) from None
    w = reply.withdrawal
    print(
        f"{w.withdrawal_id} {F.WithdrawalState.Name(w.state)} {F.WithdrawalReview.Name(w.review)}"
    )
    return 0


async def _issue(edge: str, key_id: str, secret: str) -> str:
    import grpc

    from cex.auth.v1 import auth_pb2, auth_pb2_grpc

    async with grpc.aio.insecure_channel(edge) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret), timeout=10
        )
    return reply.access_token


async def _operator_call(state_dir: Path, method: str, request: object) -> object:
    """Call auth as the operator: the `svc:cli` credential from the stack's service secret."""
    import grpc

    from cex.auth.v1 import auth_pb2_grpc
    from services.chassis import ErrorDetails
    from services.chassis.authn import service_secret

    edge, secret = _running(state_dir)
    try:
        token = await _issue(edge, "svc:cli", service_secret(secret, "cli"))
        async with grpc.aio.insecure_channel(edge) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            return await getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
    except grpc.aio.AioRpcError as error:
        details = ErrorDetails.from_rpc_error(error)
        raise SystemExit(f"cex: {details.code.name} {details.reason}: {details.message}") from None


async def _account_create(state_dir: Path, args: argparse.Namespace) -> int:
    import uuid

    from cex.auth.v1 import auth_pb2

    kinds = {
        "individual": auth_pb2.ACCOUNT_TYPE_INDIVIDUAL,
        "market-maker": auth_pb2.ACCOUNT_TYPE_MARKET_MAKER,
        "institutional": auth_pb2.ACCOUNT_TYPE_INSTITUTIONAL,
    }
    reply = await _operator_call(
        state_dir,
        "CreateAccount",
        auth_pb2.CreateAccountRequest(
            request_id=args.request_id or str(uuid.uuid4()),
            display_name=args.name,
            email=args.email or "",
            type=kinds[args.type],
        ),
    )
    assert isinstance(reply, auth_pb2.CreateAccountResponse)
    print(reply.account.account_id)
    return 0


async def _account_state(state_dir: Path, args: argparse.Namespace) -> int:
    import uuid

    from cex.auth.v1 import auth_pb2

    states = {
        "freeze": auth_pb2.ACCOUNT_STATE_SUSPENDED,
        "unfreeze": auth_pb2.ACCOUNT_STATE_ACTIVE,
        "close": auth_pb2.ACCOUNT_STATE_CLOSED,
    }
    reply = await _operator_call(
        state_dir,
        "SetAccountState",
        auth_pb2.SetAccountStateRequest(
            request_id=args.request_id or str(uuid.uuid4()),
            account_id=args.account,
            state=states[args.action],
            reason=args.reason or "",
        ),
    )
    assert isinstance(reply, auth_pb2.SetAccountStateResponse)
    print(f"{reply.account.account_id} {auth_pb2.AccountState.Name(reply.account.state)}")
    return 0


def _schedule_lines(schedule: Any) -> str:
    return "\n".join(
        f"{t.name:<12} maker {t.maker_fee_bps:>7} bps  taker {t.taker_fee_bps:>7} bps  "
        f"from {t.min_volume} {schedule.volume_asset}"
        for t in schedule.tiers
    )


def _tier_arg(text: str) -> Any:
    """`name:maker_bps:taker_bps:min_volume` as a FeeTier."""
    from cex.auth.v1 import auth_pb2

    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(
            "NAME:MAKER_BPS:TAKER_BPS:MIN_VOLUME, e.g. vip1:5:15:1000000"
        )
    name, maker, taker, volume = parts
    return auth_pb2.FeeTier(name=name, maker_fee_bps=maker, taker_fee_bps=taker, min_volume=volume)


async def _fees(state_dir: Path, args: argparse.Namespace) -> int:
    """The fee-schedule admin calls of auth as the operator (ADR 0016)."""
    import uuid

    from cex.auth.v1 import auth_pb2

    request_id = getattr(args, "request_id", None) or str(uuid.uuid4())
    if args.action == "schedule":
        shown = await _operator_call(state_dir, "GetFeeSchedule", auth_pb2.GetFeeScheduleRequest())
        assert isinstance(shown, auth_pb2.GetFeeScheduleResponse)
        print(_schedule_lines(shown.schedule))
    elif args.action == "set-schedule":
        set_reply = await _operator_call(
            state_dir,
            "SetFeeSchedule",
            auth_pb2.SetFeeScheduleRequest(
                request_id=request_id, tiers=args.tier, reason=args.reason or ""
            ),
        )
        assert isinstance(set_reply, auth_pb2.SetFeeScheduleResponse)
        print(_schedule_lines(set_reply.schedule))
    elif args.action in ("assign", "unassign"):
        assigned = await _operator_call(
            state_dir,
            "SetAccountFeeTier",
            auth_pb2.SetAccountFeeTierRequest(
                request_id=request_id,
                account_id=args.account,
                fee_tier=args.tier if args.action == "assign" else "",
                reason=args.reason or "",
            ),
        )
        assert isinstance(assigned, auth_pb2.SetAccountFeeTierResponse)
        a = assigned.account
        print(f"{a.account_id} {a.fee_tier} ({'assigned' if a.fee_tier_assigned else 'by volume'})")
    else:
        measured = await _operator_call(
            state_dir, "EvaluateFeeTiers", auth_pb2.EvaluateFeeTiersRequest()
        )
        assert isinstance(measured, auth_pb2.EvaluateFeeTiersResponse)
        print(f"{measured.accounts_measured} accounts measured, {len(measured.changed)} moved")
        for change in measured.changed:
            print(f"{change.account_id} -> {change.fee_tier}")
    return 0


async def _subaccount(state_dir: Path, args: argparse.Namespace) -> int:
    """A master's calls on its sub-accounts (ADR 0017), with the master's API key
    (CEX_API_KEY_ID / CEX_API_KEY_SECRET); `create` and `list` with --master as
    the operator."""
    import uuid

    from cex.auth.v1 import auth_pb2 as A
    from cex.ledger.v1 import ledger_pb2 as L
    from cex.order.v1 import order_pb2 as O
    from cex.risk.v1 import risk_pb2 as RK
    from cex.type.v1 import types_pb2 as T
    from cex_sdk import CexError

    master = getattr(args, "master", None) or ""
    request_id = getattr(args, "request_id", None) or str(uuid.uuid4())
    async with _client(_running_stack(state_dir), operator=bool(master)) as client:
        try:
            if args.action == "create":
                created = await client.call(
                    "/cex.auth.v1.AuthService/CreateSubAccount",
                    A.CreateSubAccountRequest(
                        request_id=request_id, display_name=args.name, master_account_id=master
                    ),
                    A.CreateSubAccountResponse,
                )
                print(created.account.account_id)
            elif args.action == "list":
                listed = await client.call(
                    "/cex.auth.v1.AuthService/ListSubAccounts",
                    A.ListSubAccountsRequest(master_account_id=master, page_size=100),
                    A.ListSubAccountsResponse,
                )
                for a in listed.accounts:
                    print(f"{a.account_id} {A.AccountState.Name(a.state)[14:]} {a.display_name}")
            elif args.action == "apikey":
                scopes = [
                    A.ApiKeyScope.Value(f"API_KEY_SCOPE_{name.strip().upper()}")
                    for name in args.scopes.split(",")
                    if name.strip()
                ]
                key = await client.call(
                    "/cex.auth.v1.AuthService/CreateApiKey",
                    A.CreateApiKeyRequest(
                        request_id=request_id,
                        account_id=args.sub,
                        label=args.label or "",
                        scopes=scopes,
                        allowed_cidrs=args.allow or [],
                    ),
                    A.CreateApiKeyResponse,
                )
                print(f"export CEX_API_KEY_ID={key.api_key.api_key_id}")
                print(f"export CEX_API_KEY_SECRET={key.secret}")
                print("cex: the secret is shown once; store it now", file=sys.stderr)
            elif args.action == "transfer":
                moved = await client.call(
                    "/cex.ledger.v1.LedgerService/TransferSubAccountFunds",
                    L.TransferSubAccountFundsRequest(
                        request_id=request_id,
                        from_account_id=getattr(args, "from"),
                        to_account_id=args.to,
                        asset=args.asset,
                        amount=args.amount,
                    ),
                    L.TransferSubAccountFundsResponse,
                )
                t = moved.transfer
                print(f"{t.id} {t.amount} {t.asset} {t.debit_account_id} -> {t.credit_account_id}")
            elif args.action == "limits":
                limited = await client.call(
                    "/cex.risk.v1.RiskService/SetSubAccountLimits",
                    RK.SetSubAccountLimitsRequest(
                        request_id=request_id,
                        limits=RK.Limits(
                            account_id=args.sub,
                            max_orders_per_second=args.orders_per_second,
                            max_open_orders=args.open_orders,
                        ),
                    ),
                    RK.SetSubAccountLimitsResponse,
                )
                lim = limited.limits
                print(
                    f"{lim.account_id} {lim.max_orders_per_second} orders/s, "
                    f"{lim.max_open_orders} open (version {lim.version})"
                )
            elif args.action == "balances":
                balances = await client.call(
                    "/cex.ledger.v1.LedgerService/GetBalances",
                    L.GetBalancesRequest(account_id=args.sub),
                    L.GetBalancesResponse,
                )
                for b in balances.balances:
                    print(f"{b.asset:<6} available {b.available} held {b.held}")
            else:
                orders = await client.call(
                    "/cex.order.v1.OrderService/ListOrders",
                    O.ListOrdersRequest(account_id=args.sub, page_size=100),
                    O.ListOrdersResponse,
                )
                for o in orders.orders:
                    print(
                        f"{o.order_id} {o.market} {T.Side.Name(o.side)[5:]} {o.quantity} @ "
                        f"{o.price} {T.OrderState.Name(o.state)[12:]}"
                    )
        except CexError as error:
            raise _failed(error) from None
    return 0


async def _apikey_create(state_dir: Path, args: argparse.Namespace) -> int:
    import uuid

    from cex.auth.v1 import auth_pb2

    scopes = [
        auth_pb2.ApiKeyScope.Value(f"API_KEY_SCOPE_{name.strip().upper()}")
        for name in args.scopes.split(",")
        if name.strip()
    ]
    reply = await _operator_call(
        state_dir,
        "CreateApiKey",
        auth_pb2.CreateApiKeyRequest(
            request_id=str(uuid.uuid4()),
            account_id=args.account,
            label=args.label or "",
            scopes=scopes,
            allowed_cidrs=args.allow or [],
        ),
    )
    assert isinstance(reply, auth_pb2.CreateApiKeyResponse)
    print(f"export CEX_API_KEY_ID={reply.api_key.api_key_id}")
    print(f"export CEX_API_KEY_SECRET={reply.secret}")
    print("cex: the secret is shown once; store it now", file=sys.stderr)
    return 0


async def _token(state_dir: Path, args: argparse.Namespace) -> int:
    import grpc

    from services.chassis import ErrorDetails

    key_id = args.key_id or os.environ.get("CEX_API_KEY_ID", "")
    secret = os.environ.get("CEX_API_KEY_SECRET", "")
    if not key_id or not secret:
        print("cex: set CEX_API_KEY_ID and CEX_API_KEY_SECRET", file=sys.stderr)
        return 2
    edge, _ = _running(state_dir)
    try:
        print(await _issue(edge, key_id, secret))
    except grpc.aio.AioRpcError as error:
        details = ErrorDetails.from_rpc_error(error)
        print(f"cex: {details.code.name} {details.reason}: {details.message}", file=sys.stderr)
        return 1
    return 0


async def _traces(listen: str, quiet_s: float) -> int:
    """Print every trace the stack exports, as a tree, once it has been quiet for `quiet_s`."""
    from .collector import collector, render_trace

    async with collector(listen=listen) as found:
        print(f"cex: receiving OTLP/gRPC traces on {listen} (Ctrl-C to stop)", flush=True)
        last_seen: dict[str, tuple[int, float]] = {}  # trace id -> (spans, when it grew)
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            by_trace: dict[str, int] = {}
            for span in found.spans:
                by_trace[span.trace_id] = by_trace.get(span.trace_id, 0) + 1
            for trace_id, count in by_trace.items():
                seen = last_seen.get(trace_id)
                if seen is None or seen[0] != count:
                    last_seen[trace_id] = (count, now)
                elif now - seen[1] >= quiet_s:
                    print(render_trace(found.trace(trace_id)), end="\n\n", flush=True)
                    found.spans = [s for s in found.spans if s.trace_id != trace_id]
                    del last_seen[trace_id]


# Commands that are one call against the running stack.
_HANDLERS: dict[str, Any] = {
    "apikey": _apikey_create,
    "token": _token,
    "deposit": _deposit,
    "audit": _audit,
    "withdrawal": _review,
    "market": _market,
    "fees": _fees,
    "subaccount": _subaccount,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cex", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state-dir", help="where data and logs live (default $CEX_STATE_DIR or .cex)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the whole exchange and run until Ctrl-C")
    up.add_argument("--port-base", type=int, help="first port of the layout (default 50050)")
    up.add_argument(
        "--replicas",
        help="processes per service, e.g. order=2,marketdata=2 (default $CEX_REPLICAS; "
        "1 each); order is balanced by account, the others round robin",
    )
    commands.add_parser("status", help="health of every component")
    top = commands.add_parser("top", help="live health, rps, errors and p50/p99 per service")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="one interval, printed, then exit")
    account = commands.add_parser("account", help="accounts").add_subparsers(
        dest="action", required=True
    )
    create = account.add_parser("create", help="create an account; prints its id")
    create.add_argument("--name", required=True, help="display name")
    create.add_argument("--email", help="contact e-mail (unique)")
    create.add_argument(
        "--type", default="individual", choices=["individual", "market-maker", "institutional"]
    )
    create.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    for action, text in (
        ("freeze", "suspend: reads only, for issued tokens too (pushed to every service)"),
        ("unfreeze", "make a suspended account active again"),
        ("close", "close for good"),
    ):
        change = account.add_parser(action, help=text)
        change.add_argument("account", help="the account id")
        change.add_argument("--reason", help="why (kept with the change)")
        change.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    apikey = commands.add_parser("apikey", help="API keys").add_subparsers(
        dest="action", required=True
    )
    key = apikey.add_parser("create", help="create an API key; prints its id and secret")
    key.add_argument("--account", required=True, help="the account id")
    key.add_argument("--scopes", default="read,trade", help="comma-separated: read,trade,...")
    key.add_argument("--label", help="a label for the key")
    key.add_argument("--allow", action="append", help="allowed CIDR (repeat); needed for withdraw")
    traces = commands.add_parser(
        "traces",
        help="receive OTLP traces (start the stack with OTEL_TRACES_EXPORTER=otlp) and print each",
    )
    traces.add_argument("--listen", default="127.0.0.1:4317", help="OTLP/gRPC address")
    traces.add_argument(
        "--quiet-s",
        type=float,
        default=6.0,
        help="print a trace once idle this long (Envoy flushes every 5 s)",
    )
    dep = commands.add_parser(
        "deposit",
        help="deposit through the chain simulator; waits until the ledger shows the credit",
    )
    dep.add_argument(
        "--account", help="the account (as the operator); default: the key in CEX_API_KEY_ID"
    )
    dep.add_argument("--asset", required=True, help="e.g. USDT, BTC")
    dep.add_argument("--amount", required=True, help="a decimal string, e.g. 1000")
    dep.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the credit")
    audit = commands.add_parser(
        "audit", help="run the ledger's audit (AuditLedger) as the operator; exit 1 if unbalanced"
    )
    audit.add_argument("--asset", action="append", help="only this asset (repeat); default all")
    withdrawal = commands.add_parser(
        "withdrawal", help="operators: withdrawals waiting for approval"
    ).add_subparsers(dest="action", required=True)
    for action, text in (
        ("approve", "approve a withdrawal above its asset's threshold: it is broadcast"),
        ("reject", "reject it: its hold is voided, the funds are the owner's again"),
    ):
        review = withdrawal.add_parser(action, help=text)
        review.add_argument("withdrawal", help="the withdrawal id (wd_...)")
        review.add_argument(
            "--reason", required=action == "reject", help="why (kept with the decision)"
        )
        review.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    market = commands.add_parser("market", help="operators: markets").add_subparsers(
        dest="action", required=True
    )
    status = market.add_parser(
        "status",
        help="set a market's status at runtime: trading, post-only, cancel-only, halted, "
        "or delisted (cancels every open order; final)",
    )
    status.add_argument("market", help="the market symbol, e.g. BTC-USDT")
    status.add_argument("status", choices=_MARKET_STATUSES)
    status.add_argument("--reason", required=True, help="why (journaled, shown in GetMarket)")
    status.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    listing = market.add_parser(
        "list-new",
        help="list a new market at runtime (its assets must be in the catalog); it trades "
        "at once, TRADING",
    )
    listing.add_argument("market", help="the new symbol, BASE-QUOTE, e.g. ETH-BTC")
    listing.add_argument("--tick-size", required=True, help="price grid, e.g. 0.01")
    listing.add_argument("--lot-size", required=True, help="quantity grid, e.g. 0.0001")
    listing.add_argument("--min-quantity", help="smallest quantity (default: the lot size)")
    listing.add_argument("--max-quantity", required=True, help="largest quantity")
    listing.add_argument("--min-notional", required=True, help="smallest price x quantity")
    listing.add_argument("--price-band", help="default price band, a fraction (e.g. 0.1)")
    listing.add_argument("--reason", required=True, help="why (journaled)")
    listing.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    fees = commands.add_parser(
        "fees", help="operators: the fee schedule and accounts' fee tiers"
    ).add_subparsers(dest="action", required=True)
    fees.add_parser("schedule", help="show the fee schedule")
    set_schedule = fees.add_parser(
        "set-schedule",
        help="replace the fee schedule; accounts on volume tiers move to the tier it gives them",
    )
    set_schedule.add_argument(
        "--tier",
        action="append",
        required=True,
        type=_tier_arg,
        help="NAME:MAKER_BPS:TAKER_BPS:MIN_VOLUME (repeat; one must be default:...:0); "
        "a negative maker fee is a rebate",
    )
    assign = fees.add_parser("assign", help="give an account a tier (overrides its volume)")
    assign.add_argument("account", help="the account id")
    assign.add_argument("tier", help="a tier of the schedule")
    unassign = fees.add_parser("unassign", help="hand an account back to its volume tier")
    unassign.add_argument("account", help="the account id")
    for command in (set_schedule, assign, unassign):
        command.add_argument("--reason", help="why (kept with the change)")
        command.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    fees.add_parser(
        "evaluate", help="measure 30-day traded volumes now and move accounts between tiers"
    )
    subs = commands.add_parser(
        "subaccount",
        help="a master's sub-accounts, with the master's key (CEX_API_KEY_ID/_SECRET)",
    ).add_subparsers(dest="action", required=True)
    sub_create = subs.add_parser("create", help="create a sub-account; prints its id")
    sub_create.add_argument("name", help="display name")
    sub_list = subs.add_parser("list", help="list the master's sub-accounts")
    for command in (sub_create, sub_list):
        command.add_argument("--master", help="as the operator, for this master account")
    sub_key = subs.add_parser("apikey", help="create an API key of a sub-account")
    sub_key.add_argument("sub", help="the sub-account id")
    sub_key.add_argument("--scopes", default="read,trade", help="at most the master's key's")
    sub_key.add_argument("--label", help="a label for the key")
    sub_key.add_argument("--allow", action="append", help="allowed CIDR (repeat)")
    sub_move = subs.add_parser(
        "transfer", help="move funds between the master and a sub-account, at once"
    )
    sub_move.add_argument("--from", required=True, help="the account debited")
    sub_move.add_argument("--to", required=True, help="the account credited")
    sub_move.add_argument("--asset", required=True, help="e.g. USDT")
    sub_move.add_argument("--amount", required=True, help="a decimal string")
    sub_limits = subs.add_parser(
        "limits", help="set a sub-account's limits, within the master's (unset: the master's)"
    )
    sub_limits.add_argument("sub", help="the sub-account id")
    sub_limits.add_argument("--orders-per-second", type=int, default=0, help="0: the master's")
    sub_limits.add_argument("--open-orders", type=int, default=0, help="0: the master's")
    for command in (sub_create, sub_key, sub_move, sub_limits):
        command.add_argument("--request-id", help="idempotency id (default: a new UUID)")
    for action, text in (("balances", "a sub-account's balances"), ("orders", "its orders")):
        subs.add_parser(action, help=text).add_argument("sub", help="the sub-account id")
    token = commands.add_parser("token", help="exchange an API key for an access token")
    token.add_argument("--key-id", help="default $CEX_API_KEY_ID (the secret: $CEX_API_KEY_SECRET)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cex: %(message)s")
    state_dir = _state_dir(args.state_dir)
    if args.command == "up":
        try:
            replicas = parse_replicas(args.replicas or os.environ.get("CEX_REPLICAS", ""))
        except ValueError as error:
            raise SystemExit(f"cex: {error}") from None
        code = asyncio.run(_up(Stack(state_dir, _ports(args.port_base), replicas=replicas)))
    elif args.command == "account":
        act = _account_create if args.action == "create" else _account_state
        code = asyncio.run(act(state_dir, args))
    elif args.command in _HANDLERS:
        code = asyncio.run(_HANDLERS[args.command](state_dir, args))
    elif args.command == "top":
        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(_top(state_dir, args))
    elif args.command == "traces":
        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(_traces(args.listen, args.quiet_s))
    else:
        code = asyncio.run(_status(state_dir))
    sys.exit(code)


if __name__ == "__main__":
    main()
