"""What this process answered that its read model may not show yet.

Order answers from the writer's result; the consumer stores the result's events
a moment later. Until the consumer has applied an answer's last event, the
order as answered is kept here under its account: a read of that order by the
account is answered from it (it reads its own writes, and a cancel right after
a place waits for nothing), and a read of many orders (a list, cancel-all)
first waits for those events. Per process: another replica's answers are that
replica's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .domain import OrderRecord

__all__ = ["Acknowledged"]

_SWEEP_EVERY = 4096  # answers between sweeps of accounts that stopped reading


@dataclass(slots=True)
class _Answer:
    seq: int  # the answer's last event in the order's market
    order: OrderRecord  # the order as answered


class Acknowledged:
    def __init__(self, stored: Callable[[str], int]) -> None:
        """`stored(market)`: the last event seq of the market the consumer committed."""
        self._stored = stored
        self._accounts: dict[str, dict[str, _Answer]] = {}
        self._added = 0

    def add(self, order: OrderRecord, seq: int) -> None:
        """The order as answered, after the answer's last event `seq`."""
        answers = self._accounts.setdefault(order.account_id, {})
        known = answers.get(order.order_id)
        if known is None or seq > known.seq:
            answers[order.order_id] = _Answer(seq, order.copy())
        self._added += 1
        if self._added % _SWEEP_EVERY == 0:
            for account in list(self._accounts):
                self._pending(account)

    def order(self, account_id: str, order_id: str, client_order_id: str) -> OrderRecord | None:
        """The account's order as last answered here, if the store may not show it yet."""
        for answer in self._pending(account_id):
            if order_id == answer.order.order_id or (
                not order_id and client_order_id == answer.order.client_order_id
            ):
                return answer.order.copy()
        return None

    def awaited(self, account_id: str | None = None) -> dict[str, int]:
        """Per market, the event seq the consumer must apply before a read shows the
        account's answers (every account's, with None)."""
        accounts = list(self._accounts) if account_id is None else [account_id]
        wanted: dict[str, int] = {}
        for account in accounts:
            for answer in self._pending(account):
                market = answer.order.market
                wanted[market] = max(wanted.get(market, 0), answer.seq)
        return wanted

    def _pending(self, account_id: str) -> list[_Answer]:
        """The account's answers not stored yet; the stored ones are forgotten."""
        answers = self._accounts.get(account_id)
        if not answers:
            return []
        for order_id, answer in list(answers.items()):
            if answer.seq <= self._stored(answer.order.market):
                del answers[order_id]
        if not answers:
            del self._accounts[account_id]
        return list(answers.values())
