"""A console client that types like a person: one key every 50 ms (the paper's §5.1).

It types comment lines ("# k00042 abcdefghij…" + Enter): the guest's shell echoes
every key and prints nothing else but a new prompt, so the client knows, byte for
byte, what the console must send back: each printable key, and for Enter "\\r\\n"
plus the prompt. It checks the echo stream against that (every key exactly once, in
order) and times each key from its write to the arrival of its echo: the pause a
user sees. Sockets are made in the lab's client namespace.
"""

from __future__ import annotations

import asyncio
import collections
import difflib
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

from keeper.aio import cancel_and_wait
from keeper.net import netns
from keeper.net.tcpinfo import tcp_info

LETTERS = b"abcdefghijklmnopqrstuvwxyz"


def script(line: int, width: int = 24) -> bytes:
    """The keys of comment line `line`: unique per line, so the journal can be checked."""
    body = bytes(LETTERS[(line * 7 + i) % 26] for i in range(width))
    return b"# k%05d " % line + body + b"\r"


@dataclass
class TypistStats:
    sent: bytearray = field(default_factory=bytearray)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (sent at, ms)
    updates: int = 0  # VNC: framebuffer updates received
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    retransmits: int = 0

    @property
    def echo_latencies_ms(self) -> list[float]:
        return [ms for _, ms in self.samples]

    @property
    def pause_ms_max(self) -> float:
        return max((ms for _, ms in self.samples), default=0.0)


class KeyLoop:
    """Types the comment-line script, one key every `period` s, and times each key
    until its echo. Subclasses say how a key goes out (`_key`), how the answers are
    read (`_read`, which calls `_echoed`) and how many echoes are still owed."""

    stats: TypistStats
    period: float
    # Type a line only once the shell printed its prompt: a real Linux tty echoes
    # keys typed while a command runs itself (typeahead, cooked mode), interleaved
    # with the command's output, which no byte-exact echo check can follow.
    line_sync = False

    async def _key(self, key: int) -> None:
        raise NotImplementedError

    async def _read(self) -> None:
        raise NotImplementedError

    def _owed(self) -> int:
        raise NotImplementedError

    def _echoed(self, sent_at: float, now: float) -> None:
        self.stats.samples.append((sent_at, (now - sent_at) * 1e3))

    async def run(self, stop: asyncio.Event, settle: float = 10.0) -> TypistStats:
        """Type until `stop`, finish the current line, then wait for every echo."""
        reader = asyncio.create_task(self._read())
        line = 0
        try:
            while not stop.is_set():  # whole lines: the last key typed is always Enter
                for key in script(line):
                    if reader.done():
                        reader.result()
                    await self._key(key)
                    await asyncio.sleep(self.period)
                line += 1
                if self.line_sync:  # the next line only once the prompt is back
                    deadline = time.monotonic() + settle
                    while self._owed() and time.monotonic() < deadline and not reader.done():
                        await asyncio.sleep(0.005)
            deadline = time.monotonic() + settle
            while self._owed() and time.monotonic() < deadline and not reader.done():
                await asyncio.sleep(0.02)
            if reader.done():
                reader.result()
            if self._owed():
                self.stats.errors.append(f"{self._owed()} keys' echoes never came")
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            exc = await cancel_and_wait(reader)
            if exc is not None and not self.stats.errors and not isinstance(
                    exc, asyncio.IncompleteReadError):
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        return self.stats


class Link(Protocol):
    """Where the typist's keys go and the console's output comes from."""

    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    def retransmits(self) -> int: ...
    def close(self) -> None: ...


