"""Streaming jobs (`seq`): output far larger than any buffer, across a memory copy."""

from __future__ import annotations

import mmap

from keeper.domu.guestos import GuestOS
from keeper.domu.memory import GuestMemory
from keeper.xen import console as ring

PROMPT = b"guest1:~$ "


def boot() -> tuple[mmap.mmap, GuestOS]:
    m = mmap.mmap(-1, 8 << 20)
    g = GuestOS.boot(GuestMemory(m, mmap.mmap(-1, 2048)))
    ring.backend_take_output(ring.RawPage(m, 4096))  # the banner
    return m, g


def drain(m: mmap.mmap, g: GuestOS, until: bytes, steps: int = 100_000) -> bytes:
    page, out = ring.RawPage(m, 4096), b""
    for _ in range(steps):
        g.service_console()
        out += ring.backend_take_output(page)
        if out.endswith(until):
            break
    return out


def test_seq_streams_everything_in_order_even_across_a_copy() -> None:
    m, g = boot()
    ring.backend_put_input(ring.RawPage(m, 4096), b"seq 1 30000\r")
    first = b""
    page = ring.RawPage(m, 4096)
    for _ in range(20):  # part of the output, then "migrate": copy memory, attach anew
        g.service_console()
        first += ring.backend_take_output(page)
    copy = mmap.mmap(-1, len(m))
    copy[:] = m[:]
    g2 = GuestOS.attach(GuestMemory(copy, mmap.mmap(-1, 2048)))
    rest = drain(copy, g2, PROMPT)
    lines = (first + rest).split(b"\r\n")
    assert lines[0] == b"seq 1 30000"
    assert [int(x) for x in lines[1:-1]] == list(range(1, 30001))
    assert lines[-1] == PROMPT


def test_ctrl_c_stops_a_job_and_is_journaled() -> None:
    m, g = boot()
    page = ring.RawPage(m, 4096)
    ring.backend_put_input(page, b"seq 1000000000\r")
    drain(m, g, b"NEVER", steps=5)
    ring.backend_put_input(page, b"\x03")
    out = drain(m, g, PROMPT)
    assert out.endswith(b"^C\r\n" + PROMPT)
    assert g.journal() == b"seq 1000000000\r\x03"
