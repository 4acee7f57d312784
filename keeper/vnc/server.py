"""The VNC service of a Domain R: RFB sessions on the guest's keyboard and screen.

Each connection is a sans-I/O `RfbServer` (keeper.vnc.rfb) driven by a thin adapter
on the event loop's reader/writer callbacks, with our own send, so every byte is
either in the core's state, in `out` (ours) or in the kernel's send queue (TCP
repair): a session can be checkpointed at any instant. Several viewers may watch
and type at once (shared sessions); each gets the damage the guest announces.

A malformed message from a viewer closes that viewer's connection (with the RFB
failure reason where the protocol has one); nothing else is affected. Domain R drives
`VncHost` as a keeper.domr.services.Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from keeper import ports
from keeper.errors import NotMovable
from keeper.net import tcprepair
from keeper.net.listen import Acceptor
from keeper.net.pump import SocketPump
from keeper.net.sessions import MovableSessions
from keeper.net.tcprepair import TcpRepairRecord
from keeper.vnc import rfb
from keeper.vnc.keysyms import KEY_LEFTSHIFT, keysym_to_keys

log = logging.getLogger("keeper.vnc")


@dataclass(slots=True)
class VncSessionState:
    """A VNC session in a checkpoint, besides its TCP socket."""

    id: int
    rfb: rfb.RfbState
    out: bytes = b""  # produced, not yet taken by the kernel
    damage: list[list[int]] = field(default_factory=list)
    # input read from the viewer, not yet taken by the display: one group per key
    # (its events go in all or none) or pointer position; while any waits, we stop
    # reading the viewer's socket, so TCP flow control holds the viewer back
    pending_input: list[list[tuple[str, int, int]]] = field(default_factory=list)


@dataclass(slots=True)
class VncCheckpoint:
    session: VncSessionState
    tcp: TcpRepairRecord


@dataclass(slots=True)
class VncHostCheckpoint:
    sessions: list[VncCheckpoint] = field(default_factory=list)
    # input of viewers that left before the guest took all of it (still delivered)
    orphaned: list[list[tuple[str, int, int]]] = field(default_factory=list)


InputGroup = list[tuple[str, int, int]]  # ("key", KEY_*, 1|0) or ("pos", x, y)


class Display:
    """What VNC needs from a display (keeper.domr.display.DisplayBackend for the
    simulated guest). `put_input` takes a group all or none and says False when it
    cannot now; it then calls `on_room` (set by VncHost) when it can again."""

    width: int
    height: int
    read: Callable[[int, int, int, int], bytes]
    put_input: Callable[[InputGroup], bool]
    on_room: Callable[[], None]


class VncConn(SocketPump):
    def __init__(self, host: VncHost, sock: socket.socket, state: VncSessionState,
                 core: rfb.RfbServer) -> None:
        self.host, self.sock, self.state, self.core = host, sock, state, core
        self.loop = host.loop

    def start(self) -> None:
        self.sock.setblocking(False)
        self.push_input()
        self.want(read=not self.state.pending_input, write=bool(self.state.out))
        self.maybe_update()
        self.flush()

    def on_data(self, data: bytes) -> None:
        if not data:
            self.close("viewer closed")
            return
        try:
            events = self.core.receive_data(data)
        except rfb.RfbError as exc:
            self._handle(exc.events)  # what came before the bad message still counts
            self.state.out += self.wire(self.core.data_to_send())  # the failure reason
            self.flush()
            self.close(f"protocol error ({exc.fault}): {exc}")
            return
        self._handle(events)
        self.flush()

    def _handle(self, events: list[rfb.Event]) -> None:
        pending = self.state.pending_input
        for event in events:
            if isinstance(event, rfb.KeyEvent):
                keys = keysym_to_keys(event.keysym)
                if keys is None:
                    continue
                code, shift = keys
                if not event.down:
                    pending.append([("key", code, 0)])
                    continue
                group = [("key", code, 1)]
                if shift:  # a US keymap's Shift for this keysym, around the press only
                    group = [("key", KEY_LEFTSHIFT, 1), *group, ("key", KEY_LEFTSHIFT, 0)]
                pending.append(group)
                self.host.keys += 1
            elif isinstance(event, rfb.PointerEvent):
                pos = [("pos", event.x, event.y)]
                if pending and pending[-1][0][0] == "pos":
                    pending[-1] = pos  # absolute positions: only the latest matters
                else:
                    pending.append(pos)
            elif isinstance(event, rfb.UpdateRequested) and not event.incremental:
                self.state.damage.append([event.x, event.y, event.w, event.h])
        self.push_input()
        self.maybe_update()

    def push_input(self) -> None:
        """Hand waiting input to the display, in order, as far as it takes it."""
        if not self.host.push_orphaned():
            return  # older input of a viewer that left goes first
        pending, put = self.state.pending_input, self.host.display.put_input
        n = 0
        while n < len(pending) and put(pending[n]):
            n += 1
        del pending[:n]

    def damage(self, rects: list[tuple[int, int, int, int]]) -> None:
        self.state.damage.extend([list(r) for r in rects])
        if len(self.state.damage) > 1:  # one bounding box: a viewer that asks for no
            # update (or reads none) while the screen changes costs one rectangle
            self.state.damage = [list(_merge(self.state.damage)[0])]
        self.maybe_update()
        self.flush()

    def maybe_update(self) -> None:
        """Answer a pending update request when there is something to show."""
        if self.sock.fileno() < 0 or not self.core.wants_update() or not self.state.damage:
            return
        if len(self.state.out) > 4 << 20:
            return  # the viewer is behind: let it catch up before more frames
        rects = [rfb.Rect(*r) for r in _merge(self.state.damage)]
        self.state.damage = []
        self.core.send_update(self.host.display, rects)  # type: ignore[arg-type]
        self.host.frames += 1

    def wire(self, data: bytes) -> bytes:
        """RFB bytes as they go on this connection's wire: as they are on plain TCP (the
        web console's sessions, keeper.web.service, put them in WebSocket frames)."""
        return data

    def flush(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.state.out += self.wire(self.core.data_to_send())
        while self.state.out:
            try:
                n = self.sock.send(memoryview(self.state.out)[: 1 << 20])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"send: {exc}")
                return
            self.state.out = self.state.out[n:]
        self.want(read=not self.state.pending_input, write=bool(self.state.out))
        if not self.state.out:
            self.maybe_update()

    def close(self, why: str) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.host.conns.pop(self.state.id, None)
        # what the viewer typed before it left is the user's: it still goes in
        self.host.orphaned += self.state.pending_input
        self.state.pending_input = []
        log.info("vnc session %d closed: %s", self.state.id, why)


