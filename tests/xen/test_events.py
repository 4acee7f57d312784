"""Xen's vkbd/vfb event rings (io/kbdif.h, io/fbif.h): 40-byte events, slot = idx % len."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keeper.errors import ProtocolError
from keeper.xen import events as ev
from keeper.xen.console import RawPage


def page() -> RawPage:
    return RawPage(bytearray(4096))


def test_layout_matches_the_headers() -> None:
    assert (ev.KBD_IN.offset, ev.KBD_IN.size, ev.KBD_IN.slots) == (1024, 2048, 51)
    assert (ev.FB_OUT.offset, ev.FB_OUT.size, ev.FB_OUT.slots) == (2048, 2048, 51)
    key = ev.key_event(30, True)
    assert key[0] == ev.XENKBD_TYPE_KEY and key[1] == 1
    assert struct.unpack_from("<I", key, 4)[0] == 30  # keycode at offset 4
    assert ev.parse_kbd(ev.key_event(42, False).ljust(40, b"\0")) == (ev.XENKBD_TYPE_KEY, 42, 0)
    assert ev.parse_kbd(ev.pos_event(799, 599).ljust(40, b"\0")) == (ev.XENKBD_TYPE_POS,
                                                                     799, 599)
    assert ev.parse_update(ev.update_event(1, 2, 3, 4).ljust(40, b"\0")) == (1, 2, 3, 4)


def test_full_ring_takes_what_fits() -> None:
    p = page()
    events = [ev.key_event(i, True) for i in range(60)]
    assert ev.put(p, ev.KBD_IN, events, peer="x") == 51
    got = ev.take(p, ev.KBD_IN, peer="x")
    assert [ev.parse_kbd(e)[1] for e in got] == list(range(51))


def test_indices_wrap_at_2_32_and_slots_at_the_ring_length() -> None:
    p = page()
    start = 2**32 - 7
    p.write(ev.KBD_IN.cons, struct.pack("<I", start))
    p.write(ev.KBD_IN.prod, struct.pack("<I", start))
    events = [ev.key_event(i, True) for i in range(20)]
    assert ev.put(p, ev.KBD_IN, events, peer="x") == 20
    assert struct.unpack("<I", p.read(ev.KBD_IN.prod, 4))[0] == (start + 20) % 2**32
    assert [ev.parse_kbd(e)[1] for e in ev.take(p, ev.KBD_IN, peer="x")] == list(range(20))


def test_a_producer_running_ahead_is_the_peers_fault() -> None:
    p = page()
    p.write(ev.FB_OUT.prod, struct.pack("<I", 52))
    with pytest.raises(ProtocolError) as err:
        ev.take(p, ev.FB_OUT, peer="Domain U")
    assert err.value.fault == "Domain U"


@given(st.lists(st.integers(min_value=0, max_value=70), min_size=1, max_size=40))
def test_any_interleaving_keeps_the_event_stream(batches: list[int]) -> None:
    p, sent, got, n = page(), [], [], 0
    for size in batches:
        batch = [ev.update_event(n + i, 0, 1, 1) for i in range(size)]
        taken = ev.put(p, ev.FB_OUT, batch, peer="x")
        sent += [n + i for i in range(taken)]
        n += taken
        got += [ev.parse_update(e)[0] for e in ev.take(p, ev.FB_OUT, peer="x",  # type: ignore[index]
                                                         limit=size // 2 + 1)]
    got += [ev.parse_update(e)[0] for e in ev.take(p, ev.FB_OUT, peer="x")]  # type: ignore[index]
    assert got == sent


def test_fb_header_is_checked() -> None:
    p = page()
    ev.write_fb_header(p, 800, 600, 32, [263])
    assert ev.read_fb_header(p) == (800, 600, 3200, 1920000, 32)
    assert ev.read_pd(p, 1) == [263]
    p.write(ev.FB_WIDTH, struct.pack("<i", 100000))
    with pytest.raises(ProtocolError):
        ev.read_fb_header(p)
