"""Test helpers for moving SSH sessions: an echo shell, the real `ssh` in a pty, and a
session host process (`python -m tests.ssh.helpers`) driven over a Unix socket.

The host process owns at most one SSH connection. The test sends it commands
(`listen`, `export`, `adopt`, `release`...) and moves the session's socket between
hosts as an fd (SCM_RIGHTS), the serialised state as the message body.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from keeper import serial
from keeper.errors import KeeperError
from keeper.ssh import movable

ROOT = Path(__file__).resolve().parents[2]
STATE_KIND = "ssh-session"
FLOOD_CHUNK = 32 * 1024

# -- a deterministic, printable output stream: 64-byte numbered lines --------------

_LINE = 64
_TAILS = [bytes(65 + (r + k) % 26 for k in range(_LINE - 18)) + b"\r\n" for r in range(26)]


def flood_bytes(offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of the flood stream (both multiples of 64)."""
    assert offset % _LINE == 0 and n % _LINE == 0
    first = offset // _LINE
    return b"".join(b"%015d:" % i + _TAILS[i % 26] for i in range(first, first + n // _LINE))


# -- the application session ----------------------------------------------------------


@dataclass
class ShellSessionState:
    """EchoShellSession's whole state, plain data."""

    line: bytes = b""  # typed, not yet entered
    started: bool = False
    flood_total: int = 0  # size of the flood in progress, 0 if none
    flood_sent: int = 0  # bytes of it handed to the channel
    paused: bool = False  # the channel asked us to stop writing


class EchoShellSession(movable.MovableSession):
    """Echoes what is typed; on Enter runs a line: `exit`, `info`, `flood N`, or shows
    it back as `[line]`."""

    def __init__(self, state: ShellSessionState | None = None) -> None:
        self.st = state or ShellSessionState()
        self._chan: Any = None

    # asyncssh callbacks
    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def session_started(self) -> None:
        self.st.started = True
        self._chan.write(b"READY\r\n$ ")

    def data_received(self, data: bytes, datatype: Any) -> None:
        echo = bytearray()
        for byte in data:
            if byte in (10, 13):
                echo += b"\r\n"
                self._chan.write(bytes(echo))
                echo.clear()
                line, self.st.line = self.st.line, b""
                self._run(line.decode(errors="replace").strip())
            else:
                echo.append(byte)
                self.st.line += bytes([byte])
        if echo:
            self._chan.write(bytes(echo))

    def pause_writing(self) -> None:
        self.st.paused = True

    def resume_writing(self) -> None:
        self.st.paused = False
        self._pump()

    # moving
    def export_state(self) -> dict[str, Any]:
        return {"shell": serial.to_plain(self.st)}

    def session_restored(self) -> None:
        self._pump()

    def session_released(self) -> None:
        self._chan = None

    # the shell
    def _run(self, line: str) -> None:
        if line == "exit":
            self._chan.exit(0)
        elif line == "info":
            chan = self._chan
            w, h, _, _ = chan.get_terminal_size()
            env = chan.get_environment().get("KEEPER_TEST")
            self._chan.write(f"INFO pid={os.getpid()} term={chan.get_terminal_type()} "
                             f"size={w}x{h} env={env}\r\n$ ".encode())
        elif line.startswith("flood "):
            self.st.flood_total = int(line.split()[1])
            self.st.flood_sent = 0
            self._chan.write(b"FLOOD-BEGIN\r\n")
            self._pump()
        elif line:
            self._chan.write(b"[" + line.encode() + b"]\r\n$ ")
        else:
            self._chan.write(b"$ ")

    def _pump(self) -> None:
        st = self.st
        while st.flood_total and not st.paused and self._chan is not None:
            if st.flood_sent < st.flood_total:
                n = min(FLOOD_CHUNK, st.flood_total - st.flood_sent)
                offset, st.flood_sent = st.flood_sent, st.flood_sent + n
                self._chan.write(flood_bytes(offset, n))  # may call pause_writing
            else:
                st.flood_total = st.flood_sent = 0
                self._chan.write(b"FLOOD-END\r\n$ ")


def restore_session(app: dict[str, Any]) -> EchoShellSession:
    return EchoShellSession(serial.from_plain(ShellSessionState, app["shell"]))


class EchoServer(asyncssh.SSHServer):
    def __init__(self, on_conn: Any = None, on_session: Any = None) -> None:
        self._on_conn = on_conn
        self._on_session = on_session

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        if self._on_conn is not None:
            self._on_conn(conn)

    def session_requested(self) -> EchoShellSession:
        session = EchoShellSession()
        if self._on_session is not None:
            self._on_session(session)
        return session


# -- keys ---------------------------------------------------------------------------


@dataclass
class Keys:
    host_key: str
    client_key: str
    authorized_keys: str
    known_hosts: str


def make_keys(tmp: Path) -> Keys:
    host = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    keys = Keys(str(tmp / "host_key"), str(tmp / "client_key"),
                str(tmp / "authorized_keys"), str(tmp / "known_hosts"))
    host.write_private_key(keys.host_key)
    client.write_private_key(keys.client_key)
    os.chmod(keys.client_key, 0o600)
    client.write_public_key(keys.authorized_keys)
    return keys


def server_kw(keys: Keys, **kw: Any) -> dict[str, Any]:
    """Keyword options of the test servers (not yet made movable)."""
    return {"server_host_keys": [keys.host_key], "authorized_client_keys": keys.authorized_keys,
            "encoding": None, **kw}


# -- the real OpenSSH client in a pty --------------------------------------------------


class SshClient:
    """`ssh -tt -v` on a pty; a thread drains the pty so ssh never blocks on output."""

    def __init__(self, keys: Keys, port: int, cipher: str, tmp: Path,
                 extra: tuple[str, ...] = ()) -> None:
        self.stderr_path = tmp / f"ssh-{port}-{cipher}.stderr"
        argv = ["/usr/bin/ssh", "-tt", "-v", "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={keys.known_hosts}",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "SetEnv=KEEPER_TEST=moved-env", "-o", "ServerAliveInterval=1",
                "-i", keys.client_key, "-p", str(port), "-c", cipher, *extra, "admin@127.0.0.1"]
        self.master, slave = os.openpty()
        self.set_size(100, 30, fd=slave)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=err,
                                         start_new_session=True,
                                         env={**os.environ, "TERM": "vt220"})
        os.close(slave)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._hold_until = 0.0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while (pause := self._hold_until - time.monotonic()) > 0:
                    self._cond.wait(pause)
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    def set_size(self, cols: int, rows: int, fd: int | None = None) -> None:
        winsize = struct.pack("HHHH", rows, cols, 0, 0)
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, winsize)
        if fd is None:
            os.kill(self.proc.pid, signal.SIGWINCH)

    def hold(self, seconds: float) -> None:
        """Stop reading ssh's output for a while (0: read again now): ssh stalls, the
        server's output backs up."""
        with self._cond:
            self._hold_until = time.monotonic() + seconds
            self._cond.notify_all()

    def seen(self, needle: bytes) -> bool:
        with self._cond:
            return self._buf.find(needle, self._pos) >= 0

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 15.0) -> bytes:
        """Wait for `needle`; return the output from the last match up to and including it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._pos
            while True:
                idx = self._buf.find(needle, start)
                if idx >= 0:
                    out = bytes(self._buf[self._pos:idx + len(needle)])
                    self._pos = idx + len(needle)
                    return out
                start = max(self._pos, len(self._buf) - len(needle) + 1)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = bytes(self._buf[-300:])
                    raise TimeoutError(f"no {needle!r} after {timeout}s (eof={self._eof}); "
                                       f"output ends {tail!r}; stderr: {self.stderr()[-1500:]}")
                self._cond.wait(left)

    def received(self) -> int:
        with self._cond:
            return len(self._buf) - self._pos

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.master)
        self._thread.join(5)


BAD_SSH_LINES = ("Host key verification", "Corrupted MAC", "Bad packet length",
                 "message authentication code incorrect", "Connection reset",
                 "Broken pipe", "REMOTE HOST IDENTIFICATION", "ssh_dispatch_run_fatal",
                 "unexpected", "Disconnecting")


def bad_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(b in line for b in BAD_SSH_LINES)]


class SplitProxy:
    """A TCP relay between ssh and the server that can cut the client's next chunk:
    forward only its first `n` bytes and the rest when told, so the server is caught
    holding a partial packet."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._target = target_port
        self._split: int | None = None
        self.cut = threading.Event()
        self._go_on = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def split_next(self, forward: int) -> None:
        """Forward only `forward` bytes of the next chunk (negative: all but that many)."""
        self.cut.clear()
        self._go_on.clear()
        self._split = forward

    def release(self) -> None:
        self._go_on.set()

    def _run(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self._target))
        self._socks += [client, server]
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, src: socket.socket, dst: socket.socket, splits: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if splits and self._split is not None:
                    n, self._split = self._split, None
                    dst.sendall(data[:n])
                    self.cut.set()
                    self._go_on.wait(60)
                    data = data[n:]
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._go_on.set()
        for sock in (self.listener, *self._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(5)


# -- control messages: 8-byte header lengths, JSON header, body; fds ride along ---------


def send_msg(sock: socket.socket, header: dict[str, Any], body: bytes = b"",
             fds: tuple[int, ...] = ()) -> None:
    head = json.dumps(header).encode()
    first = struct.pack(">II", len(head), len(body)) + head
    sent = socket.send_fds(sock, [first], list(fds)) if fds else sock.send(first)
    sock.sendall(first[sent:] + body)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], bytes, list[int]]:
    buf = bytearray()
    fds: list[int] = []
    while len(buf) < 8:
        data, got, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        fds += got
        if not data:
            raise EOFError("control channel closed")
        buf += data
    hlen, blen = struct.unpack(">II", buf[:8])
    need = 8 + hlen + blen
    while len(buf) < need:
        data = sock.recv(min(1 << 20, need - len(buf)))
        if not data:
            raise EOFError("control channel closed mid-message")
        buf += data
    return json.loads(buf[8:8 + hlen]), bytes(buf[8 + hlen:]), fds


