"""Domain R's display for a QEMU guest: an RFB client of QEMU's own VNC server.

`UpstreamDisplay` is the asyncio adapter around the sans-I/O `UpstreamClient`
(keeper.vnc.upstream): one Unix stream socket, driven by the loop's reader/writer
callbacks with our own non-blocking recv/send (as `keeper.net.pump`), so we always
know which bytes QEMU has not read yet. It is what Domain R's VNC server needs of a
display (`keeper.vnc.server.Display`): a size, `read()` of BGRX pixels, damage and
resize callbacks, and keyboard/pointer input.

Order of use:

1. `UpstreamDisplay(path_or_socket)`, set `on_damage`, `on_resize`, `on_room`
   (and `on_close`) — plain attributes, called from the event loop.
2. `await connect(timeout)`: returns once the first full framebuffer is in (`ready`).
3. `put_input(group)` from the VNC server; `refresh()` for a full update.
4. Before the VM stops (S3): `hold()`, then `await drain(timeout)` — every input byte
   we wrote has been read by QEMU (SIOCOUTQ 0 on the socket) — or it raises. Keys
   that reach QEMU while the VM is stopped are dropped by QEMU, so input stays with
   the caller from here on. `release_hold()` when the VM runs again (or on rollback).
5. `close()` (idempotent): stop watching the socket, close it, fail waiters, call
   `on_close` once.

Flow control: `put_input` takes a whole group or nothing. It refuses (returns False)
while the link is not ready, held, or more than `high_water` bytes are unread by QEMU
— counted as ours not yet sent plus SIOCOUTQ, which on a Unix socket is the kernel
memory of the queued skbs (each small write costs ~768 bytes of it), not payload
bytes; a small high-water keeps what a stop can catch in flight small. After a
refusal `on_room()` is called once input can be taken again (polled: a Unix socket
does not signal when the peer has read).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence

from keeper.errors import KeeperError, KernelError
from keeper.net.pump import SocketPump
from keeper.net.tcprepair import SIOCOUTQ
from keeper.vnc import upstream
from keeper.vnc.upstream import UpstreamClient, UpstreamError

log = logging.getLogger("keeper.vnc.upstream")

HIGH_WATER = 8192  # bytes (kernel skb memory included) unread by QEMU before we refuse
RECV_SIZE = 1 << 20  # a full 720x400 Raw frame is 1.1 MiB: few reads per frame
SEND_SIZE = 1 << 20
POLL_INTERVAL = 0.002  # SIOCOUTQ polling while someone waits for room or a drain

_INT = struct.Struct("=i")
_HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)

InputItem = tuple[str, int, int]


class UpstreamClosed(KeeperError):
    """The link to QEMU's VNC server is down (or never came up)."""


class UpstreamTimeout(KeeperError, TimeoutError):
    """A wait on QEMU's VNC server (connect, drain) ran out of time."""


def unread_by_peer(sock: socket.socket) -> int:
    """SIOCOUTQ: what the peer has not read yet (for AF_UNIX: kernel memory, 0 = none)."""
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    except OSError as exc:
        raise KernelError.wrap("SIOCOUTQ", exc) from exc


