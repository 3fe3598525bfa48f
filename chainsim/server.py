"""The simulator as a process: JSON over gRPC (generic handlers, no proto), blocks on a timer.

It is not part of the exchange: it stands for blockchains and custody, which the
funding service reaches over the network. Methods (`/chainsim.Chain/<Name>`, a
JSON object in, a JSON object out):

- NewAddress {account_id, asset, network} -> {address}
- Broadcast {withdrawal_id, asset, network, address, amount} -> {txid}; refused
  for good: FAILED_PRECONDITION; lost answer: DEADLINE_EXCEEDED after recording
- WithdrawalStatus {withdrawal_id} -> {status, txid, confirmations}
- Events {after, limit} -> {events: [...], height, last_seq}: deposit notifications,
  with `seq`, and the chain's tip (a watcher whose cursor is beyond `last_seq` is
  on a chain that lost blocks it had read: a deep reorg)
- Deposit {address, asset, amount} -> {txid} (tests and benchmarks: an outside sender)
- Mine {blocks} -> {height}; Configure {faults} -> {}; Stats {} -> {...}

With a journal (CHAINSIM_STATE_DIR), every call that changes the chain is
recorded before it is answered, so a restarted process has the same chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .chain import Chain, Faults
from .journal import ChainJournal

__all__ = ["SERVICE", "ChainServer"]

SERVICE = "chainsim.Chain"
_log = logging.getLogger("cex.chainsim")
Handler = Callable[[dict[str, Any], grpc.aio.ServicerContext[Any, Any]], Awaitable[dict[str, Any]]]


def _decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data or b"{}")
    if not isinstance(value, dict):
        raise ValueError("a JSON object is expected")
    return value


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class ChainServer:
    def __init__(
        self,
        chain: Chain,
        *,
        block_interval_s: float,
        lost_answer_s: float = 30.0,
        journal: ChainJournal | None = None,
    ):
        self.chain = chain
        self.journal = journal
        self.block_interval_s = block_interval_s
        self.lost_answer_s = lost_answer_s
        self._server: grpc.aio.Server | None = None
        self._miner: asyncio.Task[None] | None = None

    def _handlers(self) -> dict[str, Handler]:
        return {
            "NewAddress": self._new_address,
            "Broadcast": self._broadcast,
            "WithdrawalStatus": self._withdrawal_status,
            "Events": self._events,
            "Deposit": self._deposit,
            "Mine": self._mine,
            "Configure": self._configure,
            "Stats": self._stats,
        }

    def _record(self, entry: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.record(self.chain, entry)

    async def _new_address(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        known = len(self.chain.addresses)
        try:
            address = self.chain.new_address(r["account_id"], r["asset"], r["network"])
        except ValueError as error:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if len(self.chain.addresses) != known:
            self._record(
                {"op": "address", "account_id": r["account_id"], "asset": r["asset"],
                 "network": r["network"]}
            )  # fmt: skip
        return {"address": address}

    async def _broadcast(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        args = {k: r[k] for k in ("withdrawal_id", "asset", "network", "address", "amount")}
        outcome, detail = self.chain.broadcast(**args)
        self._record({"op": "broadcast", **args})  # even a refusal: calls are counted
        if outcome == "rejected":
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, detail)
        if outcome == "error":
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, detail)
        if outcome == "timeout":  # recorded, but the answer never arrives in time
            await asyncio.sleep(self.lost_answer_s)
            await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer from custody")
        return {"txid": detail}

    async def _withdrawal_status(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return self.chain.withdrawal_status(r["withdrawal_id"])

    async def _events(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        events = self.chain.events(int(r.get("after", 0)), int(r.get("limit", 500)))
        return {"events": events, **self.chain.tip()}

    async def _deposit(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        args = {k: r[k] for k in ("address", "asset", "amount")}
        txid = self.chain.deposit(**args)
        self._record({"op": "deposit", **args})
        return {"txid": txid}

    async def _mine(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        blocks = int(r.get("blocks", 1))
        for _ in range(blocks):
            self.chain.mine()
        self._record({"op": "mine", "blocks": blocks})
        return {"height": self.chain.height}

    async def _configure(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        faults = Faults.of(r.get("faults", {}))
        self.chain.configure(faults)
        self._record({"op": "configure", "faults": faults.as_dict()})
        return {}

    async def _stats(self, r: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return self.chain.stats()

    def _generic(self) -> grpc.GenericRpcHandler:
        def wrap(handler: Handler) -> Callable[..., Awaitable[dict[str, Any]]]:
            async def call(request: dict[str, Any], context: Any) -> dict[str, Any]:
                try:
                    return await handler(request, context)
                except KeyError as missing:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"missing {missing}")
                    raise  # unreachable: abort raises

            return call

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    wrap(handler), request_deserializer=_decode, response_serializer=_encode
                )
                for name, handler in self._handlers().items()
            },
        )

    async def _mine_forever(self) -> None:
        while True:
            await asyncio.sleep(self.block_interval_s)
            self.chain.mine()
            self._record({"op": "mine", "blocks": 1})

    async def start(self, host: str, port: int) -> int:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self._generic(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        await health_servicer.set("", serving)
        await health_servicer.set(SERVICE, serving)
        if self.block_interval_s > 0:
            self._miner = asyncio.ensure_future(self._mine_forever())
        _log.info("chainsim serving on %s:%s", host, bound)
        return bound

    async def stop(self) -> None:
        if self._miner is not None:
            self._miner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._miner
        if self._server is not None:
            await self._server.stop(0.5)
        if self.journal is not None:
            self.journal.close(self.chain)
