"""The simulator's chain on disk: a snapshot and a journal of what changed it since.

A chain is a pure value machine (chain.py): replaying the same calls from the
same state gives the same chain, byte for byte. So the process keeps
`chain.json` (a snapshot) and appends every state-changing call to a journal
before it answers; at start it loads the snapshot and replays the journal the
snapshot names. Every `compact_every` entries (or, once the snapshot is
large, as many entries as a hundredth of its bytes: the cost of rewriting it
stays proportional to what was appended), and at a graceful stop, a new
snapshot naming a new, empty journal replaces the old one (temporary file,
fsync, rename) and only then is the old journal deleted: a crash between the
two never replays a call twice.

Why it matters: funding keeps its position in the chain's notification log.
A simulator that started a new chain on every restart left that position
beyond the new chain's tip, and no deposit was ever seen again (issue 18).

Lines are written (not fsynced) before the answer: a killed process loses
nothing, a lost machine may lose the last calls (a reorg, for the watchers).
A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, TextIO

from .chain import Chain, Faults

__all__ = ["ChainJournal", "apply"]

_log = logging.getLogger("cex.chainsim")


def apply(chain: Chain, entry: dict[str, Any]) -> None:
    """Re-run one recorded call."""
    op = entry["op"]
    if op == "address":
        chain.new_address(entry["account_id"], entry["asset"], entry["network"])
    elif op == "deposit":
        chain.deposit(entry["address"], entry["asset"], entry["amount"])
    elif op == "broadcast":
        chain.broadcast(
            entry["withdrawal_id"], entry["asset"], entry["network"], entry["address"],
            entry["amount"],
        )  # fmt: skip
    elif op == "mine":
        for _ in range(int(entry.get("blocks", 1))):
            chain.mine()
    elif op == "configure":
        chain.configure(Faults.of(entry["faults"]))
    else:
        raise ValueError(f"unknown journal entry {op!r}")


class ChainJournal:
    def __init__(self, directory: Path, *, compact_every: int = 1000) -> None:
        self.directory = directory
        self.compact_every = compact_every
        self.snapshot_path = directory / "chain.json"
        self.generation = 0
        self._file: TextIO | None = None
        self._entries = 0
        self._snapshot_bytes = 0

    @property
    def journal_path(self) -> Path:
        return self.directory / f"journal-{self.generation}.jsonl"

    def load(self, fresh: Chain) -> Chain:
        """The chain kept here, or `fresh` if there is none yet."""
        self.directory.mkdir(parents=True, exist_ok=True)
        chain = fresh
        if self.snapshot_path.exists():
            kept = json.loads(self.snapshot_path.read_text())
            self.generation = int(kept["journal"])
            chain = Chain.restore(kept["chain"])
        replayed = 0
        if self.journal_path.exists():
            lines = self.journal_path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):
                        break  # torn by a kill mid-write: the call was never answered
                    raise
                apply(chain, entry)
                replayed += 1
        _log.info(
            "chain loaded from %s: height %s, %s notifications (%s journal entries replayed)",
            self.directory,
            chain.height,
            len(chain.log),
            replayed,
        )
        self.compact(chain)  # also drops a torn line
        return chain

    def record(self, chain: Chain, entry: dict[str, Any]) -> None:
        """Append one state-changing call (after applying it, before answering it)."""
        if self._file is None:
            self._file = self.journal_path.open("a")
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()
        self._entries += 1
        if self._entries >= max(self.compact_every, self._snapshot_bytes // 100):
            self.compact(chain)

    def compact(self, chain: Chain) -> None:
        """Snapshot the chain, naming a new empty journal; then drop the old one."""
        old = self.journal_path
        temporary = self.snapshot_path.with_suffix(".json.tmp")
        with temporary.open("w") as f:
            json.dump(
                {"journal": self.generation + 1, "chain": chain.snapshot()},
                f,
                separators=(",", ":"),
            )
            f.flush()
            os.fsync(f.fileno())
            self._snapshot_bytes = f.tell()
        os.replace(temporary, self.snapshot_path)
        self.generation += 1
        if self._file is not None:
            self._file.close()
        self._file = self.journal_path.open("w")
        self._entries = 0
        old.unlink(missing_ok=True)

    def close(self, chain: Chain) -> None:
        self.compact(chain)
        if self._file is not None:
            self._file.close()
            self._file = None
