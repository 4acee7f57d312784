"""Hypothesis against receive_data: whatever a client sends, the core answers with events
or a ProtocolError — never another exception, never a hang — and how the bytes are split
(or checkpointed in between) never changes what it makes of them."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper.errors import ProtocolError
from keeper.vnc.rfb import Event, Phase, RfbServer, dumps_state, loads_state
from tests.vnc.formats import FORMATS
from tests.vnc.helpers import (
    connect,
    cut_text,
    des_response,
    key_event,
    pointer_event,
    set_encodings,
    set_pixel_format,
    update_request,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u16 = st.integers(0, 0xFFFF)
client_messages = st.one_of(
    st.sampled_from(sorted(FORMATS)).map(lambda n: set_pixel_format(FORMATS[n])),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20).map(set_encodings),
    st.builds(update_request, st.booleans(), u16, u16, u16, u16),
    st.builds(key_event, st.integers(0, 2**32 - 1), st.booleans()),
    st.builds(pointer_event, st.integers(0, 255), u16, u16),
    st.binary(max_size=300).map(cut_text),
)
streams = st.lists(client_messages, max_size=25).map(b"".join)


def normal_server() -> RfbServer:
    return connect(320, 200).server


def fresh_server(password: bytes | None = None) -> RfbServer:
    s = RfbServer(width=320, height=200, name="fuzz", password=password,
                  random=lambda n: b"\x5a" * n)
    s.connection_made()
    s.data_to_send()
    return s


def feed(server: RfbServer, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed `data` split at `cuts`; only ProtocolError may escape, and it poisons."""
    events: list[Event] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        try:
            events += server.receive_data(data[a:b])
        except ProtocolError:
            assert server.phase is Phase.FAILED
            with pytest.raises(ProtocolError):
                server.receive_data(b"x")
            server.data_to_send()  # still allowed: the failure message
            raise
    return events


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_random_bytes_after_the_handshake(data: bytes, cuts: list[int]) -> None:
    server = normal_server()
    with contextlib.suppress(ProtocolError):
        feed(server, data, cuts)
    assert len(server.state.inbuf) <= len(data)


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1200), max_size=8),
       password=st.sampled_from([None, b"pw"]))
def test_random_bytes_during_the_handshake(data: bytes, cuts: list[int],
                                           password: bytes | None) -> None:
    server = fresh_server(password)
    with contextlib.suppress(ProtocolError):
        feed(server, data, cuts)


@FUZZ
@given(prefix=st.sampled_from([b"RFB 003.003\n", b"RFB 003.007\n\x02", b"RFB 003.008\n\x02",
                               b"RFB 003.008\n\x01", b"RFB 003.889\n"]),
       data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_after_a_valid_greeting(prefix: bytes, data: bytes,
                                             cuts: list[int]) -> None:
    server = fresh_server(b"pw")
    with contextlib.suppress(ProtocolError):
        feed(server, prefix + data, cuts)


@FUZZ
@given(stream=streams, cuts=st.lists(st.integers(0, 20000), max_size=12),
       keep=st.integers(0, 20000))
def test_valid_streams_any_split_any_truncation(stream: bytes, cuts: list[int],
                                                keep: int) -> None:
    """A valid stream, cut short anywhere and split anywhere: no error, and the events
    are exactly those of the whole messages in the prefix, in order."""
    whole = normal_server().receive_data(stream)
    prefix = stream[:keep % (len(stream) + 1)]
    server = normal_server()
    events = feed(server, prefix, cuts)
    assert events == whole[:len(events)]
    rest = server.receive_data(stream[len(prefix):])
    assert events + rest == whole
    assert server.state.inbuf == b""


@FUZZ
@given(stream=streams, at=st.integers(0, 20000))
def test_checkpoint_anywhere_changes_nothing(stream: bytes, at: int) -> None:
    at %= len(stream) + 1
    reference = normal_server()
    whole = reference.receive_data(stream)
    server = normal_server()
    events = server.receive_data(stream[:at])
    restored = RfbServer(width=1, height=1, name="-", state=loads_state(dumps_state(server.state)))
    events += restored.receive_data(stream[at:])
    assert events == whole
    assert restored.state == reference.state


@FUZZ
@given(stream=streams, flips=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)),
                                      min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 20000), max_size=6))
def test_corrupted_valid_streams(stream: bytes, flips: list[tuple[int, int]],
                                 cuts: list[int]) -> None:
    if not stream:
        return
    data = bytearray(stream)
    for pos, value in flips:
        data[pos % len(data)] = value
    server = normal_server()
    with contextlib.suppress(ProtocolError):
        feed(server, bytes(data), cuts)


@FUZZ
@given(data=st.binary(max_size=100))
def test_wrong_auth_responses_fail_cleanly(data: bytes) -> None:
    server = fresh_server(b"pw")
    server.receive_data(b"RFB 003.008\n\x02")
    good = des_response(b"pw", b"\x5a" * 16)
    try:
        server.receive_data(data)
    except ProtocolError as exc:
        assert data[:16] != good
        assert exc.wire.startswith(b"\x00\x00\x00\x01")  # type: ignore[attr-defined]
    else:
        assert len(data) < 16 or data[:16] == good
