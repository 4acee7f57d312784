"""The web console service of a Domain R: noVNC over HTTP, RFB over WebSocket, on TCP
6080 of Domain R's own address.

A connection starts as HTTP/1.1 (`HttpConn`): one request, answered from
keeper.web.assets (our page, noVNC's files) with `Connection: close`, after which we
wait for the browser to close its side. A request for `/websockify` that is a valid
WebSocket handshake is answered `101` instead, and the same connection becomes a VNC
session of Domain R (`WebVncConn`): the RFB core of keeper.vnc, the same display, the
same input path and backpressure (a key's events go in together, the browser is held
back by TCP flow control while input waits) as a viewer on port 5900, with RFB carried
in WebSocket binary messages (keeper.web.ws).

Every byte is in state we own or in the kernel's queues, as for the other services:
an HTTP connection is the bytes of its request so far or of its response not yet sent;
a WebSocket session is its RFB session (keeper.vnc.server.VncSessionState: the RFB
state, framed bytes not yet sent, input not yet taken) plus its framing state. Both
move with Domain R (TCP repair). Domain R drives `WebHost` as a
keeper.domr.services.Service; the display's damage, room and resize reach it through
Domain R (`damage`, `on_room`, `resize`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

from keeper import ports
from keeper.errors import NotMovable
from keeper.net import tcprepair
from keeper.net.listen import Acceptor
from keeper.net.pump import SocketPump
from keeper.net.sessions import MovableSessions
from keeper.net.tcprepair import TcpRepairRecord
from keeper.vnc import rfb
from keeper.vnc.server import VncConn, VncHost, VncSessionState
from keeper.web import http, ws
from keeper.web.assets import WS_PATH, Assets

log = logging.getLogger("keeper.web")

HTTP_TIMEOUT = 30.0  # for a browser to send its request head
LINGER = 5.0  # after our response, for the browser to close its side
SEND_CHUNK = 1 << 20
MAX_HTTP = 128  # HTTP connections at once (not yet WebSocket): more are closed at accept


@dataclass(slots=True)
class HttpState:
    """An HTTP connection before (or instead of) a WebSocket: plain data."""

    id: int
    inbuf: bytes = b""  # the request so far (parsed afresh on every read)
    out: bytes = b""  # the response, not yet taken by the kernel
    answered: bool = False  # the response is in `out`; then we wait for the browser's FIN
    shut: bool = False  # all of it went to the kernel, and our FIN after it


@dataclass(slots=True)
class WebSessionState:
    """A browser's VNC session: its RFB session as keeper.vnc has it (`vnc.out` holds
    WebSocket frames, not bare RFB) and its WebSocket framing."""

    vnc: VncSessionState
    ws: ws.WsState = field(default_factory=ws.WsState)


@dataclass(slots=True)
class HttpCheckpoint:
    conn: HttpState
    tcp: TcpRepairRecord


@dataclass(slots=True)
class WebSessionCheckpoint:
    session: WebSessionState
    tcp: TcpRepairRecord


@dataclass(slots=True)
class WebHostCheckpoint:
    next_id: int
    http: list[HttpCheckpoint] = field(default_factory=list)
    sessions: list[WebSessionCheckpoint] = field(default_factory=list)


class HttpConn(SocketPump):
    def __init__(self, web: WebHost, sock: socket.socket, state: HttpState) -> None:
        self.web, self.sock, self.state, self.loop = web, sock, state, web.loop
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._arm(LINGER if self.state.answered else HTTP_TIMEOUT)
        if self.state.inbuf and not self.state.answered:
            self._parse()  # a request that was complete at the checkpoint
            if self.web.conns.get(self.state.id) is not self:
                return  # it was an upgrade: the session took over
        self.flush()

    def stop(self) -> None:
        super().stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self.close, "timed out")

    def on_data(self, data: bytes) -> None:
        if not data:
            self.close("browser closed")
            return
        if self.state.answered:
            return  # one request per connection: anything more is read and dropped
        self.state.inbuf += data
        self._parse()
        if self.web.conns.get(self.state.id) is self:
            self.flush()

    def _parse(self) -> None:
        st = self.state
        try:
            req = http.parse_request(st.inbuf)
            if req is None:
                if len(st.inbuf) > http.MAX_HEAD:
                    raise http.HttpError(431, "request head too large")
                return
            if req.wants_websocket:
                if req.path != WS_PATH:
                    raise http.HttpError(404, f"no WebSocket at {req.path} (it is {WS_PATH})")
                head, _ = http.websocket_handshake(req)
                self.web.upgrade(self, head, req.rest)
                return
            if req.method not in ("GET", "HEAD"):
                raise http.HttpError(405, f"{req.method} is not served",
                                     headers=(("Allow", "GET, HEAD"),))
            asset = self.web.assets.get(req.path)
            self._answer(http.response(asset.status, asset.body,
                                       content_type=asset.content_type,
                                       head_only=req.method == "HEAD"))
        except http.HttpError as exc:
            log.info("http %d: %d %s", st.id, exc.status, exc.reason)
            self._answer(http.error_response(exc))

    def _answer(self, data: bytes) -> None:
        self.state.out, self.state.answered, self.state.inbuf = data, True, b""
        self._arm(LINGER + len(data) / 1e5)  # a slow link may take a while for the body

    def flush(self) -> None:
        if self.sock.fileno() < 0:
            return
        st = self.state
        while st.out:
            try:
                n = self.sock.send(memoryview(st.out)[:SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"send: {exc}")
                return
            st.out = st.out[n:]
        if st.answered and not st.out and not st.shut:
            # our FIN: a client that reads to the end has it all; we still read until
            # the client's FIN (closing with its bytes unread would send a RST)
            st.shut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        self.want(read=True, write=bool(st.out))

    def close(self, why: str) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.web.conns.get(self.state.id) is self:
            del self.web.conns[self.state.id]
        log.debug("http %d closed: %s", self.state.id, why)


class WebVncConn(VncConn):
    """A VNC session whose RFB bytes travel in WebSocket binary messages."""

    def __init__(self, web: WebHost, sock: socket.socket, session: WebSessionState,
                 core: rfb.RfbServer) -> None:
        super().__init__(web.vnc, sock, session.vnc, core)
        self.web, self.session = web, session
        self.ws = ws.WsServer(state=session.ws)

    def on_data(self, data: bytes) -> None:
        if not data:
            self.close("browser closed the connection")
            return
        try:
            events = self.ws.receive_data(data)
        except ws.WsError as exc:
            self._rfb(exc.events)  # what came before the bad frame still counts
            if self.web.conns.get(self.state.id) is self:
                self.close(f"WebSocket error ({exc.code}): {exc}")
            return
        self._rfb(events)
        if self.web.conns.get(self.state.id) is not self:
            return  # the RFB core closed the session
        for event in events:
            if isinstance(event, ws.TextMessage):
                self.close("a text message (RFB goes in binary messages)",
                           code=ws.UNSUPPORTED_DATA)
                return
            if isinstance(event, ws.CloseReceived):
                self.close(f"browser closed the WebSocket ({event.code} {event.reason})")
                return
        self.flush()

    def _rfb(self, events: list[ws.Event]) -> None:
        data = b"".join(e.data for e in events if isinstance(e, ws.BinaryData))
        if data:
            super().on_data(data)  # RFB bytes, as a viewer on port 5900 sends them

    def wire(self, data: bytes) -> bytes:
        """RFB bytes → one binary message (with any Pong or Close queued before it).
        Once our Close went out, RFB output is dropped: the session is ending."""
        if data and self.ws.phase in (ws.Phase.OPEN,):
            self.ws.send_binary(data)
        return self.ws.data_to_send()

    def close(self, why: str, code: int = ws.POLICY) -> None:
        """End the session: a Close frame (the code says why) goes out if it can, then
        the TCP connection is closed. What the browser typed still goes in."""
        if self.sock.fileno() >= 0 and not self.web._in_repair:  # repair: leave silently
            self.ws.close(code, why[:100])
            self.state.out += self.ws.data_to_send()
            with contextlib.suppress(OSError):
                self.sock.send(self.state.out[:SEND_CHUNK])
        self.stop()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.web.conns.get(self.state.id) is self:
            del self.web.conns[self.state.id]
        self.host.orphaned += self.state.pending_input
        self.state.pending_input = []
        log.info("web session %d closed: %s", self.state.id, why)

    def checkpoint_state(self) -> WebSessionState:
        self.state.out += self.wire(self.core.data_to_send())
        self.state.rfb = self.core.state
        self.session.ws = self.ws.state
        return self.session


Conn = HttpConn | WebVncConn


class WebHost(MovableSessions):
    """The web console of one Domain R: its listener, HTTP connections and browser
    sessions, on the VNC service's display (`vnc`)."""

    name = "web"

    def __init__(self, vnc: VncHost, ip: str, title: str, *, port: int = ports.WEB,
                 assets: Assets | None = None) -> None:
        self.vnc, self.ip, self.port = vnc, ip, port
        self.assets = assets if assets is not None else Assets(title)
        self.loop = asyncio.get_running_loop()
        self.conns: dict[int, Conn] = {}
        self.acceptor = Acceptor(ip, port, self._on_accept)
        self.next_id = 1
        self.max_http = MAX_HTTP
        self.serving = False
        self._in_repair = False
        self._incoming: list[tuple[HttpState | WebSessionState, socket.socket]] = []
        self._ready: list[tuple[HttpState | WebSessionState, socket.socket,
                                rfb.RfbServer | None]] = []
        if not self.assets.installed:
            log.warning("noVNC not found at %s: the page answers 503, the WebSocket works",
                        self.assets.root)

    # -- serving ------------------------------------------------------------------------

    def start(self) -> None:
        self.acceptor.start(self.loop)
        self.serving = True
        self.on_room()

    def _on_accept(self, sock: socket.socket) -> None:
        if sum(isinstance(c, HttpConn) for c in self.conns.values()) >= self.max_http:
            log.warning("%d HTTP connections already: one more closed", self.max_http)
            sock.close()  # a browser retries; memory stays bounded
            return
        state = HttpState(id=self.next_id)
        self.next_id += 1
        conn = HttpConn(self, sock, state)
        self.conns[state.id] = conn
        if self.serving:  # accepted at a checkpoint: it waits to be dumped
            conn.start()

    def upgrade(self, conn: HttpConn, head: bytes, rest: bytes) -> None:
        """The handshake was good: the connection becomes a VNC session (the 101 goes
        out first, unframed; then the RFB greeting, framed)."""
        conn.stop()
        display = self.vnc.display
        core = rfb.RfbServer(width=display.width, height=display.height, name=self.vnc.desktop)
        core.connection_made()
        session = WebSessionState(vnc=VncSessionState(id=conn.state.id, rfb=core.state,
                                                      out=head))
        web = WebVncConn(self, conn.sock, session, core)
        self.conns[conn.state.id] = web
        log.info("web session %d: WebSocket open", conn.state.id)
        web.start()
        if rest:
            web.on_data(rest)

    # -- the display's side (through Domain R) ----------------------------------------------

    def sessions(self) -> list[WebVncConn]:
        return [c for c in self.conns.values() if isinstance(c, WebVncConn)]

    def damage(self, rects: list[tuple[int, int, int, int]]) -> None:
        for conn in self.sessions():
            conn.damage(rects)

    def on_room(self) -> None:
        """The display takes input again: after the input of viewers that left (the VNC
        service's), sessions hand over what they hold."""
        if not self.serving or not self.vnc.push_orphaned():
            return
        for conn in self.sessions():
            if conn.state.pending_input:
                conn.push_input()
                conn.flush()

    def resize(self, width: int, height: int) -> None:
        for conn in self.sessions():
            try:
                conn.core.resize(width, height)
            except rfb.RfbError as exc:
                conn.close(f"cannot follow the resize to {width}x{height}: {exc}")
        self.damage([(0, 0, width, height)])

    # -- moving ---------------------------------------------------------------------------

    async def quiesce(self) -> list[str]:
        self.serving = False
        self.acceptor.stop()
        for conn in self.conns.values():
            conn.stop()
        return []

    def checkpoint(self, left_behind: list[str]) -> WebHostCheckpoint:
        """Connections already in the backlog are accepted first (closing the listener
        would reset them); a connection the browser half-closed stays (left behind)."""
        self.acceptor.accept_pending()
        self._in_repair = True
        out = WebHostCheckpoint(next_id=self.next_id)
        for cid, conn in list(self.conns.items()):
            state = conn.checkpoint_state() if isinstance(conn, WebVncConn) else conn.state
            try:
                rec = tcprepair.dump(conn.sock)
            except NotMovable as exc:
                if isinstance(conn, HttpConn) and conn.state.shut:
                    log.info("http %d: answered and closing, ends here: %s", cid, exc)
                else:
                    left_behind.append(f"web {cid}: {exc}")
                continue
            if isinstance(state, WebSessionState):
                out.sessions.append(WebSessionCheckpoint(session=state, tcp=rec))
            else:
                out.http.append(HttpCheckpoint(conn=state, tcp=rec))
        return out

    def restore(self, ckpt: WebHostCheckpoint) -> None:
        restored: list[tuple[HttpState | WebSessionState, socket.socket]] = []
        try:
            for item in [*ckpt.http, *ckpt.sessions]:
                r = tcprepair.restore(item.tcp)
                state = item.conn if isinstance(item, HttpCheckpoint) else item.session
                if isinstance(state, HttpState):
                    state.out = r.resend + state.out
                else:
                    state.vnc.out = r.resend + state.vnc.out
                restored.append((state, r.sock))
        except BaseException:
            for _, sock in restored:
                tcprepair.release(sock)
            raise
        self._incoming += restored
        self.next_id = max(self.next_id, ckpt.next_id)

    async def prepare_resume(self) -> None:
        """Rebuild each session's RFB core while its socket is still silent: a state
        that cannot be served fails the resume before anything left repair."""
        incoming, self._incoming = self._incoming, []
        for state, sock in incoming:
            core = None if isinstance(state, HttpState) else rfb.RfbServer(
                width=0, height=0, name=self.vnc.desktop, state=state.vnc.rfb)
            self._ready.append((state, sock, core))

    async def resume(self) -> None:
        ready, self._ready = self._ready, []
        for state, sock, core in ready:
            if not tcprepair.go_live(sock, "web connection"):
                continue
            if isinstance(state, HttpState):
                self.conns[state.id] = HttpConn(self, sock, state)
            else:
                assert core is not None
                self.conns[state.vnc.id] = WebVncConn(self, sock, state, core)
        for conn in list(self.conns.values()):
            conn.start()

    # -- reporting and shutdown -------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for cid, conn in sorted(self.conns.items()):
            if isinstance(conn, WebVncConn):
                st = conn.ws.state
                out.append({"id": cid, "kind": "websocket", "phase": conn.core.phase.value,
                            "ws": st.phase.value, "frames_in": st.frames_in,
                            "frames_out": st.frames_out, "out": len(conn.state.out),
                            "pending_input": len(conn.state.pending_input)})
            else:
                out.append({"id": cid, "kind": "http", "answered": conn.state.answered,
                            "out": len(conn.state.out)})
        return out

    async def close(self) -> None:
        """Idempotent: stop accepting, close every connection (sessions with a Close
        frame, 1001 going away; dumped ones silently)."""
        self.serving = False
        self.acceptor.close()
        for sock in self._unserved():
            tcprepair.release(sock)
        for conn in list(self.conns.values()):
            if isinstance(conn, WebVncConn):
                conn.close("Domain R shutting down", code=ws.GOING_AWAY)
            else:
                conn.close("Domain R shutting down")
