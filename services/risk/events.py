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

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext

from cex.risk.v1 import risk_pb2
from services.chassis import ensure_stream

from .domain import KillSwitch
from .rules import switch_pb
from .store import Store

__all__ = ["STREAM", "SUBJECT", "Outbox", "switch_pb"]

STREAM = "RISK_EVENTS"
SUBJECT = "risk.events.kill_switch"
_log = logging.getLogger("cex.risk.events")


class Outbox:
    def __init__(self, store: Store, js: JetStreamContext, *, every_s: float = 1.0) -> None:
        self._store = store
        self._js = js
        self._every = every_s
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """A switch changed here: publish now rather than at the next tick."""
        self._wake.set()

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

    async def run(self) -> None:
        ready = False
        while True:
            self._wake.clear()  # before publishing: a notify during it is not lost
            try:
                if not ready:
                    await ensure_stream(self._js, STREAM, ["risk.events.>"])
                    ready = True
                while await self._store.publish_kill_switch_log(self._publish):
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("kill switch outbox: publish failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
