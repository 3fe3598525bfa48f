"""Where the ledger's writes go: the match group's writer, which owns balances (ADR 0013).

The ledger keeps its API (CreateTransfers, PostPendingTransfer,
VoidPendingTransfer) and its rules, but one process decides every balance: the
writer that also reserves, matches and settles orders. A request's transfers
go to it as one `TransfersCommand`, over one long-lived command stream that
carries whatever concurrent requests wait together (chassis' `CommandStream`,
as order's commands go); it applies them with the ledger's rules on
the balances it holds, writes them to the ledger's tables in its own commit,
and answers a status per transfer. The transfers it applied are then read back
from those tables, committed. What never needs the balances is answered here:
a transfer that failed parsing fails its linked chain, and a chain left open
at the end of the request fails whole.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from google.rpc import status_pb2

from cex.match.v1 import match_pb2
from services.chassis import (
    CommandStream,
    ErrorDetails,
    ExchangeError,
    InvalidArgument,
    Unavailable,
)

from .domain import Op, Outcome, TransferInput, linked_failed, split_chains
from .store import Store

__all__ = ["BalanceOwner"]

_OPS = {
    Op.SINGLE: match_pb2.FundsTransfer.OP_SINGLE,
    Op.PENDING: match_pb2.FundsTransfer.OP_PENDING,
    Op.POST: match_pb2.FundsTransfer.OP_POST,
    Op.VOID: match_pb2.FundsTransfer.OP_VOID,
}


def _wire(item: TransferInput) -> match_pb2.FundsTransfer:
    return match_pb2.FundsTransfer(
        id=item.id,
        op=_OPS[item.op],
        debit_account_id=item.debit_account_id,
        credit_account_id=item.credit_account_id,
        asset=item.asset,
        amount=item.amount or 0,
        pending_id=item.pending_id,
        linked=item.linked,
        timeout_ns=item.timeout_ns,
        kind=int(item.kind),
        reference=item.reference,
    )


class BalanceOwner:
    def __init__(self, stream: CommandStream, store: Store) -> None:
        self._stream = stream
        self._store = store

    async def transfers(
        self, items: Sequence[TransferInput | ExchangeError], linked: Sequence[bool]
    ) -> list[Outcome]:
        """One request's outcomes, in order (`linked`: the request's flags.linked,
        failed items included)."""
        outcomes: list[Outcome | None] = [None] * len(items)
        sent: list[int] = []
        for indices, closed in split_chains(linked):
            chain = [items[i] for i in indices]
            if not closed:
                for i in indices:
                    outcomes[i] = InvalidArgument(
                        "LEDGER_LINKED_EVENT_CHAIN_OPEN",
                        "the last transfer of the request is flagged linked",
                    )
            elif any(isinstance(item, ExchangeError) for item in chain):
                for i, item in zip(indices, chain, strict=True):
                    outcomes[i] = (
                        item if isinstance(item, ExchangeError) else linked_failed(item.id)
                    )
            else:
                sent += indices
        if sent:
            wire = [_wire(items[i]) for i in sent]  # type: ignore[arg-type]
            statuses = await self._submit(wire)
            applied = await self._store.get_transfers(
                [t.id for t, status in zip(wire, statuses, strict=True) if not status.code]
            )
            for i, transfer, status in zip(sent, wire, statuses, strict=True):
                outcomes[i] = _error(status) if status.code else applied[transfer.id]
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    async def _submit(self, transfers: list[match_pb2.FundsTransfer]) -> list[status_pb2.Status]:
        command = match_pb2.Command(
            command_id=f"transfers:{uuid.uuid4().hex}",
            transfers=match_pb2.TransfersCommand(transfers=transfers),
        )
        # The stream answers UNAVAILABLE LEDGER_UNAVAILABLE when the writer is
        # away, breaks the stream or does not answer in time.
        result = await self._stream.submit(command)
        if result.status.code:
            raise _error(result.status, "LEDGER_UNAVAILABLE")
        if len(result.transfer_statuses) != len(transfers):
            raise Unavailable("LEDGER_UNAVAILABLE", "the balance owner answered another request")
        return list(result.transfer_statuses)


def _error(status: status_pb2.Status, fallback: str = "LEDGER_REJECTED") -> ExchangeError:
    return ErrorDetails.from_status(status).error(fallback)
