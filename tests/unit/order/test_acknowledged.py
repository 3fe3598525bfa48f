"""What order answered and its read model has not stored yet, per account."""

from __future__ import annotations

from services.order.acknowledged import Acknowledged


def test_answers_are_waited_for_until_the_consumer_passes_them() -> None:
    cursors = {"BTC-USDT": 0, "ETH-USDT": 0}
    acked = Acknowledged(cursors.__getitem__)
    acked.add("a", "o1", "BTC-USDT", 5)
    acked.add("a", "o2", "ETH-USDT", 3)
    acked.add("a", "o3", "BTC-USDT", 6)
    acked.add("b", "o4", "BTC-USDT", 7)
    assert acked.awaited("a") == {"BTC-USDT": 6, "ETH-USDT": 3}
    assert acked.awaited() == {"BTC-USDT": 7, "ETH-USDT": 3}
    assert acked.awaited("c") == {}

    cursors["BTC-USDT"] = 6  # the consumer stored BTC-USDT up to 6
    assert acked.awaited("a") == {"ETH-USDT": 3}
    assert acked.awaited("b") == {"BTC-USDT": 7}

    acked.add("a", "o2", "ETH-USDT", 4)  # a later answer about the same order
    acked.add("a", "o2", "ETH-USDT", 2)  # an older one changes nothing
    assert acked.awaited("a") == {"ETH-USDT": 4}
    cursors["ETH-USDT"] = cursors["BTC-USDT"] = 9
    assert acked.awaited() == {}
