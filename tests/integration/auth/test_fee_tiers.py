"""auth's fee schedule and account tiers (issue 21, ADR 0016) on a real PostgreSQL
and NATS: the admin calls and their refusals, tiers moved by measured volume with
an operator's assignment overriding it, and the order gateways' copy following
every change (pushed, and reloaded over a gap)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import grpc
import pytest

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.config import AuthConfig
from services.auth.server import build_server
from services.chassis import ChassisSettings, ErrorDetails
from services.chassis.fee_tiers import FeeTiers, push_fee_tiers
from tests.integration.auth.test_auth_service import SECRET, _free_port, _operator

Md = tuple[tuple[str, str], ...]
SCOPES = {"read": auth_pb2.API_KEY_SCOPE_READ, "trade": auth_pb2.API_KEY_SCOPE_TRADE}


def _tier(name: str, maker: str, taker: str, volume: str) -> auth_pb2.FeeTier:
    return auth_pb2.FeeTier(name=name, maker_fee_bps=maker, taker_fee_bps=taker, min_volume=volume)


SCHEDULE = [
    _tier("default", "10", "20", "0"),
    _tier("vip1", "5", "15", "100000"),
    _tier("mm", "-1", "10", "1000000000"),
]


@asynccontextmanager
async def _auth(
    database_url: str, volumes: dict[str, Decimal], nats_url: str | None = None
) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async def source(since: datetime, asset: str) -> dict[str, Decimal]:
        assert asset == "USDT" and (datetime.now(UTC) - since).days in (29, 30)
        return dict(volumes)

    settings = ChassisSettings(service="auth", database_url=database_url, nats_url=nats_url)
    config = AuthConfig(
        jwks_port=_free_port(), service_secret=SECRET, scrypt_n=2**4, fee_volume_interval_s=0
    )
    server = await build_server(settings, config=config, volume_source=source)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield auth_pb2_grpc.AuthServiceStub(channel)
    finally:
        await server.stop(0)


async def _account(stub: auth_pb2_grpc.AuthServiceStub, md: Md, name: str) -> str:
    reply = await stub.CreateAccount(
        auth_pb2.CreateAccountRequest(request_id=f"acc-{name}", display_name=name), metadata=md
    )
    return reply.account.account_id


async def _user(stub: auth_pb2_grpc.AuthServiceStub, md: Md, account: str, *scopes: str) -> Md:
    key = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            request_id=f"key-{account}-{'-'.join(scopes)}",
            account_id=account,
            scopes=[SCOPES.get(s, auth_pb2.API_KEY_SCOPE_ADMIN) for s in scopes],
        ),
        metadata=md,
    )
    token = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(api_key_id=key.api_key.api_key_id, api_key_secret=key.secret)
    )
    return (("authorization", f"Bearer {token.access_token}"),)


async def _fails(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return ErrorDetails.from_rpc_error(failure.value)


async def test_admin_calls_check_their_input_and_their_caller(fresh_database_url: str) -> None:
    async with _auth(fresh_database_url, {}) as stub:
        md = await _operator(stub)
        # Until an operator sets one, the schedule is the catalog's one tier.
        shown = (await stub.GetFeeSchedule(auth_pb2.GetFeeScheduleRequest(), metadata=md)).schedule
        assert [(t.name, t.maker_fee_bps, t.taker_fee_bps, t.min_volume) for t in shown.tiers] == [
            ("default", "10", "20", "0")
        ]
        assert shown.volume_asset == "USDT" and not shown.HasField("update_time")

        bad = auth_pb2.SetFeeScheduleRequest(
            request_id="bad",
            tiers=[
                _tier("VIP", "-101", "1.234", "-1"),  # name, rebate floor, decimals, volume
                _tier("vip2", "x", "20", "5"),
                _tier("vip3", "-50", "20", "7"),  # a rebate larger than a taker fee
            ],
        )
        refused = await _fails(stub.SetFeeSchedule(bad, metadata=md))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "AUTH_INVALID_FEE_SCHEDULE",
        )
        fields = {v.field: v.reason for v in refused.violations}
        assert fields == {
            "tiers[0].name": "AUTH_INVALID_TIER_NAME",
            "tiers[0].maker_fee_bps": "AUTH_FEE_BPS_OUT_OF_RANGE",
            "tiers[0].taker_fee_bps": "AUTH_FEE_BPS_TOO_PRECISE",
            "tiers[0].min_volume": "AUTH_INVALID_MIN_VOLUME",
            "tiers[1].maker_fee_bps": "AUTH_INVALID_DECIMAL",
            "tiers[2].taker_fee_bps": "AUTH_TAKER_FEE_BELOW_REBATE",
            "tiers": "AUTH_BASE_TIER_REQUIRED",
        }
        missing_id = await _fails(
            stub.SetFeeSchedule(auth_pb2.SetFeeScheduleRequest(tiers=SCHEDULE), metadata=md)
        )
        assert missing_id.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in missing_id.violations] == ["request_id"]

        alice = await _account(stub, md, "alice")
        unknown = await _fails(
            stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(request_id="t0", account_id=alice, fee_tier="x"),
                metadata=md,
            )
        )
        assert (unknown.code, unknown.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "AUTH_UNKNOWN_FEE_TIER",
        )
        assert [v.field for v in unknown.violations] == ["fee_tier"]
        nobody = await _fails(
            stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(request_id="t1", fee_tier="default"),
                metadata=md,
            )
        )
        assert [v.field for v in nobody.violations] == ["account_id"]

        # A trader (read, trade) may ask what it pays, and nothing of the operator's.
        trader = await _user(stub, md, alice, "read", "trade")
        assert (await stub.GetFees(auth_pb2.GetFeesRequest(), metadata=trader)).fee_tier == (
            "default"
        )
        calls = [
            stub.GetFeeSchedule(auth_pb2.GetFeeScheduleRequest(), metadata=trader),
            stub.SetFeeSchedule(
                auth_pb2.SetFeeScheduleRequest(request_id="u1", tiers=SCHEDULE), metadata=trader
            ),
            stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(
                    request_id="u2", account_id=alice, fee_tier="default"
                ),
                metadata=trader,
            ),
            stub.EvaluateFeeTiers(auth_pb2.EvaluateFeeTiersRequest(), metadata=trader),
        ]
        for call in calls:
            denied = await _fails(call)
            assert (denied.code, denied.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "AUTH_SCOPE_MISSING",
            ), denied
        internal = await _fails(stub.GetFeeTiers(auth_pb2.GetFeeTiersRequest(), metadata=trader))
        assert (internal.code, internal.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUTH_INTERNAL_ONLY",
        )
        # An admin key of an account is enough.
        admin = await _user(stub, md, alice, "read", "admin")
        await stub.GetFeeSchedule(auth_pb2.GetFeeScheduleRequest(), metadata=admin)


async def test_tiers_follow_volume_unless_assigned_and_the_copy_follows_auth(
    fresh_database_url: str, private_nats: str
) -> None:
    volumes: dict[str, Decimal] = {}
    async with _auth(fresh_database_url, volumes, private_nats) as stub:
        md = await _operator(stub)
        alice, bob, carol = [await _account(stub, md, n) for n in ("alice", "bob", "carol")]

        async def load() -> auth_pb2.GetFeeTiersResponse:
            reply: auth_pb2.GetFeeTiersResponse = await stub.GetFeeTiers(
                auth_pb2.GetFeeTiersRequest(), metadata=md
            )
            return reply

        copy = FeeTiers(load, default=(Decimal("0.001"), Decimal("0.002")), reload_s=60)
        follower = asyncio.ensure_future(
            copy.run(push_fee_tiers(copy, private_nats, name="test-fee-tiers"))
        )

        async def copy_shows(account: str, rates: tuple[str, str]) -> None:
            for _ in range(100):
                if copy.rates(account) == rates:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{account}: {copy.rates(account)} != {rates}")

        try:
            await copy_shows(alice, ("0.001", "0.002"))
            set_schedule = auth_pb2.SetFeeScheduleRequest(request_id="s1", tiers=SCHEDULE)
            first = await stub.SetFeeSchedule(set_schedule, metadata=md)
            again = await stub.SetFeeSchedule(set_schedule, metadata=md)  # idempotent
            assert [t.name for t in first.schedule.tiers] == ["default", "vip1", "mm"]
            assert first == again
            other = auth_pb2.SetFeeScheduleRequest(request_id="s1", tiers=SCHEDULE[:1])
            reused = await _fails(stub.SetFeeSchedule(other, metadata=md))
            assert reused.reason == "AUTH_REQUEST_ID_REUSED"

            # An operator's tier: a rebate for a market maker.
            assigned = await stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(
                    request_id="t1", account_id=alice, fee_tier="mm", reason="market maker"
                ),
                metadata=md,
            )
            assert (assigned.account.fee_tier, assigned.account.fee_tier_assigned) == ("mm", True)
            await copy_shows(alice, ("-0.0001", "0.001"))  # pushed

            # Volume: bob crosses vip1's threshold; alice's assignment overrides hers.
            volumes.update({alice: Decimal(5), bob: Decimal("150000.5")})
            measured = await stub.EvaluateFeeTiers(auth_pb2.EvaluateFeeTiersRequest(), metadata=md)
            assert measured.accounts_measured == 2
            assert [(c.account_id, c.fee_tier) for c in measured.changed] == [(bob, "vip1")]
            await copy_shows(bob, ("0.0005", "0.0015"))
            bob_now = (
                await stub.GetAccount(auth_pb2.GetAccountRequest(account_id=bob), metadata=md)
            ).account
            assert (bob_now.fee_tier, bob_now.fee_tier_assigned) == ("vip1", False)
            assert bob_now.traded_volume_30d == "150000.5"
            assert copy.rates(carol) == ("0.001", "0.002")
            bob_md = await _user(stub, md, bob, "read")
            fees = await stub.GetFees(auth_pb2.GetFeesRequest(), metadata=bob_md)
            assert (fees.fee_tier, fees.maker_fee_rate, fees.taker_fee_rate) == (
                "vip1",
                "0.0005",
                "0.0015",
            )
            assert {m.maker_fee_rate for m in fees.markets} == {"0.0005"}

            # A quiet month moves bob back down; nothing else moves.
            volumes.clear()
            measured = await stub.EvaluateFeeTiers(auth_pb2.EvaluateFeeTiersRequest(), metadata=md)
            assert [(c.account_id, c.fee_tier) for c in measured.changed] == [(bob, "default")]
            await copy_shows(bob, ("0.001", "0.002"))

            # A tier in use by an operator's assignment cannot be removed...
            in_use = await _fails(
                stub.SetFeeSchedule(
                    auth_pb2.SetFeeScheduleRequest(request_id="s2", tiers=SCHEDULE[:2]),
                    metadata=md,
                )
            )
            assert (in_use.code, in_use.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "AUTH_FEE_TIER_IN_USE",
            )
            # ...until the account goes back to its volume tier.
            back = await stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(request_id="t2", account_id=alice), metadata=md
            )
            assert (back.account.fee_tier, back.account.fee_tier_assigned) == ("default", False)
            cheaper = [_tier("default", "8", "18", "0"), _tier("vip1", "4", "12", "100000")]
            await stub.SetFeeSchedule(
                auth_pb2.SetFeeScheduleRequest(request_id="s3", tiers=cheaper), metadata=md
            )
            await copy_shows(carol, ("0.0008", "0.0018"))  # the schedule itself is pushed

            # A lost push: the copy sees the gap at the next change and reloads.
            state = await stub.GetFeeTiers(auth_pb2.GetFeeTiersRequest(), metadata=md)
            assert copy.change_seq == state.change_seq
            copy.change_seq -= 1  # as if the last change had not been heard
            await stub.SetAccountFeeTier(
                auth_pb2.SetAccountFeeTierRequest(
                    request_id="t3", account_id=carol, fee_tier="vip1"
                ),
                metadata=md,
            )
            await copy_shows(carol, ("0.0004", "0.0012"))
            assert copy.change_seq == state.change_seq + 1
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
