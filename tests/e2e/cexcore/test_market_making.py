"""A tiny CCXT market maker: for a few seconds it quotes both sides around 100
(post-only), a taker hits one side now and then, and the maker cancels and
replaces its quotes. Afterwards nothing is left working or held, each asset
is conserved across the two accounts (what they hold plus the fees they paid
is what they deposited), and the ledger audit is balanced."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from decimal import Decimal

from tests.e2e.cexcore.conftest import MakeUser

BTC = "BTC/USDT"
DEPOSITS = {"USDT": Decimal(2000), "BTC": Decimal(2)}


async def test_a_market_making_loop_leaves_the_ledger_balanced(
    make_user: MakeUser, audit: Callable[[], Awaitable[bool]]
) -> None:
    maker_user = await make_user({"USDT": "1000", "BTC": "1"})
    taker_user = await make_user({"USDT": "1000", "BTC": "1"})
    maker, taker = maker_user.aio(), taker_user.aio()
    rng = random.Random(22)
    quotes = hits = 0
    try:
        await asyncio.gather(maker.load_markets(), taker.load_markets())
        deadline = asyncio.get_running_loop().time() + 4
        while asyncio.get_running_loop().time() < deadline:
            mid = Decimal(100) + Decimal(rng.randint(-50, 50)) / 100
            bid, ask = await asyncio.gather(
                maker.create_order(BTC, "limit", "buy", 0.1, float(mid - 1), {"postOnly": True}),
                maker.create_order(BTC, "limit", "sell", 0.1, float(mid + 1), {"postOnly": True}),
            )
            quotes += 2
            if rng.random() < 0.5:
                await taker.create_order(BTC, "market", rng.choice(["buy", "sell"]), 0.06)
                hits += 1
            await asyncio.sleep(0.1)
            # Replace: cancel both (a partly filled quote still has a rest to cancel).
            done = await asyncio.gather(*(maker.cancel_order(q["id"]) for q in (bid, ask)))
            assert {o["status"] for o in done} == {"canceled"}
        await maker.cancel_all_orders()
        assert quotes >= 10 and hits >= 2
        assert await maker.fetch_open_orders(BTC) == []

        async def settled() -> list[dict[str, object]]:
            for _ in range(100):  # holds are released as the ledger projects the cancels
                balances = await asyncio.gather(maker.fetch_balance(), taker.fetch_balance())
                if all(b["used"].get(a, 0) == 0 for b in balances for a in DEPOSITS):
                    return balances
                await asyncio.sleep(0.1)
            return balances

        balances = await settled()
        for balance in balances:
            assert {a: balance["used"].get(a, 0) for a in DEPOSITS} == {"USDT": 0, "BTC": 0}
        fills = []
        for exchange in (maker, taker):
            for _ in range(100):  # every hit shows up as fills on both sides
                mine = await exchange.fetch_my_trades(BTC)
                if len(mine) >= hits:
                    break
                await asyncio.sleep(0.1)
            fills.append(mine)
        assert {f["takerOrMaker"] for f in fills[0]} == {"maker"}
        assert {f["takerOrMaker"] for f in fills[1]} == {"taker"}
        assert sorted(f["id"] for f in fills[0]) == sorted(f["id"] for f in fills[1])
        for asset, deposited in DEPOSITS.items():
            # exact decimals from the raw answers (CCXT's own numbers are floats)
            rows = [r for b in balances for r in b["info"]["balances"] if r["asset"] == asset]
            held = sum(Decimal(r["total"]) for r in rows)
            paid = [f["info"] for side in fills for f in side if f["info"]["fee_asset"] == asset]
            fees = sum(Decimal(f["fee"]) for f in paid)
            assert held + fees == deposited, (asset, held, fees)
        assert await audit()
    finally:
        await maker.close()
        await taker.close()