class UpstreamDisplay(SocketPump):
    """A QEMU VNC server seen as a display. `target`: the server's Unix socket path, or
    an already connected stream socket (the host agent may hand over a connected fd).
    """

    def __init__(self, target: str | os.PathLike[str] | socket.socket, *,
                 high_water: int = HIGH_WATER) -> None:
        if isinstance(target, socket.socket):
            self._path: str | None = None
            self.sock = target
        else:
            self._path = os.fspath(target)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.high_water = high_water
        self.core = UpstreamClient()
        self.out = b""  # produced, not yet taken by the kernel
        self.on_damage: Callable[[list[tuple[int, int, int, int]]], None] | None = None
        self.on_resize: Callable[[int, int], None] | None = None
        self.on_room: Callable[[], None] | None = None
        self.on_close: Callable[[str], None] | None = None
        self.ready = asyncio.Event()  # set with the first full framebuffer
        self.close_reason = ""
        self.error: BaseException | None = None  # what closed the link, if it failed
        self.bytes_in = 0
        self._started = False
        self._closed = False
        self._held = False
        self._want_room = False
        self._poll: asyncio.TimerHandle | None = None
        self._ready_waiter: asyncio.Future[None] | None = None
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)

    # -- what the VNC server reads ---------------------------------------------------------

    @property
    def width(self) -> int:
        return self.core.width

    @property
    def height(self) -> int:
        return self.core.height

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        """w x h BGRX pixels from (x, y), rows top to bottom."""
        return self.core.read(x, y, w, h)

    @property
    def connected(self) -> bool:
        """The RFB session with QEMU is up (ServerInit received) and not closed."""
        return not self._closed and self._started and self.core.session_up

    @property
    def held(self) -> bool:
        return self._held

    @property
    def updates(self) -> int:
        return self.core.state.updates

    # -- connecting ------------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect (if given a path), do the RFB handshake and wait for the first full
        framebuffer. On failure or timeout the link is closed and the error raised."""
        if self._started or self._closed:
            raise UpstreamClosed("connect() called twice")
        self.loop = asyncio.get_running_loop()
        self._ready_waiter = self.loop.create_future()
        deadline = time.monotonic() + timeout
        try:
            if self._path is not None:
                async with asyncio.timeout(timeout):
                    await self.loop.sock_connect(self.sock, self._path)
            self._started = True
            self.want(read=True, write=False)
            remaining = max(deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(self._ready_waiter), remaining)
        except TimeoutError as exc:
            self.close("not ready in time")
            raise UpstreamTimeout(f"{self._where()}: not ready within {timeout} s") from exc
        except OSError as exc:
            self.close(f"connect: {exc}")
            raise UpstreamClosed(f"{self._where()}: connect: {exc}") from exc
        except BaseException:
            self.close("connect() failed")
            raise

    def _where(self) -> str:
        return f"QEMU VNC {self._path or 'socket'}"

    # -- input -----------------------------------------------------------------------------

    def put_input(self, group: Sequence[InputItem]) -> bool:
        """Queue a group of input items — ("key", linux_keycode, 1|0) or ("pos", x, y) —
        all or none. False: not now (not ready, held, or too much unread by QEMU);
        `on_room` will be called when it is worth trying again. A key QEMU has no code
        for is dropped (logged), not refused: refusing it would stall the caller."""
        for item in group:
            if len(item) != 3 or item[0] not in ("key", "pos"):
                raise ValueError(f"input item {item!r} is not ('key', code, 1|0) or "
                                 "('pos', x, y)")
        if not self._accepting():
            self._want_room = True
            self._schedule_poll()
            return False
        for kind, a, b in group:
            if kind == "key":
                if not self.core.key(a, bool(b)):
                    log.warning("key %d dropped: no XT code or keysym for it", a)
            else:
                self.core.pointer(a, b, 0)
        self.flush()
        return True

    def hold(self) -> None:
        """Refuse input from now on (before the VM stops)."""
        self._held = True

    def release_hold(self) -> None:
        """Accept input again and tell the caller (`on_room`)."""
        self._held = False
        self._want_room = False
        if self.on_room is not None:
            self.on_room()

    async def drain(self, timeout: float) -> None:
        """Wait until QEMU has read every byte we wrote: nothing left in `out`, SIOCOUTQ
        0, and the peer still there (a peer that died frees its unread queue, which
        also reads 0). Raises UpstreamTimeout, or UpstreamClosed if the link is down."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.connected:
                raise UpstreamClosed(f"{self._where()}: link down during drain "
                                     f"({self.close_reason or 'not connected'})")
            self.flush()
            if not self.out and not self.core.state.outbuf and self._unread() == 0:
                if self._peer_gone():
                    self.close("QEMU hung up")
                    raise UpstreamClosed(f"{self._where()}: QEMU hung up; unread input "
                                         "may be lost")
                return
            if time.monotonic() >= deadline:
                raise UpstreamTimeout(f"{self._where()}: {len(self.out)} bytes unsent and "
                                      f"{self._unread()} of kernel queue unread after "
                                      f"{timeout} s")
            await asyncio.sleep(POLL_INTERVAL)

    def refresh(self) -> None:
        """Ask QEMU for the whole screen (after reconnecting on a migration target)."""
        if not self.connected:
            raise UpstreamClosed(f"{self._where()}: refresh() while not connected")
        self.core.refresh()
        self.flush()

    def backlog(self) -> int:
        """What QEMU has not read: our unsent bytes plus SIOCOUTQ (see the module doc)."""
        if self.sock.fileno() < 0:
            return len(self.out)
        return len(self.out) + len(self.core.state.outbuf) + self._unread()

    # -- the pump ------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            n = self.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"recv: {exc}")
            return
        if n == 0:
            self.close("QEMU closed the VNC connection")
            return
        self.bytes_in += n
        self.on_data(self._rview[:n])

    def on_data(self, data: bytes | memoryview) -> None:
        try:
            events = self.core.receive_data(data)
        except UpstreamError as exc:
            self._handle(exc.events)
            log.warning("%s: protocol error (%s at fault): %s", self._where(), exc.fault, exc)
            self.error = exc
            self.close(f"protocol error ({exc.fault}): {exc}")
            return
        self._handle(events)
        self.flush()

    def _handle(self, events: list[upstream.Event]) -> None:
        for event in events:
            try:
                self._dispatch(event)
            except Exception:  # a callback's bug must not take the link down
                log.exception("upstream display: handling %s failed", event)

    def _dispatch(self, event: upstream.Event) -> None:
        if isinstance(event, upstream.Damage):
            if self.on_damage is not None:
                self.on_damage(list(event.rects))
        elif isinstance(event, upstream.Resized):
            if self.on_resize is not None:
                self.on_resize(event.width, event.height)
        elif isinstance(event, upstream.Ready):
            self.ready.set()
            if self._ready_waiter is not None and not self._ready_waiter.done():
                self._ready_waiter.set_result(None)
            if self._want_room:
                self._schedule_poll()
        elif isinstance(event, upstream.Connected):
            log.info("%s: %dx%d %r", self._where(), event.width, event.height, event.name)
        else:
            log.debug("%s: %s", self._where(), event)

    def flush(self) -> None:
        if self.sock.fileno() < 0 or self._closed:
            return
        self.out += self.core.data_to_send()
        while self.out:
            try:
                n = self.sock.send(memoryview(self.out)[:SEND_SIZE])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"send: {exc}")
                return
            self.out = self.out[n:]
        self.want(read=True, write=bool(self.out))

    # -- room --------------------------------------------------------------------------

    def _accepting(self) -> bool:
        return (self.connected and self.core.ready and not self._held
                and self.backlog() <= self.high_water)

    def _schedule_poll(self) -> None:
        if self._poll is None and not self._closed and self._started:
            self._poll = self.loop.call_later(POLL_INTERVAL, self._check_room)

    def _check_room(self) -> None:
        self._poll = None
        if not self._want_room or self._closed:
            return
        if self._held:
            return  # release_hold() will call on_room
        if not self._accepting():
            self._schedule_poll()
            return
        self._want_room = False
        if self.on_room is not None:
            self.on_room()

    def _unread(self) -> int:
        return unread_by_peer(self.sock) if self.sock.fileno() >= 0 else 0

    def _peer_gone(self) -> bool:
        poller = select.poll()
        poller.register(self.sock.fileno(), _HANGUP)
        return bool(poller.poll(0))

    # -- closing -----------------------------------------------------------------------

    def close(self, why: str = "closed") -> None:
        """Idempotent: stop watching the socket, close it, fail a pending connect, and
        call `on_close(why)` once."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = why
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._started:
            self.stop()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._ready_waiter is not None and not self._ready_waiter.done():
            self._ready_waiter.set_exception(self.error if self.error is not None else
                                             UpstreamClosed(f"{self._where()}: closed "
                                                            f"before ready: {why}"))
            self._ready_waiter.exception()  # retrieved: connect() may not be waiting
        log.info("%s: link closed: %s", self._where(), why)
        if self.on_close is not None:
            self.on_close(why)
