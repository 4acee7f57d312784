"""Several sessions typing into one guest at once: a raw console, OpenSSH and a VNC
viewer, each with keys of its own.

The raw console and SSH sessions are two terminals on one serial line: each sees the
other's echo, so no session can check its echo byte for byte (that is what
`keeper.lab.typist.Typist` does for a session alone). Instead every session types
lines of keys from its own alphabet (digits, A-M, N-Z: no line can ever be a shell
command, so the shell only answers "not found"), and the guest's input journal —
every byte it received, in order, whoever sent it — is checked per session: the
journal's bytes of a session's alphabet must be exactly what it typed, in order. The
one key they share, Enter, is checked by count. Each session reads everything its
server sends (a session that stops reading would hold the console back), and a
session whose connection breaks stops and says so.

At the end `alive()` asks each session in turn for a sign of life: a key, and output
back within a deadline (VNC: a screen update).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from keeper import ports
from keeper.aio import cancel_and_wait
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import SocketLink, compare
from keeper.lab.vncclient import VncTypist

ALPHABETS = {"console": b"0123456789", "ssh": b"ABCDEFGHIJKLM", "vnc": b"NOPQRSTUVWXYZ"}
ENTER = 0x0D
LINE = 20  # keys per line before Enter


def line_keys(alphabet: bytes, line: int, width: int = LINE) -> bytes:
    return bytes(alphabet[(line * 7 + i) % len(alphabet)] for i in range(width)) + b"\r"


@dataclass
class Voice:
    """One session: how a key goes out, a reader that runs until the connection ends,
    and what it sent and got."""

    rms: str
    alphabet: bytes
    send_key: Callable[[int], Awaitable[None]]
    read: Callable[[], Awaitable[None]]
    retransmits: Callable[[], int]
    finish: Callable[[], Awaitable[list[str]]]
    sent: bytearray = field(default_factory=bytearray)
    received: int = 0  # bytes (console, SSH) or screen updates (VNC) so far
    errors: list[str] = field(default_factory=list)


async def _stream_voice(rms: str, link: SocketLink | SshLink) -> Voice:
    voice: Voice

    async def send_key(key: int) -> None:
        await link.send(bytes([key]))

    async def read() -> None:
        while True:
            data = await link.recv()
            if not data:
                raise ConnectionError(f"{rms}: the server closed the connection")
            voice.received += len(data)

    async def finish() -> list[str]:
        if isinstance(link, SshLink):
            status = await link.finish()
            stderr = link.stderr()
            if status != 0 or "WARNING" in stderr:
                return [f"ssh exited {status}: {stderr.strip()[-300:]}"]
            return []
        link.close()
        return []

    voice = Voice(rms, ALPHABETS[rms], send_key, read, link.retransmits, finish)
    return voice


async def _vnc_voice(v: VncTypist) -> Voice:
    voice: Voice

    async def read() -> None:
        task = asyncio.ensure_future(v._read())  # updates, one request outstanding
        try:
            while not task.done():
                voice.received = v.stats.updates
                await asyncio.sleep(0.05)
            task.result()
        finally:
            await cancel_and_wait(task)
            voice.received = v.stats.updates

    async def finish() -> list[str]:
        v.close()
        return []

    voice = Voice("vnc", ALPHABETS["vnc"], v._key, read, v.retransmits, finish)
    return voice


async def open_voice(spec: LabSpec, ip: str, rms: str, work: Path) -> Voice:
    if rms == "vnc":
        return await _vnc_voice(await VncTypist.connect(spec.client_ns, (ip, ports.VNC)))
    if rms == "console":
        return await _stream_voice(rms, await SocketLink.connect(spec.client_ns,
                                                                 (ip, ports.CONSOLE)))
    link = await SshLink.start(spec.client_ns, ip, key=spec.ssh_dir / "id_ed25519",
                               known_hosts=work / "known_hosts", workdir=work)
    await link.wait_connected()
    await asyncio.sleep(1.0)  # the login's own output settles before the first key
    return await _stream_voice(rms, link)


class Chorus:
    """Sessions typing at once, one key every `period` s each, until `stop`."""

    def __init__(self, voices: list[Voice], period: float = 0.05) -> None:
        self.voices, self.period = voices, period
        self._readers: dict[str, asyncio.Task[None]] = {}

    async def _type(self, voice: Voice, stop: asyncio.Event) -> None:
        line = 0
        reader = self._readers[voice.rms]
        try:
            while not stop.is_set():  # whole lines: the last key typed is always Enter
                for key in line_keys(voice.alphabet, line):
                    if reader.done():
                        reader.result()
                    await voice.send_key(key)
                    voice.sent.append(key)
                    await asyncio.sleep(self.period)
                line += 1
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            voice.errors.append(f"{voice.rms}: {type(exc).__name__}: {exc}")

    async def run(self, stop: asyncio.Event) -> None:
        """Type until `stop` (the readers keep going until `close`)."""
        for v in self.voices:
            self._readers[v.rms] = asyncio.create_task(v.read(), name=f"read-{v.rms}")
        async with asyncio.TaskGroup() as tg:
            for v in self.voices:
                tg.create_task(self._type(v, stop), name=f"type-{v.rms}")

    async def alive(self, timeout: float = 15.0) -> dict[str, bool]:
        """Each session in turn: one Enter, and output back within `timeout` s."""
        out = {}
        for v in self.voices:
            before = v.received
            ok = False
            try:
                if not self._readers[v.rms].done():
                    await v.send_key(ENTER)
                    v.sent.append(ENTER)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline and not self._readers[v.rms].done():
                        if v.received > before:
                            ok = True
                            break
                        await asyncio.sleep(0.05)
            except (OSError, ConnectionError) as exc:
                v.errors.append(f"{v.rms}: {type(exc).__name__}: {exc}")
            out[v.rms] = ok
        return out

    async def close(self) -> None:
        """Stop the readers (noting a reader that failed) and end every session."""
        for v in self.voices:
            reader = self._readers.get(v.rms)
            if reader is not None:
                if reader.done() and not reader.cancelled() and reader.exception():
                    exc = reader.exception()
                    v.errors.append(f"{v.rms}: {type(exc).__name__}: {exc}")
                await cancel_and_wait(reader)
            v.errors += await v.finish()


def _compare(sent: bytes, got: bytes) -> dict[str, int]:
    """`typist.compare` on what differs only: difflib is quadratic on long runs of a
    small alphabet, and a soak's sessions type tens of thousands of keys."""
    if sent == got:
        return {"lost": 0, "duplicated": 0, "reordered": 0}
    head = 0
    while head < min(len(sent), len(got)) and sent[head] == got[head]:
        head += 1
    tail = 0
    while (tail < min(len(sent), len(got)) - head
           and sent[-1 - tail] == got[-1 - tail]):
        tail += 1
    return compare(sent[head:len(sent) - tail], got[head:len(got) - tail])


def check(voices: list[Voice], journal: bytes) -> dict[str, dict[str, int]]:
    """Per session: keys lost, duplicated, reordered between what it typed and the
    journal's bytes of its alphabet; and for the shared Enter, the count difference."""
    out: dict[str, dict[str, int]] = {}
    for v in voices:
        mine = bytes(b for b in journal if b in v.alphabet)
        typed = bytes(b for b in v.sent if b in v.alphabet)
        out[v.rms] = {"sent": len(typed), "received": len(mine), **_compare(typed, mine)}
    enters_sent = sum(v.sent.count(ENTER) for v in voices)
    enters_got = journal.count(ENTER)
    out["enter"] = {"sent": enters_sent, "received": enters_got,
                    "lost": max(0, enters_sent - enters_got),
                    "duplicated": max(0, enters_got - enters_sent), "reordered": 0}
    return out
