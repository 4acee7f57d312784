"""Domain R's display for a QEMU guest: the screen and keyboard of QEMU's own VNC
server, reached as an RFB client (keeper.vnc.upstream_link), re-served to viewers by
Domain R's checkpointable RFB server (keeper.vnc.server). The viewers' sessions are
Domain R's; the upstream link is made anew on each host.

It gives VncHost what keeper.domr.display.DisplayBackend gives it for a simulated
guest (width, height, read, put_input, on_room, on_damage), and Domain R the same
lifecycle (start, stop, reconnect, close), plus `hold`/`drain` for the migration:
input held here, and QEMU has read everything sent before (keys that reach QEMU
while the VM is stopped are dropped by QEMU).

While Domain R is stopped (quiesced, or restored and not yet resumed) nothing goes
to the viewers: the upstream's damage is remembered and served, as one full screen,
when Domain R serves again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keeper.errors import KeeperError
from keeper.qemu.devices import DeviceClient
from keeper.vnc.upstream_link import UpstreamDisplay

log = logging.getLogger("keeper.qemu.display")
Rect = tuple[int, int, int, int]
CONNECT_TIMEOUT = 20.0
# QEMU's PS/2 keyboard queues 16 bytes and drops what does not fit, and QEMU's VNC
# server passes keys on as fast as they come: a burst (held keys let go after a
# migration, a paste) would overflow it. So key events go to QEMU at most one per
# KEY_PACE — 100 per second, a fast typist's rate several times over.
KEY_PACE = 0.005


@dataclass(slots=True)
class QemuDisplayState:
    """What the display carries in a checkpoint: which guest's screen it shows."""

    guest: str


class QemuDisplay:
    def __init__(self, devices: DeviceClient) -> None:
        self.devices = devices
        self.state: QemuDisplayState | None = None
        self.up: UpstreamDisplay | None = None
        self.serving = False
        self.held = False
        self._dirty = False
        self._next_ok = 0.0
        self._pace_timer: asyncio.TimerHandle | None = None
        self.on_damage: Callable[[list[Rect]], None] = lambda rects: None
        self.on_resize: Callable[[int, int], None] = lambda w, h: None
        self.on_room: Callable[[], None] = lambda: None

    # -- set-up -------------------------------------------------------------------------

    async def connect(self) -> None:
        guest = self.devices.guest()
        if guest is None:
            raise KeeperError("this Domain R serves no guest yet")
        await self.reconnect(QemuDisplayState(guest=guest))

    async def reconnect(self, state: QemuDisplayState) -> None:
        """A link to `state.guest`'s VNC server on this host; returns with the first
        full screen in."""
        sock = self.devices.open("vnc", state.guest)
        up = UpstreamDisplay(sock)
        up.on_damage = self._damage
        up.on_resize = self._resize
        up.on_room = self._room
        up.on_close = lambda why: log.warning("QEMU's VNC link closed: %s", why)
        await up.connect(CONNECT_TIMEOUT)
        if self.held:
            up.hold()
        if self.up is not None:
            self.up.close("replaced")
        self.up, self.state = up, state

    # -- what VncHost reads -------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.up.width if self.up is not None else 0

    @property
    def height(self) -> int:
        return self.up.height if self.up is not None else 0

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        assert self.up is not None
        return self.up.read(x, y, w, h)

    def put_input(self, group: Sequence[tuple[str, int, int]]) -> bool:
        if not self.serving or self.held or self.up is None:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._next_ok:  # paced: see KEY_PACE
            if self._pace_timer is None:
                self._pace_timer = loop.call_at(self._next_ok, self._paced)
            return False
        if not self.up.put_input(group):
            return False
        keys = sum(1 for kind, _, _ in group if kind == "key")
        self._next_ok = now + KEY_PACE * keys
        return True

    def _paced(self) -> None:
        self._pace_timer = None
        self._room()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.serving = True
        if self._dirty:  # what changed while we were stopped, as one full screen
            self._dirty = False
            self.on_resize(self.width, self.height)
        self._room()

    def stop(self) -> None:
        self.serving = False
        if self._pace_timer is not None:
            self._pace_timer.cancel()
            self._pace_timer = None

    def hold(self, on: bool) -> None:
        self.held = on
        if self.up is None:
            return
        if on:
            self.up.hold()
        else:
            self.up.release_hold()

    async def drain(self, timeout: float) -> None:
        if self.up is not None:
            await self.up.drain(timeout)

    def refresh(self) -> None:
        if self.up is not None:
            self.up.refresh()

    def close(self) -> None:
        self.serving = False
        if self.up is not None:
            self.up.close("Domain R closing")
            self.up = None

    # -- from the upstream ----------------------------------------------------------

    def _damage(self, rects: list[Rect]) -> None:
        if self.serving:
            self.on_damage(rects)
        else:
            self._dirty = True

    def _resize(self, width: int, height: int) -> None:
        if self.serving:
            self.on_resize(width, height)
        else:
            self._dirty = True  # VncHost learns the size at start (full damage)

    def _room(self) -> None:
        if self.serving and not self.held:
            self.on_room()
