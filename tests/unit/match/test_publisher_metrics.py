"""match_journal_unpublished_events: the journal's lead over what reached JetStream."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY

from services.match.publisher import Publisher


def test_unpublished_events_follow_the_journal_and_the_publisher() -> None:
    log: Any = SimpleNamespace(market=SimpleNamespace(symbol="GAUGE-TEST"), committed_seq=0)
    publisher = Publisher(js=None, log=log)  # type: ignore[arg-type]

    def unpublished() -> float | None:
        return REGISTRY.get_sample_value(
            "match_journal_unpublished_events", {"market": "GAUGE-TEST"}
        )

    assert unpublished() == 0
    log.committed_seq = 40  # the writer journaled 40 events
    assert unpublished() == 40
    publisher.published_seq = 35  # the publisher got acks up to 35
    assert unpublished() == 5
    publisher.published_seq = 40
    assert unpublished() == 0
