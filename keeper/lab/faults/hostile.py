"""Drills of hostile and malformed input at every entry point: while an honest
session types through the guest's Domain R, a hostile client or peer does its worst
at one entry; afterwards that hostile one has had a clear error, the honest session
has lost nothing, and the guest is served as before.

  api/requests           the agents' control API, their peer API (mutual TLS) and
                         Domain R's control API: malformed JSON, wrong types,
                         missing fields, hostile names, huge and deeply nested
                         bodies -> a 4xx with the reason each, never a 500
  checkpoint/*           a peer with the lab's credentials hands the target a
                         truncated, oversized or forged checkpoint for the guest's
                         Domain R -> refused before anything is restored, with the
                         reason; the half-made twin is cancelled and a real
                         migration to that target then goes through
  checkpoint/in-migration-*  a real co-migration whose checkpoint arrives truncated
                         or forged (the target's drill `checkpoint`) -> refused, the
                         migration rolls back, every session goes on at the source
  rfb/cut-text-4gb       a viewer announces a 4 GB ClientCutText -> it is closed with
                         the reason; Domain R's memory does not move
  rfb/never-reads        a viewer keeps asking for full frames and reads none while
                         the screen changes -> Domain R's memory stays bounded
  ssh/never-reads        an SSH client stops reading its channel while the guest
                         prints -> it is disconnected with the reason after
                         keeper.ssh.policy.STALL_SECONDS; the others' output flows on
  ssh/channel-flood      one connection opens 50 session channels -> 10 granted, the
                         rest refused ("resource shortage")
  ssh/startup-flood      60 connections that never authenticate -> those over the
                         limits are refused before any key exchange

`run_case(spec, name)` runs one in an existing lab (the tests' fixture); `CASES` are
drills that build a lab of their own each (bench/faults.py). The raw HTTP helpers
(`unix`, `peer`) send whatever bytes a test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from keeper.errors import KeeperError
from keeper.lab import ops
from keeper.lab.faults import Drill, Row, in_lab
from keeper.lab.topology import AGENT_PORT, LabSpec
from keeper.lab.typist import SocketLink, Typist, TypistStats, compare
from keeper.net import netns

GUEST = "guest1"
PROMPT = b"guest1:~$ "
HOME, OTHER = "a", "b"
TIMEOUT = 20.0
MIB = 1 << 20

# -- raw HTTP: any bytes to the control APIs (Unix) and the peer API (mutual TLS) ------


def _head(method: str, path: str, body: bytes, content_type: str | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: keeper", "Connection: close",
             f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
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
    """One request on a control API's Unix socket; (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), TIMEOUT)
    return await _exchange(reader, writer, _head(method, url, body, content_type) + body)


