"""Kill switches engaged with cancel_open_orders: cancel the working orders in scope.

Risk publishes every switch change on JetStream (`risk.events.kill_switch`,
stream RISK_EVENTS; ADR 0007). A durable pull consumer here cancels, for an
engaged switch whose operator asked for it, the working orders of the account,
the market or the whole exchange, with reason KILL_SWITCH. The mass-cancel
command ids are derived from the event id, so a redelivered event is answered
by match from its journal instead of cancelling again. The chassis'
`PullConsumer` hands over each fetched batch, handled here one event after the
other in stream order, and acks it after the cancels; if one fails, the batch
comes again after the ack wait and the events already handled are answered
from match's journal. An event that does not decode is logged, counted
(`jetstream_consumer_undecodable_total`) and skipped rather than holding every
later switch: its open orders are not cancelled, but risk, which owns the
switch, still refuses new orders in its scope.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from cex.risk.v1 import risk_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import PullConsumer

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
        """Consume until cancelled (the chassis' PullConsumer: NATS being away is
        retried, an undecodable event skipped, a failed batch redelivered)."""
        await PullConsumer(
            js=self._js,
            stream=STREAM,
            subjects=["risk.events.>"],
            filter_subject=SUBJECT,
            durable=self._durable,
            decode=risk_pb2.KillSwitchEvent.FromString,
            handle=self._handle_all,
            # Switches engaged before this consumer first existed are not replayed.
            deliver_policy=DeliverPolicy.NEW,
            ack_wait_s=60.0,
            batch=50,
            log=_log,
        ).run()

    async def _handle_all(self, events: list[risk_pb2.KillSwitchEvent]) -> None:
        """One event after the other, in stream order."""
        for event in events:
            await self.handle(event)

    async def handle(self, event: risk_pb2.KillSwitchEvent) -> None:
        switch = event.kill_switch
        if not (switch.engaged and event.cancel_open_orders):
            return
        market = switch.market if switch.scope == risk_pb2.KILL_SWITCH_SCOPE_MARKET else ""
        if switch.scope == risk_pb2.KILL_SWITCH_SCOPE_ACCOUNT:
            accounts = [switch.account_id]
        else:
            await self._flow.caught_up(None)  # orders answered here and not stored yet
            accounts = await self._flow.store.accounts_working(market)
        for account in accounts:
            await self._flow.cancel_all(
                account, market, reason=t.CANCEL_REASON_KILL_SWITCH, tag=f"kill:{event.event_id}"
            )
        self.handled += 1
        _log.info(
            "kill switch %s: cancelled the orders of %d accounts", event.event_id, len(accounts)
        )
