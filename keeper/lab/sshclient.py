"""The real OpenSSH client, run in the lab's client namespace on a pseudo-terminal.

`ssh -tt` reads keys from the pty and writes the remote output to it, exactly as a
person's terminal would. The client's TCP socket lives in the ssh process; we count
its retransmissions by borrowing the descriptor (pidfd_getfd) and reading TCP_INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import struct
import termios
from pathlib import Path

from keeper.net import netns
from keeper.net.tcpinfo import tcp_info

DETACH = b"\x1d"  # Ctrl-]: our console's "end this session" key (exit status 0)
_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438
_libc = ctypes.CDLL(None, use_errno=True)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class SshLink:
    def __init__(self, proc: asyncio.subprocess.Process, master: int, stderr: Path) -> None:
        self.proc, self.master, self.stderr_path = proc, master, stderr
        self._readable = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(master, self._readable.set)
        self._sock: socket.socket | None = None
        self._retrans_base = 0
        self._final = 0

    @classmethod
    async def start(cls, ns: str, host: str, *, key: Path, known_hosts: Path,
                    login: str = "admin", port: int = 22, workdir: Path,
                    extra: tuple[str, ...] = (), command: tuple[str, ...] = ()) -> SshLink:
        master, slave = os.openpty()
        set_winsize(slave, 80, 24)
        stderr = workdir / f"ssh-{os.getpid()}-{master}.err"
        argv = ["ssh", "-tt", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10", "-i", str(key), "-p", str(port), *extra,
                f"{login}@{host}", *command]
        with open(stderr, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=err, start_new_session=True,
                preexec_fn=lambda: netns.enter(ns))
        os.close(slave)
        os.set_blocking(master, False)
        return cls(proc, master, stderr)

    async def wait_connected(self, timeout: float = 15.0) -> None:
        """Until the ssh process has an established TCP connection we can watch."""
        deadline = self._loop.time() + timeout
        while self._loop.time() < deadline:
            sock = self._borrow_socket()
            if sock is not None:
                self._sock = sock
                self._retrans_base = tcp_info(sock).total_retrans
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise ConnectionError(f"ssh did not connect: {self.stderr()}")

    def _borrow_socket(self) -> socket.socket | None:
        pidfd = _libc.syscall(_SYS_PIDFD_OPEN, self.proc.pid, 0)
        if pidfd < 0:
            return None
        try:
            for entry in os.listdir(f"/proc/{self.proc.pid}/fd"):
                try:
                    if not os.readlink(f"/proc/{self.proc.pid}/fd/{entry}").startswith("socket:"):
                        continue
                except OSError:
                    continue
                fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(entry), 0)
                if fd < 0:
                    continue
                sock = socket.socket(fileno=fd)
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    with contextlib.suppress(OSError):
                        sock.getpeername()
                        return sock
                sock.detach()
                os.close(fd)
        except FileNotFoundError:
            return None
        finally:
            os.close(pidfd)
        return None

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view):]
            except BlockingIOError:
                await asyncio.sleep(0.005)

    async def recv(self) -> bytes:
        while True:
            try:
                return os.read(self.master, 65536)
            except BlockingIOError:
                self._readable.clear()
                await self._readable.wait()
            except OSError:  # EIO: the ssh process closed the pty
                return b""

    def resize(self, cols: int, rows: int) -> None:
        set_winsize(self.master, cols, rows)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGWINCH)

    def retransmits(self) -> int:
        if self._sock is None:
            return self._final
        try:
            return tcp_info(self._sock).total_retrans - self._retrans_base
        except OSError:
            return self._final

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    async def finish(self, timeout: float = 10.0) -> int:
        """End the session the way a person would (Ctrl-]); the exit status of ssh."""
        self._final = self.retransmits()
        with contextlib.suppress(OSError):
            await self.send(DETACH)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.master >= 0:
            self._final = self.retransmits()
            self._loop.remove_reader(self.master)
            os.close(self.master)
            self.master = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
