"""A copy of something auth owns, pushed on NATS and reloaded as a backstop.

Two copies run on this: the frozen accounts every authenticator refuses
(account_states.py) and the fee tiers the order gateways price orders with
(fee_tiers.py). Both follow the same rules:
- auth is the truth and numbers its changes (a change sequence: one more per
  committed change, in commit order, no gaps) and publishes each after its
  commit (an outbox), at least once, in order: the push;
- the push may be lost, so the copy knows the sequence it is complete up to,
  and a change that skips a number, a reconnect to NATS and a timer
  (`reload_s`) each reload the whole copy from auth: the backstop.

`Followed` is the reload loop and the push's subscription; a subclass says how
a change and a whole answer apply (`replace`, and its own `apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from prometheus_client import Counter

from .bus import nats_connection
from .errors import Unavailable

__all__ = ["Followed", "follow_subject"]

S = TypeVar("S")  # what a reload answers

_log = logging.getLogger("cex.followed")


class Followed(Generic[S]):
    """The reload loop of a copy: `run` reloads now, then on every `ask_reload`
    (a gap, a reconnect, an undecodable push) and every `reload_s`."""

    what = "the copy"  # for logs and errors

    def __init__(
        self,
        load: Callable[[], Awaitable[S]],
        *,
        reload_s: float,
        reloads: Counter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.reload_s = reload_s
        self._reloads_total = reloads
        self._clock = clock
        self.change_seq = 0  # complete up to this sequence
        self.synced_at: float | None = None  # when auth last answered (clock)
        self._wake = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    def replace(self, snapshot: S) -> None:
        """The whole copy as auth answered it (and `synced_at`)."""
        raise NotImplementedError

    def ask_reload(self, cause: str) -> None:
        self._reloads_total.labels(cause).inc()
        self._wake.set()

    async def reload(self) -> None:
        async with self._reload_lock:
            self._wake.clear()  # before loading: a change heard during it asks again
            self.replace(await self._load())  # sets synced_at when it took the answer

    async def fresh(self, max_age_s: float, reason: str) -> None:
        """Reload unless auth answered within `max_age_s`; UNAVAILABLE `reason` if it cannot."""
        if self.synced_at is not None and self._clock() - self.synced_at <= max_age_s:
            return
        try:
            await self.reload()
        except Exception as error:
            raise Unavailable(reason, f"cannot read {self.what} from auth; retry") from error

    async def run(self, subscribe: Callable[[], Awaitable[None]] | None = None) -> None:
        """Reload now, then on every gap, reconnect and `reload_s`; `subscribe` (the
        push: it calls `apply` and `ask_reload("reconnect")`) runs alongside."""
        follower = asyncio.ensure_future(subscribe()) if subscribe is not None else None
        try:
            await self._reloads()
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await follower

    async def _reloads(self) -> None:
        failures = 0
        while True:
            try:
                await self.reload()
                if failures:
                    _log.warning("%s reloaded again after %d failures", self.what, failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                if failures == 1:
                    _log.warning("reloading %s from auth failed: %r", self.what, error)
            wait = self.reload_s if not failures else min(self.reload_s, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if not self._wake.is_set():
                self._reloads_total.labels("timer").inc()


def follow_subject(
    copy: Followed[Any],
    apply: Callable[[bytes], None],
    url: str,
    subject: str,
    *,
    name: str,
) -> Callable[[], Awaitable[None]]:
    """The push for `Followed.run`: a core NATS subscription to `subject` (every
    replica of every service hears each change; nothing durable to clean up),
    each message handed to `apply` (which decodes it: an error asks for a reload).
    What it misses while disconnected is caught by the reload after the reconnect."""

    async def on_message(message: Msg) -> None:
        try:
            apply(message.data)
        except Exception as error:
            _log.error("UNDECODABLE change on %s: %r", message.subject, error)
            copy.ask_reload("undecodable")

    async def on_reconnect() -> None:
        copy.ask_reload("reconnect")

    async def follow() -> None:
        while True:
            try:
                async with nats_connection(url, name=name, on_reconnect=on_reconnect) as client:
                    await client.subscribe(subject, cb=on_message)
                    copy.ask_reload("subscribed")  # what came before the subscription
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                _log.warning("following %s on NATS failed: %r", subject, error)
                await asyncio.sleep(1.0)

    return follow
