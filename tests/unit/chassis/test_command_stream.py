"""chassis' CommandStream against a small in-process MatchService: batching,
answers in order, and UNAVAILABLE with the caller's reason when the writer is
away, breaks the stream or does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from cex.match.v1 import match_pb2, match_pb2_grpc
from services.chassis import CommandStream, Unavailable


class FakeWriter(match_pb2_grpc.MatchServiceServicer):
    """Answers each message with one result per command (its id as the market),
    after `delay_s`; `silent` answers nothing."""

    def __init__(self) -> None:
        self.messages: list[list[int]] = []  # per message, each command's transfers
        self.streams = 0
        self.delay_s = 0.0
        self.silent = False

    async def SubmitCommands(
        self, request_iterator: AsyncIterator[match_pb2.SubmitCommandsRequest], context: object
    ) -> AsyncIterator[match_pb2.SubmitCommandsResponse]:
        self.streams += 1
        async for request in request_iterator:
            self.messages.append([len(c.transfers.transfers) for c in request.commands])
            if self.silent:
                continue
            await asyncio.sleep(self.delay_s)
            yield match_pb2.SubmitCommandsResponse(
                results=[
                    match_pb2.CommandResult(command_id=c.command_id, market=c.command_id)
                    for c in request.commands
                ]
            )


@contextlib.asynccontextmanager
async def serving(writer: FakeWriter, port: int = 0) -> AsyncIterator[grpc.aio.Server]:
    server = grpc.aio.server()
    match_pb2_grpc.add_MatchServiceServicer_to_server(writer, server)
    server.bound = server.add_insecure_port(f"127.0.0.1:{port}")  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def stream_to(port: int, **kwargs: object) -> AsyncIterator[CommandStream]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = CommandStream(channel, reason="LEDGER_UNAVAILABLE", name="test", **kwargs)  # type: ignore[arg-type]
        task = asyncio.create_task(stream.run())
        try:
            yield stream
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def command(i: int, transfers: int = 0) -> match_pb2.Command:
    return match_pb2.Command(
        command_id=f"c{i}",
        transfers=match_pb2.TransfersCommand(
            transfers=[match_pb2.FundsTransfer(id=f"t{i}-{j}") for j in range(transfers)]
        ),
    )


async def test_concurrent_commands_share_one_stream_and_are_answered_in_order() -> None:
    writer = FakeWriter()
    writer.delay_s = 0.02  # what queues while a message is answered goes in the next one
    async with serving(writer) as server, stream_to(server.bound) as stream:  # type: ignore[attr-defined]
        results = await asyncio.gather(*(stream.submit(command(i)) for i in range(200)))
        assert [r.market for r in results] == [f"c{i}" for i in range(200)]
        again = await stream.submit(command(999))
        assert again.market == "c999"
    assert writer.streams == 1
    assert sum(map(len, writer.messages)) == 201 and len(writer.messages) < 50


async def test_a_message_holds_at_most_max_weight_unless_one_command_is_heavier() -> None:
    writer = FakeWriter()
    writer.delay_s = 0.02
    async with (
        serving(writer) as server,
        stream_to(
            server.bound,  # type: ignore[attr-defined]
            max_weight=10,
            weight=lambda c: len(c.transfers.transfers),
        ) as stream,
    ):
        await stream.submit(command(0, 1))  # the stream is open and idle
        writer.messages.clear()
        sizes = [4, 4, 4, 30, 1, 1]
        results = await asyncio.gather(*(stream.submit(command(i, n)) for i, n in enumerate(sizes)))
        assert [r.market for r in results] == [f"c{i}" for i in range(len(sizes))]
    assert sorted(n for message in writer.messages for n in message) == sorted(sizes)
    for message in writer.messages:  # never 4 + 4 + 4 (12 > 10) in one message
        assert len(message) == 1 or sum(message) <= 10, writer.messages


async def test_unavailable_at_once_while_the_writer_is_away_and_back_when_it_returns() -> None:
    writer = FakeWriter()
    async with serving(writer) as server:
        port = server.bound  # type: ignore[attr-defined]
    async with stream_to(port, timeout_s=30.0) as stream:
        began = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await stream.submit(command(1))
        assert caught.value.reason == "LEDGER_UNAVAILABLE"
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 10  # not the 30 s timeout
        async with serving(writer, port):
            for _ in range(50):  # the channel reconnects on its own backoff
                try:
                    result = await stream.submit(command(2))
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("the stream did not come back")
            assert result.market == "c2"


async def test_a_broken_stream_fails_what_was_in_flight_as_unavailable() -> None:
    writer = FakeWriter()
    writer.delay_s = 5.0
    async with serving(writer) as server, stream_to(server.bound) as stream:  # type: ignore[attr-defined]
        pending = asyncio.gather(
            *(stream.submit(command(i)) for i in range(3)), return_exceptions=True
        )
        await asyncio.sleep(0.3)
        await server.stop(0)
        outcomes = await asyncio.wait_for(pending, 5)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert {o.reason for o in outcomes} == {"LEDGER_UNAVAILABLE"}  # type: ignore[union-attr]


async def test_no_answer_in_time_is_unavailable() -> None:
    writer = FakeWriter()
    writer.silent = True
    async with serving(writer) as server, stream_to(server.bound, timeout_s=0.3) as stream:  # type: ignore[attr-defined]
        with pytest.raises(Unavailable) as caught:
            await stream.submit(command(1))
        assert caught.value.reason == "LEDGER_UNAVAILABLE"
