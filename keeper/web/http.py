"""The HTTP/1.1 side of the web console, sans-I/O: one request per connection, then
either a response and the end of the connection, or the WebSocket opening handshake
(RFC 6455 §4.2).

There is no parser state between calls: a connection's whole HTTP state is the bytes
it has received so far (at most `MAX_HEAD`), and `parse_request` reads them afresh with
h11 each time. A connection can be checkpointed mid-request as those bytes, and after
its response as the bytes not yet sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import h11

from keeper.errors import ProtocolError

MAX_HEAD = 16384
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOLS = ("binary",)  # noVNC's, when it asks for one
SERVER = "keeper"

REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class HttpError(ProtocolError):
    """A request we answer with an error status (and then close)."""

    def __init__(self, status: int, reason: str, *, headers: tuple[tuple[str, str], ...] = ()
                 ) -> None:
        super().__init__(reason, fault="client")
        self.status, self.reason, self.headers = status, reason, headers


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    rest: bytes  # what came after the head (an upgrade's first WebSocket bytes)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def tokens(self, name: str) -> list[str]:
        """A comma-separated header as lower-case tokens."""
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]

    @property
    def wants_websocket(self) -> bool:
        return "websocket" in self.tokens("upgrade")


def parse_request(buf: bytes) -> Request | None:
    """The request whose head `buf` starts with, or None while the head is incomplete.
    A malformed or oversized head is an HttpError (400, 431)."""
    if not buf:
        return None
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        conn.receive_data(buf)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpError(exc.error_status_hint, f"bad request: {exc}") from exc
    if event is h11.NEED_DATA:
        return None
    if not isinstance(event, h11.Request):
        raise HttpError(400, f"bad request: {event!r}")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    rest = b""
    if "websocket" in headers.get("upgrade", "").lower():
        rest = conn.trailing_data[0]
    return Request(method=event.method.decode("ascii", "replace"),
                   target=event.target.decode("latin-1"), headers=headers, rest=rest)


def response(status: int, body: bytes = b"", *, content_type: str = "text/plain; charset=utf-8",
             headers: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> bytes:
    """A whole response that ends the connection (Connection: close)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Server: {SERVER}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Cache-Control: no-cache", "X-Content-Type-Options: nosniff",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def error_response(exc: HttpError) -> bytes:
    return response(exc.status, f"{exc.status} {exc.reason}\n".encode(), headers=exc.headers)


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def websocket_handshake(req: Request) -> tuple[bytes, str | None]:
    """Check an opening handshake (RFC 6455 §4.2.1) and return the 101 response and the
    subprotocol chosen. Raises HttpError: 400 for a malformed one, 426 for another
    version, 403 for a page of another origin (a browser always says where the page
    that opens the socket came from: only ours may drive the console)."""
    if req.method != "GET":
        raise HttpError(405, "a WebSocket handshake is a GET", headers=(("Allow", "GET"),))
    if "upgrade" not in req.tokens("connection"):
        raise HttpError(400, "Connection: Upgrade missing")
    if req.headers.get("sec-websocket-version", "").strip() != "13":
        raise HttpError(426, "only WebSocket version 13 is spoken",
                        headers=(("Sec-WebSocket-Version", "13"),))
    key = req.headers.get("sec-websocket-key", "").strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HttpError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    origin = req.headers.get("origin")
    host = req.headers.get("host", "")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        raise HttpError(403, f"origin {origin} is not this console's (http://{host})")
    offered = req.tokens("sec-websocket-protocol")
    chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
    lines = ["HTTP/1.1 101 Switching Protocols", f"Server: {SERVER}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if chosen is not None:
        lines.append(f"Sec-WebSocket-Protocol: {chosen}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), chosen
