import pytest

from keeper.console.raw import OUTPUT_HIGH_WATER, RawSession
from keeper.errors import ProtocolError


def test_bytes_flow_in_order_and_are_counted() -> None:
    s = RawSession(id=1)
    s.receive(b"abc")
    s.receive(b"def")
    assert s.take_input(4) == b"abcd"
    assert s.take_input() == b"ef"
    s.queue_output(b"xyz")
    s.sent_bytes(1)
    assert s.data_to_send() == b"yz"
    assert (s.received, s.sent) == (6, 1)


def test_restored_send_queue_goes_first() -> None:
    s = RawSession(id=1, pending_out=b"later")
    s.unqueue_front(b"first-")
    assert s.data_to_send() == b"first-later"


def test_backpressure_stops_input_above_high_water() -> None:
    s = RawSession(id=1)
    assert s.wants_input
    s.queue_output(b"x" * OUTPUT_HIGH_WATER)
    assert not s.wants_input


def test_eof_then_data_is_a_client_error() -> None:
    s = RawSession(id=1)
    s.receive(b"")
    assert s.peer_eof and s.finished
    with pytest.raises(ProtocolError) as err:
        s.receive(b"late")
    assert err.value.fault == "client"
