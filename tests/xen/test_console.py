"""The xencons_interface ring: layout, both directions, index wrap, full rings,
a broken peer, and a property test over arbitrary interleavings."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper.errors import ProtocolError
from keeper.xen import console as c
from keeper.xen.console import (
    IN_SIZE,
    OUT_SIZE,
    RawPage,
    backend_put_input,
    backend_take_output,
    frontend_peek_input,
    frontend_put_output,
    frontend_take_input,
    init_ring,
    input_pending,
    input_space,
    output_pending,
    output_space,
)


def ring_at(start: int = 0) -> tuple[bytearray, RawPage]:
    """A ring page whose four indices all start at `start` (an empty ring)."""
    buf = bytearray(4096)
    page = RawPage(buf)
    init_ring(page)
    for off in (c.IN_CONS, c.IN_PROD, c.OUT_CONS, c.OUT_PROD):
        struct.pack_into("<I", buf, off, start % 2**32)
    return buf, page


def test_layout_matches_xen_console_h() -> None:
    assert (c.IN_OFF, IN_SIZE, c.OUT_OFF, OUT_SIZE) == (0, 1024, 1024, 2048)
    assert (c.IN_CONS, c.IN_PROD, c.OUT_CONS, c.OUT_PROD) == (3072, 3076, 3080, 3084)
    buf, page = ring_at()
    assert backend_put_input(page, b"abc") == 3
    assert buf[0:3] == b"abc"
    assert struct.unpack_from("<I", buf, c.IN_PROD)[0] == 3
    assert frontend_put_output(page, b"xy") == 2
    assert buf[1024:1026] == b"xy"
    assert struct.unpack_from("<I", buf, c.OUT_PROD)[0] == 2


def test_round_trip_both_directions() -> None:
    _, page = ring_at()
    assert backend_put_input(page, b"hello") == 5
    assert input_pending(page) == 5
    assert input_space(page) == IN_SIZE - 5
    assert frontend_peek_input(page) == b"hello"
    assert frontend_take_input(page, 2) == b"he"
    assert frontend_take_input(page) == b"llo"
    assert frontend_take_input(page) == b""
    assert frontend_put_output(page, b"world") == 5
    assert output_pending(page) == 5
    assert backend_take_output(page) == b"world"
    assert backend_take_output(page) == b""
    assert output_space(page) == OUT_SIZE


def test_buffer_wraps_around_its_end() -> None:
    _, page = ring_at(1000)
    data = bytes(range(100))
    assert backend_put_input(page, data) == 100  # 24 bytes before the end, 76 after
    assert frontend_take_input(page) == data
    _, page = ring_at(2040)
    assert frontend_put_output(page, data) == 100
    assert backend_take_output(page) == data


@pytest.mark.parametrize("start", [2**32 - 1, 2**32 - 7, 2**32 - 1024, 2**32 - 2048])
def test_u32_indices_wrap(start: int) -> None:
    buf, page = ring_at(start)
    data = bytes(range(256)) * 3
    assert backend_put_input(page, data) == len(data)
    assert input_pending(page) == len(data)
    assert frontend_take_input(page) == data
    assert struct.unpack_from("<I", buf, c.IN_PROD)[0] == (start + len(data)) % 2**32
    assert frontend_put_output(page, data) == len(data)
    assert backend_take_output(page) == data
    assert struct.unpack_from("<I", buf, c.OUT_CONS)[0] == (start + len(data)) % 2**32


def test_full_rings_take_what_fits() -> None:
    _, page = ring_at(2**32 - 10)
    assert backend_put_input(page, b"a" * 2000) == IN_SIZE
    assert input_space(page) == 0
    assert backend_put_input(page, b"b") == 0
    assert frontend_take_input(page, 24) == b"a" * 24
    assert backend_put_input(page, b"b" * 100) == 24
    assert frontend_take_input(page) == b"a" * 1000 + b"b" * 24
    assert frontend_put_output(page, b"o" * 5000) == OUT_SIZE
    assert frontend_put_output(page, b"p") == 0
    assert backend_take_output(page, 10) == b"o" * 10
    assert frontend_put_output(page, b"p" * 20) == 10
    assert backend_take_output(page) == b"o" * (OUT_SIZE - 10) + b"p" * 10


def test_data_is_stored_before_the_producer_index_moves() -> None:
    """A consumer that sees the new prod must find the data: record the write order."""
    writes: list[tuple[int, int]] = []

    class Recording(RawPage):
        def write(self, off: int, data: bytes) -> None:
            writes.append((off, len(data)))
            super().write(off, data)

    page = Recording(bytearray(4096))
    init_ring(page)
    writes.clear()
    backend_put_input(page, b"xyz")
    assert writes == [(0, 3), (c.IN_PROD, 4)]
    writes.clear()
    frontend_put_output(page, b"xyz")
    assert writes == [(1024, 3), (c.OUT_PROD, 4)]


@pytest.mark.parametrize(
    ("index", "value", "call"),
    [
        (c.IN_PROD, 1025, frontend_take_input),  # backend claims more than the ring holds
        (c.IN_CONS, 5, backend_put_input),  # frontend consumed past prod
        (c.OUT_PROD, 4000, backend_take_output),
        (c.OUT_CONS, 7, frontend_put_output),
    ],
)
def test_corrupted_index_is_a_peer_protocol_error(index: int, value: int, call: object) -> None:
    buf, page = ring_at()
    struct.pack_into("<I", buf, index, value)
    with pytest.raises(ProtocolError) as err:
        if call in (backend_put_input, frontend_put_output):
            call(page, b"data")  # type: ignore[operator]
        else:
            call(page)  # type: ignore[operator]
    assert err.value.fault == "peer"
    with pytest.raises(ProtocolError):
        input_pending(page) if index in (c.IN_PROD, c.IN_CONS) else output_pending(page)


def test_raw_page_checks_bounds_and_offsets() -> None:
    buf = bytearray(3 * 4096)
    page = RawPage(buf, base=4096)
    page.write(10, b"hi")
    assert buf[4096 + 10 : 4096 + 12] == b"hi"
    assert page.read(10, 2) == b"hi"
    with pytest.raises(ValueError):
        page.read(4095, 2)
    with pytest.raises(ValueError):
        page.write(-1, b"x")
    with pytest.raises(ValueError):
        RawPage(buf, base=2 * 4096 + 1)
    with pytest.raises(ValueError):
        RawPage(bytes(4096))
    page.release()


ops = st.one_of(
    st.tuples(st.just("put_in"), st.binary(max_size=1500)),
    st.tuples(st.just("take_in"), st.none() | st.integers(0, 1500)),
    st.tuples(st.just("put_out"), st.binary(max_size=2500)),
    st.tuples(st.just("take_out"), st.none() | st.integers(0, 2500)),
)


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from([0, 1000, 2**31, 2**32 - 1, 2**32 - 1500]) | st.integers(0, 2**32 - 1),
    script=st.lists(ops, max_size=40),
)
def test_any_interleaving_preserves_both_streams(
    start: int, script: list[tuple[str, object]]
) -> None:
    _, page = ring_at(start)
    sent_in = bytearray()
    got_in = bytearray()
    sent_out = bytearray()
    got_out = bytearray()
    for op, arg in script:
        if op == "put_in":
            assert isinstance(arg, bytes)
            space = input_space(page)
            n = backend_put_input(page, arg)
            assert n == min(space, len(arg))
            sent_in += arg[:n]
        elif op == "take_in":
            got_in += frontend_take_input(page, arg)  # type: ignore[arg-type]
        elif op == "put_out":
            assert isinstance(arg, bytes)
            space = output_space(page)
            n = frontend_put_output(page, arg)
            assert n == min(space, len(arg))
            sent_out += arg[:n]
        else:
            got_out += backend_take_output(page, arg)  # type: ignore[arg-type]
        assert input_pending(page) == len(sent_in) - len(got_in)
        assert output_pending(page) == len(sent_out) - len(got_out)
    got_in += frontend_take_input(page)
    got_out += backend_take_output(page)
    assert got_in == sent_in
    assert got_out == sent_out
