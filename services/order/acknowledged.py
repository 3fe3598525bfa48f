"""What this process acknowledged that its read model may not show yet.

Order answers from the writer's result; the consumer stores the result's events
a moment later. Until the consumer has applied an answer's last event, the
answer is kept here under its account: a read by that account first waits for
those events (it reads its own writes). Per process: another replica's answers
are that replica's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Acknowledged"]

_SWEEP_EVERY = 4096  # answers between sweeps of accounts that stopped reading


@dataclass(slots=True)
class _Answer:
    market: str
    seq: int  # the answer's last event


class Acknowledged:
    def __init__(self, applied: Callable[[str], int]) -> None:
        """`applied(market)`: the last event seq of the market the consumer committed."""
        self._applied = applied
        self._accounts: dict[str, dict[str, _Answer]] = {}
        self._added = 0

    def add(self, account_id: str, order_id: str, market: str, seq: int) -> None:
        answers = self._accounts.setdefault(account_id, {})
        known = answers.get(order_id)
        if known is None or seq > known.seq:
            answers[order_id] = _Answer(market, seq)
        self._added += 1
        if self._added % _SWEEP_EVERY == 0:
            for account in list(self._accounts):
                self._pending(account)

    def awaited(self, account_id: str | None = None) -> dict[str, int]:
        """Per market, the event seq the consumer must apply before a read shows the
        account's answers (every account's, with None)."""
        accounts = list(self._accounts) if account_id is None else [account_id]
        wanted: dict[str, int] = {}
        for account in accounts:
            for answer in self._pending(account):
                wanted[answer.market] = max(wanted.get(answer.market, 0), answer.seq)
        return wanted

    def _pending(self, account_id: str) -> list[_Answer]:
        """The account's answers not applied yet; the applied ones are forgotten."""
        answers = self._accounts.get(account_id)
        if not answers:
            return []
        for order_id, answer in list(answers.items()):
            if answer.seq <= self._applied(answer.market):
                del answers[order_id]
        if not answers:
            del self._accounts[account_id]
        return list(answers.values())
