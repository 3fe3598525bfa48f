"""The chain/custody simulator: deterministic under a seed, faults as configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chainsim.chain import Chain, Faults
from chainsim.journal import ChainJournal


def _script(chain: Chain) -> list[dict[str, object]]:
    a = chain.new_address("acc_1", "BTC", "bitcoin")
    b = chain.new_address("acc_2", "ETH", "ethereum")
    for i in range(20):
        chain.deposit(a if i % 2 else b, "BTC" if i % 2 else "ETH", f"1.{i}")
        chain.broadcast(f"wd_{i}", "BTC", "bitcoin", a, "0.5")
        chain.mine()
    for _ in range(10):
        chain.mine()
    return chain.log


FAULTS = Faults(
    broadcast_error=0.3,
    broadcast_timeout=0.2,
    broadcast_reject=0.1,
    drop=0.2,
    reorg=0.3,
    revert=0.3,
    duplicate=0.3,
)


def test_the_same_seed_gives_the_same_chain() -> None:
    one, two = Chain(seed=42, faults=FAULTS), Chain(seed=42, faults=FAULTS)
    assert _script(one) == _script(two)
    assert one.stats() == two.stats()
    other = Chain(seed=43, faults=FAULTS)
    assert _script(other) != _script(Chain(seed=42, faults=FAULTS))


def test_addresses_are_stable_and_shaped_per_network() -> None:
    chain = Chain(seed=1)
    a = chain.new_address("acc_1", "BTC", "bitcoin")
    assert a == chain.new_address("acc_1", "BTC", "bitcoin")
    assert a.startswith("bcrt1q") and len(a) == 44
    e = chain.new_address("acc_1", "ETH", "ethereum")
    assert e.startswith("0x") and len(e) == 42


def test_broadcast_is_idempotent_by_withdrawal_id_even_after_a_lost_answer() -> None:
    chain = Chain(seed=3, faults=Faults(broadcast_timeout=1.0))
    outcome, txid = chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1")
    assert outcome == "timeout"
    assert chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1") == ("ok", txid)
    assert len(chain.withdrawals) == 1 and chain.broadcast_calls["wd_1"] == 2


def test_a_transient_broadcast_error_records_nothing_and_a_rejection_is_final() -> None:
    chain = Chain(seed=3, faults=Faults(broadcast_error=1.0))
    assert chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1")[0] == "error"
    assert not chain.withdrawals
    assert chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1")[0] == "ok"
    chain = Chain(seed=3, faults=Faults(broadcast_reject=1.0))
    for _ in range(3):
        assert chain.broadcast("wd_2", "BTC", "bitcoin", "x", "1")[0] == "rejected"
    assert not chain.withdrawals


def test_confirmations_grow_per_block_and_drops_never_confirm() -> None:
    chain = Chain(seed=5)
    chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1")
    assert chain.withdrawal_status("wd_1")["confirmations"] == 0
    for expected in (1, 2, 3):
        chain.mine()
        assert chain.withdrawal_status("wd_1") == {
            "status": "confirmed",
            "txid": chain.withdrawals["wd_1"],
            "confirmations": expected,
        }
    dropping = Chain(seed=5, faults=Faults(drop=1.0))
    dropping.broadcast("wd_1", "BTC", "bitcoin", "x", "1")
    for _ in range(5):
        dropping.mine()
    assert dropping.withdrawal_status("wd_1")["status"] == "dropped"


def test_a_reorged_withdrawal_loses_its_confirmations_once_then_confirms() -> None:
    chain = Chain(seed=5, faults=Faults(reorg=1.0))
    chain.broadcast("wd_1", "BTC", "bitcoin", "x", "1")
    seen = []
    for _ in range(8):
        chain.mine()
        seen.append(chain.withdrawal_status("wd_1")["confirmations"])
    assert seen[:3] == [1, 0, 1] and seen[-1] == 6


def test_reverted_deposits_and_duplicate_notifications() -> None:
    chain = Chain(seed=9, faults=Faults(revert=1.0, duplicate=1.0))
    address = chain.new_address("acc_1", "BTC", "bitcoin")
    txid = chain.deposit(address, "BTC", "0.1")
    for _ in range(5):
        chain.mine()
    events = [e for e in chain.events(0) if e["txid"] == txid]
    assert [(e["status"], e["confirmations"]) for e in events] == [
        ("confirmed", 1),
        ("confirmed", 1),
        ("reverted", 0),
        ("reverted", 0),
    ]
    assert [e["seq"] for e in chain.events(0)] == list(range(1, len(chain.log) + 1))


def test_deposits_to_unknown_addresses_are_not_notified() -> None:
    chain = Chain(seed=9)
    chain.deposit("bcrt1qnotours", "BTC", "1")
    chain.mine()
    assert chain.events(0) == []


# -- kept across restarts (journal.py) ---------------------------------------------


def _journaled_script(chain: Chain, journal: ChainJournal) -> None:
    """_script's calls, each recorded as the server records it."""
    a = chain.new_address("acc_1", "BTC", "bitcoin")
    journal.record(chain, {"op": "address", "account_id": "acc_1", "asset": "BTC",
                           "network": "bitcoin"})  # fmt: skip
    for i in range(20):
        chain.deposit(a, "BTC", f"1.{i}")
        journal.record(chain, {"op": "deposit", "address": a, "asset": "BTC", "amount": f"1.{i}"})
        args = {"withdrawal_id": f"wd_{i}", "asset": "BTC", "network": "bitcoin", "address": a,
                "amount": "0.5"}  # fmt: skip
        chain.broadcast(**args)
        journal.record(chain, {"op": "broadcast", **args})
        chain.mine()
        journal.record(chain, {"op": "mine", "blocks": 1})