class SocketLink:
    """A raw TCP connection to Domain R's console port, made in the client namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._base = tcp_info(sock).total_retrans
        self._final = 0

    @classmethod
    async def connect(cls, ns: str, addr: tuple[str, int], timeout: float = 10.0) -> SocketLink:
        with netns.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, addr), timeout)
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self.sock, 65536)

    def retransmits(self) -> int:
        if self.sock.fileno() < 0:
            return self._final
        return tcp_info(self.sock).total_retrans - self._base

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._final = self.retransmits()
            self.sock.close()


class Typist(KeyLoop):
    """Types into a console (raw TCP or SSH) and checks the echo byte for byte."""

    def __init__(self, link: Link, prompt: bytes, period: float = 0.05, *,
                 noise: bytes = b"", line_sync: bool = False) -> None:
        self.link, self.prompt, self.period = link, prompt, period
        self.line_sync = line_sync
        # a sequence the console may insert anywhere, that is not an echo (busybox ash
        # asks the terminal where its cursor is after a prompt, unless keys wait)
        self.noise = noise
        self._carry = b""
        self._seen = b""  # the last bytes that matched (for an error's context)
        self.stats = TypistStats()
        self._expect = bytearray()  # what the console must still send back
        # (end offset in the expected stream, sent at), oldest first
        self._times: collections.deque[tuple[int, float]] = collections.deque()
        self._expected_total = 0
        self._got_total = 0

    @classmethod
    async def over_tcp(cls, ns: str, addr: tuple[str, int], prompt: bytes,
                       period: float = 0.05, *, noise: bytes = b"",
                       line_sync: bool = False) -> Typist:
        return cls(await SocketLink.connect(ns, addr), prompt, period, noise=noise,
                   line_sync=line_sync)

    def retransmits(self) -> int:
        return self.link.retransmits()

    async def _key(self, key: int) -> None:
        await self.link.send(bytes([key]))
        now = time.monotonic()
        self.stats.sent.append(key)
        echo = b"\r\n" + self.prompt if key == 0x0D else bytes([key])
        self._expect += echo
        self._expected_total += len(echo)
        self._times.append((self._expected_total, now))

    async def _read(self) -> None:
        while True:
            data = await self.link.recv()
            if not data:
                raise ConnectionError("the console closed the connection")
            now = time.monotonic()
            data = self._denoise(data)
            if not data:
                continue
            want = bytes(self._expect[: len(data)])
            if data != want:
                self.stats.mismatches += 1
                raise ConnectionError(f"unexpected console output {data[:60]!r}, "
                                      f"wanted {want[:60]!r} (after {self._seen[-80:]!r})")
            del self._expect[: len(data)]
            self._seen = (self._seen + data)[-80:]
            self._got_total += len(data)
            while self._times and self._times[0][0] <= self._got_total:
                self._echoed(self._times.popleft()[1], now)

    def _denoise(self, data: bytes) -> bytes:
        """`data` without the noise sequence, also when a recv cut it in two."""
        if not self.noise:
            return data
        data = (self._carry + data).replace(self.noise, b"")
        self._carry = b""
        for n in range(len(self.noise) - 1, 0, -1):  # a tail that may start the noise
            if data.endswith(self.noise[:n]):
                data, self._carry = data[:-n], data[-n:]
                break
        return data

    def _owed(self) -> int:
        return len(self._times)

    def close(self) -> None:
        self.stats.retransmits = self.link.retransmits()
        self.link.close()


def compare(sent: bytes, journal: bytes) -> dict[str, int]:
    """Keys lost, duplicated and reordered between what was typed and what the guest got."""
    lost = duplicated = reordered = 0
    ops = difflib.SequenceMatcher(None, sent, journal, autojunk=False).get_opcodes()
    for tag, a1, a2, b1, b2 in ops:
        if tag == "delete":
            lost += a2 - a1
        elif tag == "insert":
            duplicated += b2 - b1
        elif tag == "replace":
            if sorted(sent[a1:a2]) == sorted(journal[b1:b2]):
                reordered += a2 - a1
            else:
                lost += a2 - a1
                duplicated += b2 - b1
    return {"lost": lost, "duplicated": duplicated, "reordered": reordered}
