"""Kill switches engaged with cancel_open_orders: cancel the working orders in scope.

Risk publishes every switch change on JetStream (`risk.events.kill_switch`,
stream RISK_EVENTS; ADR 0007). A durable pull consumer here cancels, for an
engaged switch whose operator asked for it, the working orders of the account,
the market or the whole exchange, with reason KILL_SWITCH. The mass-cancel
command ids are derived from the event id, so a redelivered event is answered
by match from its journal instead of cancelling again; messages are acked
after the cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cex.risk.v1 import risk_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import ensure_stream

from .flow import Flow

__all__ = ["KillSwitchConsumer"]

STREAM = "RISK_EVENTS"
SUBJECT = "risk.events.kill_switch"
_log = logging.getLogger("cex.order.killswitch")


class KillSwitchConsumer:
    def __init__(self, *, flow: Flow, js: JetStreamContext, durable: str) -> None:
        self._flow = flow
        self._js = js
        self._durable = durable
        self.handled = 0

    async def run(self) -> None:
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("kill-switch consumer stopped; restarting in 1 s")
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        await ensure_stream(self._js, STREAM, ["risk.events.>"])
        sub = await self._js.pull_subscribe(
            SUBJECT,
            durable=self._durable,
            stream=STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW, ack_wait=60.0
            ),
        )
        try:
            while True:
                try:
                    messages = await sub.fetch(50, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for message in messages:
                    await self.handle(risk_pb2.KillSwitchEvent.FromString(message.data))
                    await message.ack()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 1.0)

    async def handle(self, event: risk_pb2.KillSwitchEvent) -> None:
        switch = event.kill_switch
        if not (switch.engaged and event.cancel_open_orders):
            return
        market = switch.market if switch.scope == risk_pb2.KILL_SWITCH_SCOPE_MARKET else ""
        if switch.scope == risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT:
            accounts = [switch.account_id]
        else:
            accounts = await self._flow.store.accounts_working(market)
        for account in accounts:
            await self._flow.cancel_all(
                account, market, reason=t.CANCEL_REASON_KILL_SWITCH, tag=f"kill:{event.event_id}"
            )
        self.handled += 1
        _log.info(
            "kill switch %s: cancelled the orders of %d accounts", event.event_id, len(accounts)
        )
