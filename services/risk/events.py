"""Kill switch changes on JetStream, from the transactional outbox.

SetKillSwitch writes the switch and its audit-log row in one transaction; this
loop publishes unpublished rows as `cex.risk.v1.KillSwitchEvent` on
`risk.events.kill_switch` (stream RISK_EVENTS, `Nats-Msg-Id: risk-ks-<id>`)
and marks them. So every change reaches the order service at least once, in
order, even if risk dies between the commit and the publish; consumers skip
event ids they have seen. JetStream is not the only copy: the log and
ListKillSwitches are the truth.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from cex.risk.v1 import risk_pb2
from services.chassis.bus import Outbox as ChassisOutbox

from .domain import KillSwitch
from .rules import switch_pb
from .store import Store

__all__ = ["STREAM", "SUBJECT", "Outbox", "switch_pb"]

STREAM = "RISK_EVENTS"
SUBJECT = "risk.events.kill_switch"
_log = logging.getLogger("cex.risk.events")


class Outbox(ChassisOutbox):
    """Kill switch changes, published by the chassis' outbox loop."""

    def __init__(self, store: Store, js: JetStreamContext, *, every_s: float = 1.0) -> None:
        super().__init__(
            js,
            STREAM,
            ["risk.events.>"],
            lambda: store.publish_kill_switch_log(self._publish),
            every_s=every_s,
            log=_log,
        )
        self._js = js

    async def _publish(self, rows: list[tuple[int, KillSwitch, bool, str]]) -> None:
        for event_id, switch, cancel, request_id in rows:
            event = risk_pb2.KillSwitchEvent(
                event_id=event_id,
                kill_switch=switch_pb(switch),
                cancel_open_orders=cancel,
                request_id=request_id,
            )
            await self._js.publish(
                SUBJECT,
                event.SerializeToString(),
                stream=STREAM,
                headers={"Nats-Msg-Id": f"risk-ks-{event_id}"},
            )