def test_snapshot_and_restore_give_the_same_chain() -> None:
    chain = Chain(seed=42, faults=FAULTS)
    _script(chain)
    again = Chain.restore(json.loads(json.dumps(chain.snapshot())))
    assert again.snapshot() == chain.snapshot() and again.stats() == chain.stats()
    for _ in range(5):  # and it goes on exactly as the original would
        chain.mine(), again.mine()
    assert again.snapshot() == chain.snapshot()


@pytest.mark.parametrize("compact_every", [1, 7, 1000])
def test_a_journaled_chain_is_the_same_chain_after_a_restart(
    tmp_path: Path, compact_every: int
) -> None:
    journal = ChainJournal(tmp_path, compact_every=compact_every)
    chain = journal.load(Chain(seed=42, faults=FAULTS))
    _journaled_script(chain, journal)
    # no close(): as after kill -9, the snapshot plus the journal are all there is
    reloaded = ChainJournal(tmp_path, compact_every=compact_every).load(Chain(seed=0))
    assert reloaded.snapshot() == chain.snapshot()
    assert reloaded.tip() == {"height": 20, "last_seq": len(chain.log)} and chain.log


def test_a_torn_last_line_is_ignored_and_a_crash_mid_compaction_replays_nothing_twice(
    tmp_path: Path,
) -> None:
    journal = ChainJournal(tmp_path)
    chain = journal.load(Chain(seed=1))
    address = chain.new_address("acc_1", "USDT", "ethereum")
    journal.record(chain, {"op": "address", "account_id": "acc_1", "asset": "USDT",
                           "network": "ethereum"})  # fmt: skip
    chain.mine()
    journal.record(chain, {"op": "mine", "blocks": 1})
    with journal.journal_path.open("a") as f:
        f.write('{"op":"deposit","address":"' + address)  # killed mid-write
    assert ChainJournal(tmp_path).load(Chain(seed=1)).snapshot() == chain.snapshot()
    # A snapshot naming a new journal was renamed into place, but the old journal
    # (already in the snapshot) was not deleted yet: it must not be replayed.
    journal = ChainJournal(tmp_path)
    chain = journal.load(Chain(seed=1))
    old = journal.journal_path
    chain.mine()
    journal.record(chain, {"op": "mine", "blocks": 1})
    kept = old.read_text()
    journal.compact(chain)
    old.write_text(kept)
    assert ChainJournal(tmp_path).load(Chain(seed=1)).height == chain.height == 2
