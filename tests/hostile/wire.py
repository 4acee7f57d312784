"""Raw HTTP/1.1 for hostile requests: whatever bytes we like, to a Unix socket (the
agents' and Domain R's control APIs) or over mutual TLS from a host's namespace (the
agents' peer API). One connection per request; the answer's status and body."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from keeper.hostd import tls
from keeper.lab.topology import AGENT_PORT, LabSpec
from keeper.net import netns

TIMEOUT = 20.0


def head(method: str, path: str, body: bytes, content_type: str | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: keeper", "Connection: close",
             f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> tuple[int, bytes]:
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), TIMEOUT)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"no HTTP answer: {answer[:200]!r}")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(parts[1]), payload


async def unix(path: Path, method: str, url: str, body: bytes = b"",
               content_type: str | None = "application/json") -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), TIMEOUT)
    return await exchange(reader, writer, head(method, url, body, content_type) + body)


def peer_context(spec: LabSpec, as_host: str) -> ssl.SSLContext:
    return tls.client_context(spec.pki, as_host)


async def peer(spec: LabSpec, from_host: str, to_host: str, method: str, url: str,
               body: bytes = b"", content_type: str | None = "application/json",
               ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """A request to `to_host`'s peer API as `from_host` (its certificate, its namespace)."""
    src, dst = spec.host(from_host), spec.host(to_host)
    with netns.entered(src.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dst.mgmt_ip, AGENT_PORT)), TIMEOUT)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=ctx or peer_context(spec, from_host), server_hostname=dst.mgmt_ip),
        TIMEOUT)
    return await exchange(reader, writer, head(method, url, body, content_type) + body)