def _merge(rects: list[list[int]]) -> list[tuple[int, int, int, int]]:
    """Few large rectangles beat many small ones: one bounding box per update."""
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    return [(x0, y0, x1 - x0, y1 - y0)]


class VncHost(MovableSessions):
    """The VNC sessions of one Domain R and their listener. `name` is the service's;
    the desktop name viewers see is `desktop`."""

    name = "vnc"

    def __init__(self, display: Display, ip: str, desktop: str, *,
                 port: int = ports.VNC) -> None:
        self.display, self.ip, self.desktop, self.port = display, ip, desktop, port
        self.conns: dict[int, VncConn] = {}
        self.loop = asyncio.get_running_loop()
        self.acceptor = Acceptor(ip, port, self._on_accept)
        self._next_id = 1
        self._incoming: list[tuple[VncSessionState, socket.socket]] = []
        self._ready: list[tuple[VncSessionState, socket.socket, rfb.RfbServer]] = []
        self.keys = self.frames = 0
        self.orphaned: list[InputGroup] = []  # input of viewers that left, not yet taken
        self.serving = False
        self._in_repair = False  # our sessions' sockets are dumped, not yet live again
        display.on_room = self.on_room


    def start(self) -> None:
        self.acceptor.start(self.loop)
        self.serving = True
        self.on_room()  # input held across a stop or a move

    async def quiesce(self) -> list[str]:
        """No accepting, no reading or writing on any session."""
        self.serving = False
        self.acceptor.stop()
        for conn in self.conns.values():
            conn.stop()
        return []

    def on_room(self) -> None:
        """The display can take input again: sessions hand over what they hold, and
        the ones that hold nothing any more read their viewers again."""
        if not self.serving:
            return
        if not self.push_orphaned():
            return  # older than anything the sessions hold
        for conn in list(self.conns.values()):
            if conn.state.pending_input:
                conn.push_input()
                conn.flush()

    def push_orphaned(self) -> bool:
        """Hand over the input of viewers that left; True once none is left."""
        n = 0
        while n < len(self.orphaned) and self.display.put_input(self.orphaned[n]):
            n += 1
        del self.orphaned[:n]
        return not self.orphaned

    def _on_accept(self, sock: socket.socket) -> None:
        core = rfb.RfbServer(width=self.display.width, height=self.display.height,
                             name=self.desktop)
        core.connection_made()
        state = VncSessionState(id=self._next_id, rfb=core.state)
        self._next_id += 1
        conn = VncConn(self, sock, state, core)
        self.conns[state.id] = conn
        conn.start()

    def damage(self, rects: list[tuple[int, int, int, int]]) -> None:
        for conn in list(self.conns.values()):
            conn.damage(rects)

    def resize(self, width: int, height: int) -> None:
        """The guest's screen changed size (a QEMU guest switching video modes): every
        viewer is told (DesktopSize) and gets the whole new screen; one that cannot
        follow is closed, and gets the new size when it reconnects."""
        for conn in list(self.conns.values()):
            try:
                conn.core.resize(width, height)
            except rfb.RfbError as exc:
                conn.close(f"cannot follow the resize to {width}x{height}: {exc}")
        self.damage([(0, 0, width, height)])

    # -- moving ---------------------------------------------------------------------------

    def checkpoint(self, left_behind: list[str]) -> VncHostCheckpoint:
        self._in_repair = True  # also if a dump fails midway: rollback takes them out
        out = []
        for cid, conn in list(self.conns.items()):
            try:
                rec = tcprepair.dump(conn.sock)
            except NotMovable as exc:  # e.g. the viewer's FIN came in: it ends here
                left_behind.append(f"vnc {cid}: {exc}")
                continue
            conn.state.out += conn.core.data_to_send()
            conn.state.rfb = conn.core.state
            out.append(VncCheckpoint(session=conn.state, tcp=rec))
        return VncHostCheckpoint(sessions=out, orphaned=list(self.orphaned))



    def restore(self, ckpt: VncHostCheckpoint) -> None:
        """Re-create the sockets (repair mode, link down); serve them at `resume`."""
        restored: list[tuple[VncSessionState, socket.socket]] = []
        try:
            for item in ckpt.sessions:
                r = tcprepair.restore(item.tcp)
                item.session.out = r.resend + item.session.out
                restored.append((item.session, r.sock))
        except BaseException:
            for _, sock in restored:
                tcprepair.release(sock)
            raise
        self._incoming += restored
        self.orphaned = ckpt.orphaned + self.orphaned
        for state, _ in restored:
            self._next_id = max(self._next_id, state.id + 1)

    async def prepare_resume(self) -> None:
        """Rebuild each session's protocol core while its socket is still silent: a
        state that cannot be served fails the resume before anything left repair."""
        incoming, self._incoming = self._incoming, []
        self._ready += [(state, sock, rfb.RfbServer(width=0, height=0, name=self.desktop,
                                                    state=state.rfb))
                        for state, sock in incoming]

    async def resume(self) -> None:
        ready, self._ready = self._ready, []
        for state, sock, core in ready:
            if tcprepair.go_live(sock, f"vnc {state.id}"):
                self.conns[state.id] = VncConn(self, sock, state, core)
        for conn in self.conns.values():
            conn.start()

    def status(self) -> list[dict[str, object]]:
        return [{"id": c.state.id, "phase": c.core.phase.value, "out": len(c.state.out),
                 "pending_input": len(c.state.pending_input)} for c in self.conns.values()]

    async def close(self) -> None:
        """Idempotent: stop accepting, close the sessions (dumped ones stay silent: a
        socket in repair mode closes without FIN or RST)."""
        self.serving = False
        self.acceptor.close()
        for sock in self._unserved():
            tcprepair.release(sock)  # restored, never resumed: still in repair
        for conn in list(self.conns.values()):
            conn.close("Domain R shutting down")
