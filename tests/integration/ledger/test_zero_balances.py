"""Zero is a balance (issue 18): a new account reads zero, and debiting an asset it
never held is refused exactly as debiting one it has too little of."""

from __future__ import annotations

import grpc
import pytest

from cex.ledger.v1 import ledger_pb2 as K
from services.chassis import ErrorDetails, load_catalog
from tests.integration.ledger.support import (
    Ledger,
    deposit,
    hold,
    transfer,
)


def _zero(balance: K.Balance) -> bool:
    return (balance.available, balance.held, balance.total) == ("0", "0", "0")


async def test_a_new_account_has_zero_of_every_asset(ledger: Ledger) -> None:
    every = (await ledger.stub.GetBalances(K.GetBalancesRequest(account_id="newcomer"))).balances
    assert [b.asset for b in every] == sorted(load_catalog().assets)
    assert all(_zero(b) and b.account_id == "newcomer" for b in every)
    asked = await ledger.stub.GetBalances(
        K.GetBalancesRequest(account_id="newcomer", assets=["USDT", "BTC", "USDT"])
    )
    assert [(b.asset, _zero(b)) for b in asked.balances] == [("BTC", True), ("USDT", True)]
    # An asset asked for and never held is answered too, next to a held one.
    await ledger.ok(deposit("d1", "holder", "5"))
    mixed = await ledger.stub.GetBalances(
        K.GetBalancesRequest(account_id="holder", assets=["USDT", "BTC"])
    )
    assert [(b.asset, b.available) for b in mixed.balances] == [("BTC", "0"), ("USDT", "5")]
    # Without a filter: the assets it has used.
    used = await ledger.stub.GetBalances(K.GetBalancesRequest(account_id="holder"))
    assert [b.asset for b in used.balances] == ["USDT"]


async def test_an_unknown_asset_is_still_not_found(ledger: Ledger) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ledger.stub.GetBalances(K.GetBalancesRequest(account_id="x", assets=["DOGE"]))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_never_held_and_spent_to_zero_are_refused_alike(ledger: Ledger) -> None:
    await ledger.ok(deposit("d1", "spent", "1"), transfer("t1", "spent", "other", "1"))
    for kind, make in (
        ("transfer", lambda tid, who: transfer(tid, who, "other", "1")),
        ("hold", lambda tid, who: hold(tid, who, "1")),
    ):
        never, spent = await ledger.create(make(f"{kind}-n", "never"), make(f"{kind}-s", "spent"))
        for result in (never, spent):
            assert result.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], result
        n, s = ErrorDetails.from_status(never.status), ErrorDetails.from_status(spent.status)
        assert n.reason == s.reason == "LEDGER_INSUFFICIENT_FUNDS"
        assert n.domain == s.domain == "ledger"
    # and nothing was created for the account that never held anything
    assert all(
        _zero(b)
        for b in (await ledger.stub.GetBalances(K.GetBalancesRequest(account_id="never"))).balances
    )
