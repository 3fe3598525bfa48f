"""The chassis' PullConsumer against a real JetStream: decodable messages reach the
handler in stream order and are acked; an undecodable one is skipped and acked
(never redelivered, never blocking); a batch whose handler fails is not acked
and comes again after the ack wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.chassis import PullConsumer, ensure_stream

STREAM = "PULL_TEST"
SUBJECT = "pull.test"


@contextlib.asynccontextmanager
async def _jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await ensure_stream(js, STREAM, [f"{SUBJECT}.>"])
        yield js
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _running(consumer: PullConsumer[int]) -> AsyncIterator[None]:
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _consumer(
    js: JetStreamContext, durable: str, handle: Callable[[list[int]], Awaitable[None]]
) -> PullConsumer[int]:
    return PullConsumer(
        js=js,
        stream=STREAM,
        subjects=[f"{SUBJECT}.>"],
        filter_subject=f"{SUBJECT}.*",
        durable=durable,
        decode=int,  # b"7" -> 7; b"garbage" raises ValueError
        handle=handle,
        ack_wait_s=1.0,
        batch=100,
        fetch_timeout_s=0.2,
        span="test.pull",
        retry_after_s=0.1,
    )


async def _until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _sample(name: str, durable: str) -> float:
    labels = {"stream": STREAM, "consumer": durable}
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_undecodable_message_is_skipped_and_acked(private_nats: str) -> None:
    async with _jetstream(private_nats) as js:
        for data in (b"1", b"2", b"garbage", b"3"):
            await js.publish(f"{SUBJECT}.a", data)
        handled: list[int] = []

        async def handle(values: list[int]) -> None:
            handled.extend(values)

        async with _running(_consumer(js, "skips", handle)):
            await _until(lambda: handled == [1, 2, 3])
            await js.publish(f"{SUBJECT}.a", b"4")  # the consumer goes on past it
            await _until(lambda: handled == [1, 2, 3, 4])
            await asyncio.sleep(1.5)  # past ack_wait: anything unacked would be back
            info = await js.consumer_info(STREAM, "skips")

        assert handled == [1, 2, 3, 4]
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 5
        assert _sample("jetstream_consumer_undecodable_total", "skips") == 1


async def test_a_failed_batch_is_not_acked_and_comes_again(private_nats: str) -> None:
    async with _jetstream(private_nats) as js:
        for data in (b"1", b"2", b"3"):
            await js.publish(f"{SUBJECT}.b", data)
        calls: list[tuple[float, list[int]]] = []

        async def handle(values: list[int]) -> None:
            calls.append((asyncio.get_running_loop().time(), values))
            if len(calls) == 1:
                raise RuntimeError("the store is away")

        async with _running(_consumer(js, "retries", handle)):
            await _until(lambda: len(calls) >= 2)
            await asyncio.sleep(1.5)  # past ack_wait again: the retried batch was acked
            info = await js.consumer_info(STREAM, "retries")

        assert [values for _, values in calls] == [[1, 2, 3], [1, 2, 3]]
        # The loop went on after the failure, but JetStream held the batch back
        # until its ack wait (1 s) ran out.
        assert calls[1][0] - calls[0][0] >= 0.9
        assert _sample("jetstream_consumer_redelivered_total", "retries") == 3
        assert info.num_ack_pending == 0
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 3
