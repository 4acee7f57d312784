"""The keyboard and framebuffer backends of Domain R (Xen's vkbd and vfb backends).

Set-up reads the frontends' page numbers and ports from XenStore, maps the vkbd
page writable (we produce its input events), the vfb page writable (we consume its
update events), and the framebuffer read-only through the page directory, and
binds both ports. After a move the same pages are mapped again from the new host
and the same ports are already there (S6, S7).

The framebuffer is what VNC sessions read (`read`, BGRX rows); update events from
the guest become damage for them. Typed keys and the pointer go into the vkbd ring,
one key's events all or none; when it is full they wait in the VNC session until
the guest notifies that it consumed events (like the console's `in`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from keeper.errors import KeeperError, ProtocolError
from keeper.vmm.hypercall import HypercallClient
from keeper.xen import events as ev
from keeper.xen.console import RawPage

log = logging.getLogger("keeper.display")

PAGE = 4096
Rect = tuple[int, int, int, int]


@dataclass(slots=True)
class DisplayBackendState:
    kbd_pfn: int
    fb_pfn: int
    dir_pfn: int
    fb_first: int  # the framebuffer: fb_pages pages from here (checked contiguous)
    fb_pages: int
    kbd_port: int
    fb_port: int


class DisplayBackend:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc
        self.state: DisplayBackendState | None = None
        self.width = self.height = 0
        self._maps: list[mmap.mmap] = []
        self._kbd: RawPage | None = None
        self._fb: RawPage | None = None
        self._pixels: np.ndarray | None = None
        self._fds: dict[str, tuple[int, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self.on_damage: Callable[[list[Rect]], None] = lambda rects: None
        self.on_room: Callable[[], None] = lambda: None

    # -- set-up ---------------------------------------------------------------------------

    def _map(self, u: int, pfn: int, count: int, writable: bool) -> mmap.mmap:
        m = self.hc.map_pages(u, pfn, count, writable=writable)
        self._maps.append(m)
        return m

    def connect(self) -> None:
        u = self.hc.managed_domain()

        def xs(dev: str, key: str) -> int:
            value, _ = self.hc.call("xs_read", path=f"/local/domain/{u}/device/{dev}/0/{key}")
            if value is None:
                raise KeeperError(f"Domain U {u} has not published its {dev} ({key})")
            return int(value)

        kbd_pfn, fb_pfn = xs("vkbd", "page-ref"), xs("vfb", "page-ref")
        kbd_u, fb_u = xs("vkbd", "event-channel"), xs("vfb", "event-channel")
        fb_page = RawPage(self._map(u, fb_pfn, 1, True))
        width, height, _line, mem_len, _depth = ev.read_fb_header(fb_page)
        (dir_pfn,) = ev.read_pd(fb_page, 1)
        fb_pages = (mem_len + PAGE - 1) // PAGE
        directory = self._map(u, dir_pfn, 1, False)
        pfns = list(struct.unpack(f"<{fb_pages}Q", directory[: 8 * fb_pages]))
        if pfns != list(range(pfns[0], pfns[0] + fb_pages)):
            raise KeeperError("framebuffer pages are not contiguous: not supported")
        kbd_port, _ = self.hc.call("bind_interdomain", remote_domid=u, remote_port=kbd_u)
        fb_port, _ = self.hc.call("bind_interdomain", remote_domid=u, remote_port=fb_u)
        st = DisplayBackendState(
            kbd_pfn=kbd_pfn, fb_pfn=fb_pfn, dir_pfn=dir_pfn, fb_first=pfns[0],
            fb_pages=fb_pages, kbd_port=int(kbd_port), fb_port=int(fb_port))
        self._attach(u, st, fb_page, width, height)

    def reconnect(self, st: DisplayBackendState) -> None:
        """After a move (S7): the same pages from the new host (the vkbd and vfb pages,
        the directory, the framebuffer), our ports already re-made there."""
        u = self.hc.managed_domain()
        self._map(u, st.dir_pfn, 1, False)
        fb_page = RawPage(self._map(u, st.fb_pfn, 1, True))
        width, height, *_ = ev.read_fb_header(fb_page)
        self._attach(u, st, fb_page, width, height)

    def _attach(self, u: int, st: DisplayBackendState, fb_page: RawPage, width: int,
                height: int) -> None:
        self._kbd = RawPage(self._map(u, st.kbd_pfn, 1, True))
        self._fb = fb_page
        fb = self._map(u, st.fb_first, st.fb_pages, False)
        self._pixels = np.frombuffer(fb, dtype=np.uint8)[: width * height * 4].reshape(
            height, width * 4)
        self.width, self.height = width, height
        for name, port in (("kbd", st.kbd_port), ("fb", st.fb_port)):
            _, fds = self.hc.call("evtchn_fds", port=port)
            self._fds[name] = (fds[0], fds[1])
        self.state = st

    # -- data path ----------------------------------------------------------------------

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        """Pixels of a rectangle, BGRX rows (the VNC core's Framebuffer protocol)."""
        assert self._pixels is not None
        return self._pixels[y:y + h, x * 4:(x + w) * 4].tobytes()

    def put_input(self, group: list[tuple[str, int, int]]) -> bool:
        """Put one input group (a key's Shift-press, press, Shift-release; or a pointer
        position) into the vkbd ring, all or none, and notify the guest. False: not
        now (quiesced, or the ring lacks room); `on_room` is called when the guest
        has consumed events, and the caller keeps the group until then."""
        if self._kbd is None or not self._reading:
            return False
        events = [ev.key_event(a, bool(b)) if kind == "key" else ev.pos_event(a, b)
                  for kind, a, b in group]
        try:
            if not ev.put(self._kbd, ev.KBD_IN, events, peer="Domain U", all_or_none=True):
                return False
        except ProtocolError as exc:  # the guest corrupted its ring: hold input, say so
            log.error("vkbd ring: %s", exc)
            return False
        os.eventfd_write(self._fds["kbd"][1], 1)
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self._reading and "fb" in self._fds:
            loop.add_reader(self._fds["fb"][0], self._on_fb)
            loop.add_reader(self._fds["kbd"][0], self._on_kbd)
            self._reading = True
        self._on_fb()
        self.on_room()  # input held while we were stopped may go in now

    def stop(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fds["fb"][0])
            self._loop.remove_reader(self._fds["kbd"][0])
        self._reading = False

    def _on_kbd(self) -> None:
        """The guest consumed keyboard events: there is room for held input."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fds["kbd"][0])
        self.on_room()

    def _on_fb(self) -> None:
        if self._fb is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fds["fb"][0])
        rects = []
        try:
            updates = ev.take(self._fb, ev.FB_OUT, peer="Domain U")
        except ProtocolError as exc:  # a broken guest must not take the event loop down
            log.error("vfb ring: %s", exc)
            return
        for raw in updates:
            upd = ev.parse_update(raw)
            if upd is not None:
                x, y, w, h = upd
                x, y = max(0, x), max(0, y)
                w, h = min(w, self.width - x), min(h, self.height - y)
                if w > 0 and h > 0:
                    rects.append((x, y, w, h))
        if rects:
            self.on_damage(rects)

    def close(self) -> None:
        self.stop()
        for a, b in self._fds.values():
            for fd in (a, b):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        self._pixels = None
        for p in (self._kbd, self._fb):
            if p is not None:
                p.release()
        self._kbd = self._fb = None
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