class HostError(KeeperError):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("error", "?"))
        self.kind = reply.get("kind")


class HostProc:
    """Test side of one session host process."""

    def __init__(self, tmp: Path, config: dict[str, Any], pass_fds: tuple[int, ...] = (),
                 name: str = "host") -> None:
        self.config = config
        self.ctrl, child = socket.socketpair()
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.ssh.helpers", "--ctrl", str(child.fileno()),
                 "--config", json.dumps(config)],
                pass_fds=(child.fileno(), *pass_fds), cwd=ROOT, stdout=log, stderr=log)
        child.close()
        self.ctrl.settimeout(60)

    def call(self, cmd: str, body: bytes = b"", fds: tuple[int, ...] = (),
             **args: Any) -> tuple[dict[str, Any], bytes, list[int]]:
        send_msg(self.ctrl, {"cmd": cmd, **args}, body, fds)
        reply, rbody, rfds = recv_msg(self.ctrl)
        if not reply.get("ok"):
            for fd in rfds:
                os.close(fd)
            raise HostError(reply)
        return reply, rbody, rfds

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, EOFError, HostError, TimeoutError):
                self.ctrl.settimeout(5)
                self.call("quit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.ctrl.close()


# -- the host process ---------------------------------------------------------------------


class Host:
    """One SSH connection's owner: starts it (listen) or adopts it, and gives it up."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.conn: asyncssh.SSHServerConnection | None = None
        self.acceptor: Any = None
        self.timings: dict[str, float] = {}

    def _set_conn(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def options(self) -> dict[str, Any]:
        cfg = self.config
        kw = server_kw(Keys(cfg["host_key"], "", cfg["authorized_keys"], ""),
                       keepalive_interval=cfg.get("keepalive", 0))
        if cfg.get("rekey_bytes"):
            kw["rekey_bytes"] = cfg["rekey_bytes"]
        return movable.server_options(**kw)

    async def handle(self, msg: dict[str, Any], body: bytes,
                     fds: list[int]) -> tuple[dict[str, Any], bytes, list[socket.socket]]:
        cmd = msg["cmd"]
        if cmd == "listen":
            self.acceptor = await asyncssh.create_server(
                lambda: EchoServer(self._set_conn), "127.0.0.1", 0, **self.options())
            return {"port": self.acceptor.get_port()}, b"", []
        if cmd == "wait_session":
            deadline = time.monotonic() + msg.get("timeout", 15)
            while not (self.conn and any(c._session is not None and c._session_started
                                         for c in self.conn._channels.values())):
                if time.monotonic() > deadline:
                    raise TimeoutError("no session started")
                await asyncio.sleep(0.01)
            return {}, b"", []
        if cmd == "export":
            assert self.conn is not None
            t0 = time.perf_counter()
            await movable.quiesce(self.conn, msg.get("timeout", 10))
            t1 = time.perf_counter()
            state = movable.export(self.conn)
            blob = serial.dumps(STATE_KIND, state)
            t2 = time.perf_counter()
            sock = movable.dup_socket(self.conn)
            if self.acceptor is not None:  # a listener does not move
                self.acceptor.close()
            return ({"quiesce_ms": (t1 - t0) * 1000, "export_ms": (t2 - t1) * 1000,
                     "bytes": len(blob), "inpbuf": len(state.inpbuf),
                     "send_buf": sum(len(c.data) for ch in state.channels for c in ch.send_buf),
                     "pending_keepalives": state.keepalive_replies_pending},
                    blob, [sock])
        if cmd == "adopt":  # the socket comes as an fd passed on exec, or with the message
            sock = socket.socket(fileno=fds[0] if fds else msg["fd"])
            t0 = time.perf_counter()
            state = serial.loads(STATE_KIND, body, movable.SshSessionState)
            self.conn = await movable.import_(
                state, sock, server_factory=lambda: EchoServer(self._set_conn),
                session_factory=restore_session, options=self.options())
            return {"import_ms": (time.perf_counter() - t0) * 1000}, b"", []
        if cmd == "release":
            assert self.conn is not None
            movable.release(self.conn)
            return {}, b"", []
        if cmd == "resume":
            assert self.conn is not None
            movable.resume_in_place(self.conn)
            return {}, b"", []
        if cmd == "info":
            conn = self.conn
            if conn is None:
                return {"conn": False}, b"", []
            recv = conn._recv_encryption._cipher._key if conn._recv_encryption else b""
            return {"conn": True, "pid": os.getpid(), "closed": conn.is_closed(),
                    "loop": type(asyncio.get_running_loop()).__module__,
                    "move_state": movable.move_state(conn).value,
                    "recv_key": hashlib.sha256(recv).hexdigest()[:16],
                    "cipher": conn.get_extra_info("recv_cipher")}, b"", []
        if cmd == "wait_closed":
            assert self.conn is not None
            await asyncio.wait_for(self.conn.wait_closed(), msg.get("timeout", 15))
            return {}, b"", []
        if cmd == "quit":
            return {}, b"", []
        raise KeeperError(f"unknown command {cmd!r}")


async def _serve(ctrl_fd: int, config: dict[str, Any]) -> None:
    ctrl = socket.socket(fileno=ctrl_fd)
    host = Host(config)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def control() -> None:
        try:
            while True:
                try:
                    msg, body, fds = recv_msg(ctrl)
                except (EOFError, OSError):
                    return
                fut = asyncio.run_coroutine_threadsafe(host.handle(msg, body, fds), loop)
                socks: list[socket.socket] = []
                try:
                    reply, rbody, socks = fut.result(timeout=60)
                    reply = {"ok": True, **reply}
                except Exception as exc:
                    reply, rbody = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                    "kind": type(exc).__name__}, b""
                send_msg(ctrl, reply, rbody, tuple(s.fileno() for s in socks))
                for s in socks:
                    s.close()
                if msg["cmd"] == "quit":
                    return
        finally:
            loop.call_soon_threadsafe(done.set)

    threading.Thread(target=control, daemon=True).start()
    await done.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctrl", type=int, required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    config = json.loads(args.config)
    if config.get("uvloop"):  # as Domain R runs
        import uvloop

        uvloop.run(_serve(args.ctrl, config))
    else:
        asyncio.run(_serve(args.ctrl, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
