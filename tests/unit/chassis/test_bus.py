import pytest
from nats.aio.msg import Msg

from services.chassis.bus import _num_delivered


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.MATCH_EVENTS.ledger.1.17.17.1763900000000000000.0",  # v1
        "$JS.ACK.MATCH_EVENTS.ledger.3.18.19.1763900000000000000.42",
        "$JS.ACK._.ACCHASH.MATCH_EVENTS.ledger.2.18.19.1763900000000000000.5.tok",  # v2
        "$JS.ACK.hub.ACCHASH.MATCH_EVENTS.ledger.7.18.19.1763900000000000000.5",
    ],
)
def test_delivery_count_read_as_nats_py_reads_it(reply: str) -> None:
    message = Msg(None, subject="match.events.BTC-USDT", reply=reply)  # type: ignore[arg-type]
    assert _num_delivered(message) == message.metadata.num_delivered
