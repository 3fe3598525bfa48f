"""jetstream_consumer_pending and jetstream_consumer_redelivered_total move with a real
JetStream consumer: what is left to fetch, and what comes again unacked."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY

from services.chassis import ensure_stream, observe_fetch


def _sample(name: str, consumer: str) -> float:
    labels = {"stream": "METRICS_TEST", "consumer": consumer}
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_pending_and_redeliveries_follow_the_consumer(private_nats: str) -> None:
    client = await nats.connect(private_nats)
    try:
        js = client.jetstream()
        await ensure_stream(js, "METRICS_TEST", ["metrics.test"])
        for i in range(10):
            await js.publish("metrics.test", str(i).encode())
        sub = await js.pull_subscribe(
            "metrics.test",
            durable="probe",
            stream="METRICS_TEST",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5),
        )
        first = await sub.fetch(4, timeout=5)
        observe_fetch("METRICS_TEST", "probe", first)
        assert _sample("jetstream_consumer_pending", "probe") == 6
        assert _sample("jetstream_consumer_redelivered_total", "probe") == 0
        for message in first[:2]:
            await message.ack()  # the other two are left to time out

        await asyncio.sleep(1.0)  # past ack_wait: the two unacked come back first
        again = await sub.fetch(10, timeout=5)
        observe_fetch("METRICS_TEST", "probe", again)
        assert len(again) == 8
        assert _sample("jetstream_consumer_redelivered_total", "probe") == 2
        assert _sample("jetstream_consumer_pending", "probe") == 0
        await sub.unsubscribe()
    finally:
        await client.close()
