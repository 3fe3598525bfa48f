"""`async with` for the SDK's objects that hold a connection or a task."""

from __future__ import annotations

from types import TracebackType


class ClosedOnExit:
    """Leaving `async with` closes the object (`close()`), however the block ended.

    Each class keeps its own `__aenter__`: a client is ready at once, a book or a
    session starts following its stream first.
    """

    __slots__ = ()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