async def peer(spec: LabSpec, from_host: str, to_host: str, method: str, url: str,
               body: bytes = b"", content_type: str | None = "application/json",
               ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One request to `to_host`'s peer API as `from_host` (its namespace, its lab
    certificate): what a compromised or broken agent could send."""
    from keeper.hostd import tls

    src, dst = spec.host(from_host), spec.host(to_host)
    with netns.entered(src.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
            sock, (dst.mgmt_ip, AGENT_PORT)), TIMEOUT)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            sock=sock, ssl=ctx or tls.client_context(spec.pki, from_host),
            server_hostname=dst.mgmt_ip), TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return await _exchange(reader, writer, _head(method, url, body, content_type) + body)


def quoted(template: str, name: str) -> str:
    return template.replace("{name}", urllib.parse.quote(name, safe=""))


def answered_well(status: int, payload: bytes) -> bool:
    """A success, or a 4xx that says why; never a 5xx."""
    if status >= 500:
        return False
    if status < 400:
        return True
    if payload.startswith(b"{"):
        try:
            return isinstance(json.loads(payload).get("error"), str)
        except ValueError:
            return False
    return bool(payload.strip())


# -- the honest sessions --------------------------------------------------------------


async def _domr_pid(spec: LabSpec, host: str = HOME) -> int:
    status = await ops.call(spec, host, "GET", "/status")
    (entry,) = [d for d in status["domrs"] if d["name"] == GUEST]
    return int(entry["pid"])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeeperError(f"no VmRSS for {pid}")


class Honest:
    """One honest session typing while the hostile thing happens: over the raw
    console, VNC (our RFB client) or SSH (OpenSSH on a pty)."""

    def __init__(self, spec: LabSpec, kind: str) -> None:
        self.spec, self.kind = spec, kind
        self.stop = asyncio.Event()
        self.task: asyncio.Task[TypistStats] | None = None
        self.typist: Any = None
        self.link: Any = None
        self.before = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, ip: str) -> None:
        self.before = (await ops.journal(self.spec, GUEST))["count"]
        if self.kind == "self":  # the case's own honest session types (what it returns)
            return
        if self.kind == "vnc":
            from keeper.lab.vncclient import VncTypist

            self.typist = await VncTypist.connect(self.spec.client_ns, (ip, 5900), period=0.03)
        elif self.kind == "ssh":
            from keeper.lab.sshclient import SshLink

            self._tmp = tempfile.TemporaryDirectory(prefix="keeper-hostile-")
            work = Path(self._tmp.name)
            self.link = await SshLink.start(self.spec.client_ns, ip,
                                            key=self.spec.ssh_dir / "id_ed25519",
                                            known_hosts=work / "known_hosts", workdir=work)
            await self.link.wait_connected()
            await asyncio.sleep(1.0)  # the login settles before the first key
            self.typist = Typist(self.link, PROMPT, period=0.03)
        else:
            self.typist = await Typist.over_tcp(self.spec.client_ns, (ip, 2323), PROMPT,
                                                period=0.03)
        self.task = asyncio.create_task(self.typist.run(self.stop))
        await asyncio.sleep(0.5)

    async def finish(self, typed: bytes = b"") -> dict[str, Any]:
        self.stop.set()
        stats = await self.task if self.task is not None else TypistStats(
            sent=bytearray(typed))
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.finish()
            self.link.close()
        elif self.typist is not None:
            self.typist.close()
        if self._tmp is not None:
            self._tmp.cleanup()
        journal = (await ops.journal(self.spec, GUEST))["journal"][self.before:]
        verdict = compare(bytes(stats.sent), journal)
        return {**verdict, "sent": len(stats.sent), "errors": stats.errors[:3]}


# -- the hostile ones -------------------------------------------------------------------

Result = dict[str, Any]  # what the hostile side saw; "ok": it got its clear error


async def _rfb_handshake(spec: LabSpec, ip: str) -> tuple[SocketLink, int, int]:
    link = await SocketLink.connect(spec.client_ns, (ip, 5900))
    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(link.sock, n - len(buf)), TIMEOUT)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            buf += chunk
        return buf

    await exactly(12)
    await link.send(b"RFB 003.008\n")
    (n,) = await exactly(1)
    await exactly(n)
    await link.send(b"\x01")
    await exactly(4)
    await link.send(b"\x01")  # shared
    width, height = struct.unpack(">HH", await exactly(4))
    await exactly(16)
    (name_len,) = struct.unpack(">I", await exactly(4))
    await exactly(name_len)
    return link, width, height


async def _closed_within(link: SocketLink, seconds: float) -> bytes | None:
    """Read until the server closes (returns what it said last), None if it did not."""
    loop = asyncio.get_running_loop()
    said = b""
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(link.sock, 65536),
                                           deadline - loop.time())
        except (TimeoutError, ConnectionError):
            return said if loop.time() < deadline else None
        if not chunk:
            return said
        said = (said + chunk)[-4096:]
    return None


async def rfb_cut_text_4gb(spec: LabSpec, ip: str) -> Result:
    pid = await _domr_pid(spec)
    rss0 = rss_mib(pid)
    link, _, _ = await _rfb_handshake(spec, ip)
    try:
        # ClientCutText: type 6, 3 padding bytes, length 0xFFFFFFFF, then the "text"
        await link.send(struct.pack(">B3xI", 6, 0xFFFFFFFF))
        sent = 0
        with contextlib.suppress(OSError):
            for _ in range(64):  # try to stream 4 MiB of it; the server should be gone
                await asyncio.wait_for(link.send(b"x" * 65536), 2.0)
                sent += 65536
        said = await _closed_within(link, 10.0)
    finally:
        link.close()
    rss1 = rss_mib(pid)
    return {"ok": said is not None, "closed": said is not None, "bytes_sent": sent,
            "rss_mib": [round(rss0, 1), round(rss1, 1)], "rss_growth_mib": round(rss1 - rss0, 1),
            "bounded": rss1 - rss0 < 16}


async def rfb_never_reads(spec: LabSpec, ip: str, seconds: float = 8.0) -> Result:
    """Full-frame requests every 5 ms in Raw at 32 bpp, never a byte read, while the
    honest viewer's typing changes the screen."""
    pid = await _domr_pid(spec)
    rss0 = rss_mib(pid)
    link, width, height = await _rfb_handshake(spec, ip)
    peak = rss0
    out_max = 0
    try:
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await link.send(struct.pack(">B3x", 0) + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1,
                                                             255, 255, 255, 16, 8, 0))
        await link.send(struct.pack(">BxHi", 2, 1, 0))  # Raw only
        request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)  # non-incremental
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                await asyncio.wait_for(link.send(request * 8), 0.5)
            await asyncio.sleep(0.04)
            peak = max(peak, rss_mib(pid))
        status = await ops.call(spec, HOME, "GET", "/status")
        (entry,) = [d for d in status["domrs"] if d["name"] == GUEST]
        out_max = max((s["out"] for s in entry["domr"]["vnc_sessions"]), default=0)
    finally:
        link.close()
    frame_mib = width * height * 4 / MIB
    bounded = peak - rss0 < 4 + 3 * frame_mib + 32  # the 4 MiB backlog, a frame or two
    return {"ok": bounded, "bounded": bounded, "rss_mib": [round(rss0, 1), round(peak, 1)],
            "rss_growth_mib": round(peak - rss0, 1), "queued_mib": round(out_max / MIB, 2),
            "frame_mib": round(frame_mib, 2)}


