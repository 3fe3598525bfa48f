"""Custody and chains, as funding sees them: one client over the network.

The chain/custody simulator (chainsim/) stands in for the real thing;
the contract is what a custody provider offers: addresses per account and
asset, a broadcast that is idempotent by withdrawal id, the status of a
withdrawal's transaction, and a log of incoming transfers read by cursor.
Answers are JSON over gRPC (the simulator has no proto: it is not ours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["Broadcast", "ChainEvents", "CustodyClient", "CustodyRejected", "WithdrawalTx"]

_SERVICE = "/chainsim.Chain/"


class CustodyRejected(Exception):
    """Custody refused for good (not a transient failure)."""


@dataclass(frozen=True, slots=True)
class Broadcast:
    txid: str


@dataclass(frozen=True, slots=True)
class WithdrawalTx:
    status: str  # unknown | mempool | confirmed | dropped
    txid: str
    confirmations: int


@dataclass(frozen=True, slots=True)
class ChainEvents:
    events: list[dict[str, Any]]
    last_seq: int | None  # the chain's last notification (None: custody does not say)
    height: int | None


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data or b"{}")
    assert isinstance(value, dict)
    return value


class CustodyClient:
    """Calls raise grpc.aio.AioRpcError on transport failures (the caller decides
    whether an outcome is uncertain); a final refusal is CustodyRejected."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 5.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    async def call(
        self, method: str, request: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        stub = self._channel.unary_unary(
            _SERVICE + method, request_serializer=_encode, response_deserializer=_decode
        )
        try:
            reply: dict[str, Any] = await stub(
                request, timeout=timeout_s if timeout_s is not None else self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise CustodyRejected(error.details() or "refused") from None
            raise
        return reply

    async def new_address(self, account_id: str, asset: str, network: str) -> str:
        reply = await self.call(
            "NewAddress", {"account_id": account_id, "asset": asset, "network": network}
        )
        return str(reply["address"])

    async def broadcast(
        self,
        withdrawal_id: str,
        *,
        asset: str,
        network: str,
        address: str,
        amount: str,
        timeout_s: float | None = None,
    ) -> Broadcast:
        reply = await self.call(
            "Broadcast",
            {
                "withdrawal_id": withdrawal_id,
                "asset": asset,
                "network": network,
                "address": address,
                "amount": amount,
            },
            timeout_s,
        )
        return Broadcast(str(reply["txid"]))

    async def withdrawal_status(self, withdrawal_id: str) -> WithdrawalTx:
        reply = await self.call("WithdrawalStatus", {"withdrawal_id": withdrawal_id})
        return WithdrawalTx(str(reply["status"]), str(reply["txid"]), int(reply["confirmations"]))

    async def events(self, after: int, limit: int = 500) -> ChainEvents:
        reply = await self.call("Events", {"after": after, "limit": limit})
        last_seq, height = reply.get("last_seq"), reply.get("height")
        return ChainEvents(
            list(reply["events"]),
            None if last_seq is None else int(last_seq),
            None if height is None else int(height),
        )
