"""A deterministic stand-in for blockchains and custody: pure state, no I/O, no clock.

What it models, per asset (amounts are decimal strings, as on the wire):
- deposit addresses issued per (account, asset, network), always the same one;
- incoming transfers to those addresses (`deposit`), each one output of its own
  transaction, included in the next block and confirmed block by block;
- withdrawals broadcast by custody, idempotent by withdrawal id: a second
  broadcast of the same id returns the first transaction, never a new one;
- a notification log (`events(after)`) that a watcher reads with a cursor.

Faults are chosen per item by hashing (seed, fault, item key), so which deposit
is reverted or which broadcast times out depends only on the seed and the ids,
never on timing or call order:
- broadcast_error: the first broadcast of a withdrawal fails before recording it
  (UNAVAILABLE; a retry succeeds);
- broadcast_timeout: the first broadcast is recorded but its answer is lost
  (the caller sees a timeout and cannot know whether it went out);
- broadcast_reject: custody refuses the withdrawal for good (every attempt);
- drop: a broadcast transaction is dropped from the mempool (never confirms);
- reorg: a withdrawal's transaction is reorganised out once before finality
  (its confirmations fall back to 0, then it is mined again);
- revert: a deposit is reorganised out before finality and never comes back;
- duplicate: every deposit notification is emitted twice;
- confirm_delay_blocks: blocks a transaction waits in the mempool.

`snapshot()` / `Chain.restore()` turn the whole state into plain JSON values
and back, so that the process can keep its chain across restarts (journal.py):
a chain that forgot its blocks would leave every watcher's cursor beyond its tip.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Chain", "Faults", "Tx"]

# Confirmations after which nothing is reorganised any more.
FINALITY = 6
_NETWORK_PREFIX = {"bitcoin": "bcrt1q", "ethereum": "0x"}


@dataclass(frozen=True, slots=True)
class Faults:
    broadcast_error: float = 0.0
    broadcast_timeout: float = 0.0
    broadcast_reject: float = 0.0
    drop: float = 0.0
    reorg: float = 0.0
    revert: float = 0.0
    duplicate: float = 0.0
    confirm_delay_blocks: int = 0

    @classmethod
    def of(cls, values: dict[str, Any]) -> Faults:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Tx:
    txid: str
    kind: str  # "deposit" | "withdrawal"
    asset: str
    network: str
    address: str
    amount: str
    output_index: int = 0
    withdrawal_id: str = ""
    submitted_height: int = 0
    block_height: int | None = None  # None: in the mempool (or dropped / reverted)
    status: str = "mempool"  # mempool | confirmed | dropped | reverted
    reorged: bool = False  # the one reorg (withdrawals) already happened

    def confirmations(self, height: int) -> int:
        return 0 if self.block_height is None else height - self.block_height + 1


@dataclass(slots=True)
class Chain:
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    height: int = 0
    addresses: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # addr -> owner
    _issued: dict[tuple[str, str, str], str] = field(default_factory=dict)
    txs: dict[str, Tx] = field(default_factory=dict)
    withdrawals: dict[str, str] = field(default_factory=dict)  # withdrawal id -> txid
    broadcast_calls: dict[str, int] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    _deposits: int = 0
    _active: dict[str, None] = field(default_factory=dict)  # txids mine() still visits

    # -- determinism ----------------------------------------------------------

    def roll(self, fault: str, key: str) -> float:
        """A number in [0, 1) fixed by (seed, fault, key)."""
        digest = hashlib.sha256(f"{self.seed}:{fault}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _hit(self, fault: str, key: str) -> bool:
        rate = float(getattr(self.faults, fault))
        return rate > 0 and self.roll(fault, key) < rate

    def _hex(self, *parts: str, length: int) -> str:
        return hashlib.sha256(":".join((str(self.seed), *parts)).encode()).hexdigest()[:length]

    # -- addresses --------------------------------------------------------------

    def new_address(self, account_id: str, asset: str, network: str) -> str:
        owner = (account_id, asset, network)
        found = self._issued.get(owner)
        if found is not None:
            return found
        prefix = _NETWORK_PREFIX.get(network)
        if prefix is None:
            raise ValueError(f"unknown network {network!r}")
        length = 40 if network == "ethereum" else 38
        address = prefix + self._hex("address", *owner, length=length)
        self._issued[owner] = address
        self.addresses[address] = owner
        return address

    # -- incoming -------------------------------------------------------------

    def deposit(self, address: str, asset: str, amount: str) -> str:
        """Someone sends `amount` to `address`; returns the txid (output 0)."""
        owner = self.addresses.get(address)
        network = owner[2] if owner else ""
        self._deposits += 1
        txid = self._hex("deposit", str(self._deposits), address, amount, length=64)
        self.txs[txid] = Tx(
            txid, "deposit", asset, network, address, amount, submitted_height=self.height
        )
        self._active[txid] = None
        return txid

    # -- outgoing -------------------------------------------------------------

    def broadcast(
        self, withdrawal_id: str, asset: str, network: str, address: str, amount: str
    ) -> tuple[str, str]:
        """("ok", txid) | ("error", why: not recorded, retry) | ("timeout", txid: recorded,
        answer lost) | ("rejected", why: final)."""
        calls = self.broadcast_calls.get(withdrawal_id, 0) + 1
        self.broadcast_calls[withdrawal_id] = calls
        existing = self.withdrawals.get(withdrawal_id)
        if existing is not None:
            return "ok", existing
        if self._hit("broadcast_reject", withdrawal_id):
            return "rejected", "custody refused the destination"
        if calls == 1 and self._hit("broadcast_error", withdrawal_id):
            return "error", "custody node unavailable"
        txid = self._hex("withdrawal", withdrawal_id, length=64)
        self.txs[txid] = Tx(
            txid,
            "withdrawal",
            asset,
            network,
            address,
            amount,
            withdrawal_id=withdrawal_id,
            submitted_height=self.height,
        )
        self.withdrawals[withdrawal_id] = txid
        self._active[txid] = None
        if calls == 1 and self._hit("broadcast_timeout", withdrawal_id):
            return "timeout", txid
        return "ok", txid

    def withdrawal_status(self, withdrawal_id: str) -> dict[str, Any]:
        txid = self.withdrawals.get(withdrawal_id)
        if txid is None:
            return {"status": "unknown", "txid": "", "confirmations": 0}
        tx = self.txs[txid]
        return {"status": tx.status, "txid": txid, "confirmations": tx.confirmations(self.height)}

    # -- blocks ---------------------------------------------------------------

    def mine(self) -> int:
        """One block: include what is due, reorganise and revert where faults say.

        Only transactions that can still change are visited (in the order they
        were submitted, as before): a block costs what is in flight, not the
        chain's whole history, which also keeps replaying a journal cheap."""
        self.height += 1
        for txid in list(self._active):
            tx = self.txs[txid]
            self._advance(tx)
            if self._settled(tx):
                del self._active[txid]
        return self.height

    def _settled(self, tx: Tx) -> bool:
        """Nothing will happen to it any more (mine() would pass it over)."""
        if tx.status in ("dropped", "reverted"):
            return True
        return tx.block_height is not None and tx.confirmations(self.height) > FINALITY + 1

    def _advance(self, tx: Tx) -> None:
        if tx.status in ("dropped", "reverted"):
            return
        if tx.block_height is None:
            due = tx.submitted_height + self.faults.confirm_delay_blocks
            if tx.kind == "withdrawal" and self._hit("drop", tx.withdrawal_id):
                if self.height > due:
                    tx.status = "dropped"
                return
            if self.height > due:
                tx.block_height = self.height
                tx.status = "confirmed"
                self._notify(tx)
            return
        confirmations = tx.confirmations(self.height)
        if confirmations == 2 and tx.kind == "deposit" and self._hit("revert", tx.txid):
            tx.block_height = None
            tx.status = "reverted"
            self._notify(tx)
            return
        if (
            confirmations == 2
            and tx.kind == "withdrawal"
            and not tx.reorged
            and self._hit("reorg", tx.withdrawal_id)
        ):
            tx.reorged = True
            tx.block_height = None
            tx.status = "mempool"
            tx.submitted_height = self.height
            return
        if confirmations <= FINALITY + 1:
            self._notify(tx)

    def _notify(self, tx: Tx) -> None:
        if tx.kind != "deposit" or tx.address not in self.addresses:
            return
        event = {
            "type": "deposit",
            "txid": tx.txid,
            "output_index": tx.output_index,
            "address": tx.address,
            "asset": tx.asset,
            "network": tx.network,
            "amount": tx.amount,
            "confirmations": tx.confirmations(self.height),
            "status": tx.status,
            "height": self.height,
        }
        copies = 2 if self._hit("duplicate", tx.txid) else 1
        for _ in range(copies):
            self.log.append({**event, "seq": len(self.log) + 1})

    def events(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        return self.log[after : after + limit]

    def configure(self, faults: Faults) -> None:
        self.faults = replace(faults)

    # -- persistence (values only; the process does the I/O) ------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": self.faults.as_dict(),
            "height": self.height,
            "issued": [[*owner, address] for owner, address in self._issued.items()],
            "txs": [asdict(tx) for tx in self.txs.values()],
            "withdrawals": dict(self.withdrawals),
            "broadcast_calls": dict(self.broadcast_calls),
            "log": list(self.log),
            "deposits": self._deposits,
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Chain:
        chain = cls(seed=int(state["seed"]), faults=Faults.of(state["faults"]))
        chain.height = int(state["height"])
        for account_id, asset, network, address in state["issued"]:
            chain._issued[(account_id, asset, network)] = address
            chain.addresses[address] = (account_id, asset, network)
        chain.txs = {tx["txid"]: Tx(**tx) for tx in state["txs"]}
        chain.withdrawals = dict(state["withdrawals"])
        chain.broadcast_calls = {k: int(v) for k, v in state["broadcast_calls"].items()}
        chain.log = list(state["log"])
        chain._deposits = int(state["deposits"])
        chain._active = {t: None for t, tx in chain.txs.items() if not chain._settled(tx)}
        return chain

    def tip(self) -> dict[str, int]:
        """Where the chain is: its height and the last notification's seq."""
        return {"height": self.height, "last_seq": len(self.log)}

    def stats(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "last_seq": len(self.log),
            "broadcast_calls": dict(self.broadcast_calls),
            "withdrawals": {
                wid: {"txid": txid, "status": self.txs[txid].status}
                for wid, txid in self.withdrawals.items()
            },
        }