async def _ssh_client(spec: LabSpec, ip: str) -> tuple[Any, list[BaseException | None]]:
    """An asyncssh client logged in with the lab's key; the list gets how the
    connection ended (the server's DisconnectError, with its reason)."""
    import asyncssh

    ended: list[BaseException | None] = []

    class Watch(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            ended.append(exc)  # None for a disconnect "by application": see _Said

    link = await SocketLink.connect(spec.client_ns, (ip, 22))
    conn = await asyncio.wait_for(asyncssh.connect(
        sock=link.sock, username="admin", client_keys=[str(spec.ssh_dir / "id_ed25519")],
        known_hosts=None, config=None, client_factory=Watch), TIMEOUT)
    return conn, ended


class _Said(logging.Handler):
    """What asyncssh logs of a server's DISCONNECT: a disconnect "by application"
    reaches the client's code as a clean close, its reason only in the log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.log = logging.getLogger("asyncssh")
        self.level_was = self.log.level
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Received disconnect" in message:
            self.lines.append(message)

    def text(self) -> str:
        return "; ".join(self.lines)

    def close(self) -> None:
        self.log.removeHandler(self)
        self.log.setLevel(self.level_was)
        super().close()


async def ssh_never_reads(spec: LabSpec, ip: str) -> Result:
    """A client with a 1 KiB window that stops reading; the guest prints 40,000 lines
    (seq, asked on the raw console: that honest session must get every one of them,
    then its next command's answer)."""
    import asyncssh

    from keeper.ssh import policy

    said = _Said()
    conn, ended = await _ssh_client(spec, ip)
    chan, _ = await conn.create_session(asyncssh.SSHClientSession, term_type="xterm",
                                        window=1024, encoding=None)
    chan.pause_reading()
    reader = await SocketLink.connect(spec.client_ns, (ip, 2323))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = b""
    end = b"\r\n39999\r\n40000\r\n" + PROMPT
    typed = b"seq 1 40000\r"
    lines = 0
    try:
        await reader.send(typed)
        while not got.endswith(end):
            chunk = await asyncio.wait_for(reader.recv(), policy.STALL_SECONDS + 30)
            if not chunk:
                break
            lines += chunk.count(b"\n")
            got = (got + chunk)[-64:]
        complete = got.endswith(end) and lines >= 40001
        waited = loop.time() - t0
        await reader.send(b"echo after\r")
        typed += b"echo after\r"
        while b"after\r\n" + PROMPT not in got:
            chunk = await asyncio.wait_for(reader.recv(), 10)
            if not chunk:
                break
            got = (got + chunk)[-128:]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 5)
        closed = bool(ended)
        reason = str(ended[0]) if ended and ended[0] is not None else said.text()
    finally:
        said.close()
        reader.close()
        conn.close()
    return {"ok": complete and closed and "unread" in reason, "typed": typed,
            "honest_output_complete": complete, "honest_lines": lines,
            "hostile_disconnected": closed, "reason": reason,
            "honest_waited_s": round(waited, 1)}


async def ssh_channel_flood(spec: LabSpec, ip: str, n: int = 50) -> Result:
    import asyncssh

    conn, _ = await _ssh_client(spec, ip)
    granted, refused, reasons = 0, 0, set()
    try:
        for _ in range(n):
            try:
                await asyncio.wait_for(conn.create_session(asyncssh.SSHClientSession), 10)
                granted += 1
            except asyncssh.ChannelOpenError as exc:
                refused += 1
                reasons.add(exc.reason)
    finally:
        conn.close()
    from keeper.ssh import policy

    return {"ok": granted == policy.MAX_SESSIONS and refused == n - granted,
            "granted": granted, "refused": refused, "reasons": sorted(reasons)}


async def ssh_startup_flood(spec: LabSpec, ip: str, n: int = 60) -> Result:
    from keeper.ssh import policy

    links = []
    said: list[bytes] = []
    try:
        for _ in range(n):
            links.append(await SocketLink.connect(spec.client_ns, (ip, 22)))
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        for link in links:
            try:
                said.append(await asyncio.wait_for(loop.sock_recv(link.sock, 256), 2.0))
            except (TimeoutError, OSError):
                said.append(b"")
    finally:
        for link in links:
            link.close()
    banners = sum(1 for s in said if s.startswith(b"SSH-"))
    refused = sum(1 for s in said if b"Exceeded MaxStartups" in s)
    return {"ok": banners == policy.PER_SOURCE_STARTUPS and refused == n - banners,
            "banners": banners, "refused": refused}


async def api_requests(spec: LabSpec, ip: str) -> Result:
    """A fixed set of hostile requests to every API (the test suite fuzzes them with
    hypothesis; this is the drill's repeatable share)."""
    from keeper.migrate.peer import Paths

    deep = b"[" * 100_000
    huge = b'{"name": "' + b"x" * (2 * MIB) + b'"}'
    bodies = [b"", b"{", b"\xff\xfe", deep, huge, b"[1, 2]", b'{"name": 1}', b"NaN",
              b'{"name": "x", "ip": "198.18.0.150", "mac": "zz"}', b'{"to": 7}',
              b'{"point": "nowhere", "action": "crash"}', b'{"up": "yes"}']
    names = ["nosuch", "../../etc", "x" * 300, "g\x00"]
    local = [("POST", "/domr"), ("POST", "/guest"), ("POST", "/debug/fault"),
             ("POST", "/vmm/config")] + [
        (m, quoted(p, n)) for n in names for m, p in (
            ("POST", "/domr/{name}/migrate"), ("POST", "/domr/{name}/link"),
            ("POST", "/guest/{name}/migrate"), ("GET", "/guest/{name}/journal"))]
    peers = [("POST", Paths.prepare_domr)] + [
        ("POST", quoted(p, n)) for n in names for p in (
            Paths.incoming("{name}"), Paths.links("{name}"), Paths.restore_domr("{name}"),
            Paths.pages("{name}"))]
    calls: list[tuple[str, Callable[[], Awaitable[tuple[int, bytes]]]]] = []
    for method, url in local:
        for b in bodies:
            calls.append((f"local {method} {url} {b[:40]!r}", lambda m=method, u=url, b=b:
                          unix(spec.agent_socket(HOME), m, u, b)))
    for method, url in peers:
        for b in bodies:
            calls.append((f"peer {method} {url} {b[:40]!r}", lambda m=method, u=url, b=b:
                          peer(spec, HOME, OTHER, m, u, b)))
    for b in bodies:
        if b not in (b'{"on": true}', b'{"on": false}'):
            calls.append((f"domr POST /hold {b[:40]!r}", lambda b=b:
                          unix(spec.domr_control(GUEST, HOME), "POST", "/hold", b)))
    bad: list[str] = []
    for what, call in calls:
        status, payload = await call()
        if not answered_well(status, payload):
            bad.append(f"{what}: {status} {payload[:100]!r}")
    return {"ok": not bad, "requests": len(calls), "bad_answers": bad[:5]}


# -- forged checkpoints, from a peer with the lab's credentials ------------------------


def _forged_checkpoint(spec: LabSpec, ip: str, mac: str, how: str) -> bytes:
    from keeper.console.raw import RawSession
    from keeper.console.service import RawCheckpoint, RawConsoleCheckpoint
    from keeper.domr import checkpoint as ck
    from keeper.net.tcprepair import TcpRepairRecord

    def record(**kw: Any) -> TcpRepairRecord:
        doc: dict[str, Any] = dict(
            family=socket.AF_INET, local_addr=ip, local_port=2323, peer_addr=spec.client_ip,
            peer_port=50000, inq_seq=1000, outq_seq=2000, inq=b"", outq=b"", unsent_len=0,
            mss=1448, sack=True, wscale=True, timestamps=True, snd_wscale=7, rcv_wscale=7,
            timestamp=5, snd_wl1=999, snd_wnd=64240, max_window=64240, rcv_wnd=64240,
            rcv_wup=1000, sndbuf=46080, rcvbuf=131072, nodelay=True)
        doc.update(kw)
        return TcpRepairRecord(**doc)

    def blob(rec: TcpRepairRecord, name: str = GUEST, at: str = ip) -> bytes:
        return ck.encode(ck.DomrCheckpoint(
            name=name, ip=at, mac=mac, console=RawConsoleCheckpoint(
                next_session_id=2, sessions=[RawCheckpoint(session=RawSession(id=1), tcp=rec)])))

    if how == "truncated":
        whole = blob(record(inq=b"typed but not handled" * 100))
        return whole[: len(whole) // 2]
    if how == "oversized":  # a socket whose queue is over keeper's limit
        return blob(record(inq=b"\0" * (ck.MAX_QUEUE + 1)))
    if how == "forged-socket":  # a socket on the host's own management address
        return blob(record(local_addr=spec.host(OTHER).mgmt_ip, local_port=AGENT_PORT))
    if how == "forged-types":  # a well-formed record, a port that is a string
        return blob(record(local_port="2323; rm -rf /"))
    raise KeeperError(f"no forgery {how!r}")


async def forged_checkpoint(spec: LabSpec, ip: str, how: str) -> Result:
    """Prepare a twin of the guest's Domain R on the other host (as a source would),
    hand it the forged checkpoint, then cancel it: the target must refuse the record
    with the reason and keep nothing; afterwards a real migration there goes through."""
    from keeper.migrate.peer import Paths

    status = await ops.call(spec, HOME, "GET", "/status")
    (entry,) = [d for d in status["domrs"] if d["name"] == GUEST]
    mac = entry["mac"]
    prepare = json.dumps({"name": GUEST, "ip": ip, "mac": mac, "guest": True,
                          "kind": "sim"}).encode()
    code, payload = await peer(spec, HOME, OTHER, "POST", Paths.prepare_domr, prepare)
    if code != 200:
        return {"ok": False, "prepare": f"{code} {payload[:200]!r}"}
    try:
        body = _forged_checkpoint(spec, ip, mac, how)
        code, payload = await peer(spec, HOME, OTHER, "POST",
                                   Paths.restore_domr(GUEST) + "?epoch=1", body,
                                   "application/octet-stream")
    finally:
        await peer(spec, HOME, OTHER, "POST", Paths.cancel_domr(GUEST))
    reason = ""
    with contextlib.suppress(ValueError, AttributeError):
        reason = json.loads(payload).get("error", "")
    left = [d["name"] for d in (await ops.call(spec, OTHER, "GET", "/status"))["domrs"]]
    refused = 400 <= code < 500 and bool(reason)
    # the target is no worse for it: the guest migrates there and back
    moved = True
    for to in (OTHER, HOME):
        try:
            trace = await ops.migrate(spec, GUEST, to)
            moved = moved and bool(trace.get("trace_ok"))
        except KeeperError as exc:
            moved, reason = False, f"{reason}; then the migration failed: {exc}"
    return {"ok": refused and not left and moved, "status": code, "reason": reason[:300],
            "bytes": len(body), "target_left": left, "migrated_after": moved}


async def damaged_in_migration(spec: LabSpec, ip: str, how: str) -> Result:
    """A real co-migration whose checkpoint arrives damaged on the target (the drill
    `checkpoint` there: `truncate` or `forge`): the target refuses it, the migration
    rolls back, the pair serves on at the source; the next migration goes through."""
    await ops.call(spec, OTHER, "POST", "/debug/fault",
                   json={"point": "checkpoint", "action": how})
    reason = ""
    try:
        await ops.migrate(spec, GUEST, OTHER)
        refused = False
    except KeeperError as exc:
        refused, reason = True, str(exc)
    where_after = await ops.where(spec, GUEST)
    moved = True
    for to in (OTHER, HOME):
        try:
            moved = moved and bool((await ops.migrate(spec, GUEST, to)).get("trace_ok"))
        except KeeperError as exc:
            moved, reason = False, f"{reason}; then the migration failed: {exc}"
    why = "not a keeper checkpoint" if how == "truncate" else "is not this Domain R's"
    return {"ok": refused and why in reason and where_after == HOME and moved,
            "rolled_back_to": where_after, "reason": reason[-300:], "migrated_after": moved}


# -- the cases -------------------------------------------------------------------------

HOSTILE: dict[str, tuple[str, Callable[[LabSpec, str], Awaitable[Result]]]] = {
    "hostile/api/requests": ("console", api_requests),
    "hostile/checkpoint/truncated": (
        "console", lambda s, ip: forged_checkpoint(s, ip, "truncated")),
    "hostile/checkpoint/oversized": (
        "console", lambda s, ip: forged_checkpoint(s, ip, "oversized")),
    "hostile/checkpoint/forged-socket": (
        "console", lambda s, ip: forged_checkpoint(s, ip, "forged-socket")),
    "hostile/checkpoint/forged-types": (
        "console", lambda s, ip: forged_checkpoint(s, ip, "forged-types")),
    "hostile/checkpoint/in-migration-truncated": (
        "console", lambda s, ip: damaged_in_migration(s, ip, "truncate")),
    "hostile/checkpoint/in-migration-forged": (
        "console", lambda s, ip: damaged_in_migration(s, ip, "forge")),
    "hostile/rfb/cut-text-4gb": ("vnc", rfb_cut_text_4gb),
    "hostile/rfb/never-reads": ("vnc", rfb_never_reads),
    "hostile/ssh/never-reads": ("self", ssh_never_reads),
    "hostile/ssh/channel-flood": ("ssh", ssh_channel_flood),
    "hostile/ssh/startup-flood": ("ssh", ssh_startup_flood),
}


async def run_case(spec: LabSpec, case: str, *, mem_mb: int = 32) -> Row:
    """One drill in lab `spec`: guest1 on host a, an honest session typing, the hostile
    input, then the verdict."""
    kind, hostile = HOSTILE[case]
    doc = await ops.create_guest(spec, GUEST, HOME, mem_mb=mem_mb)
    honest = Honest(spec, kind)
    extra: dict[str, Any] = {"honest": kind}
    t0 = time.monotonic()
    result: Result = {"ok": False, "error": "the honest session did not start"}
    try:
        await honest.start(doc["ip"])
        try:
            result = await hostile(spec, doc["ip"])
        except (KeeperError, OSError, TimeoutError) as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        await asyncio.sleep(1.0)  # the honest session goes on after it
    finally:
        verdict = await honest.finish(result.pop("typed", b"") if kind == "self" else b"")
    extra.update(result)
    extra.update(seconds=round(time.monotonic() - t0, 1), sent=verdict["sent"],
                 duplicated=verdict["duplicated"], reordered=verdict["reordered"],
                 errors=verdict["errors"])
    serving = await ops.where(spec, GUEST)
    recovered = (bool(result.get("ok")) and not verdict["errors"] and verdict["sent"] > 0
                 and verdict["lost"] == verdict["duplicated"] == verdict["reordered"] == 0
                 and serving == HOME)
    return Row(case, sessions=1, lost=verdict["lost"], reconnects=0, recovered=recovered,
               extra=extra)


def _drill(case: str) -> Drill:
    async def run() -> Row:
        return await in_lab("kh", case, lambda spec: run_case(spec, case))

    return Drill(case, run)


CASES: list[Drill] = [_drill(c) for c in HOSTILE]
