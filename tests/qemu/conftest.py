"""Fixtures for real QEMU guests. They skip (with the reason) when QEMU or the guest image
is missing, and remove every QEMU process, run directory and namespace they made, even
when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from keeper.net import netns
from keeper.qemu import image
from keeper.qemu.image import GuestImage
from keeper.qemu.machine import QEMU, QemuMachine
from tests.conftest import unique

BOOT_TIMEOUT = 60.0
PROMPT = b"# "


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (scripts/setup installs qemu-system-x86)")
    img = image.load()
    if img is None:
        pytest.skip("guest image not built: run scripts/setup (python -m keeper.qemu.image)")
    try:
        # rebuilt if the guest's sources changed since setup (the .deb is cached)
        img, _ = image.build(img.cache)
    except (image.ImageError, OSError) as exc:
        warnings.warn(f"guest image may be stale, rebuilding failed: {exc}", stacklevel=1)
    return img


class Console:
    """A client of a guest's serial console: keeps all output, sends bytes, waits for text."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.output = bytearray()
        self.sent = bytearray()
        self._reader, self._writer = reader, writer
        self._grew = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def unix(cls, path: object) -> Console:
        return cls(*await asyncio.open_unix_connection(str(path)))

    @classmethod
    async def tcp(cls, host: str, port: int, ns: str) -> Console:
        """Connect from inside namespace `ns` (the socket stays there)."""
        with netns.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)),
                                   5.0)
        except BaseException:
            sock.close()
            raise
        return cls(*await asyncio.open_connection(sock=sock))

    async def _read(self) -> None:
        while data := await self._reader.read(65536):
            self.output += data
            self._grew.set()

    def mark(self) -> int:
        return len(self.output)

    async def send(self, data: bytes) -> None:
        self.sent += data
        self._writer.write(data)
        await self._writer.drain()

    async def wait_for(self, text: bytes, *, since: int = 0, timeout: float = 30.0) -> int:
        """Wait until `text` appears in the output after offset `since`; returns its end."""
        async def seen() -> int:
            while (at := self.output.find(text, since)) < 0:
                if self._task.done():
                    raise AssertionError(f"console closed before {text!r}: "
                                         f"{bytes(self.output[since:])!r}")
                self._grew.clear()
                await self._grew.wait()
            return at + len(text)
        try:
            return await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {text!r} after {timeout} s; console said "
                                 f"{bytes(self.output[since:])[-500:]!r}") from None

    async def run(self, command: str, expect: bytes, timeout: float = 30.0) -> None:
        """Type `command` and Enter; wait for `expect` on a line of its own."""
        since = self.mark()
        await self.send(command.encode() + b"\r")
        await self.wait_for(b"\n" + expect + b"\r\n", since=since, timeout=timeout)

    async def close(self) -> None:
        self._writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._task
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def booted_console(machine: QemuMachine) -> Console:
    """The serial console of a freshly started guest, once its shell prompts."""
    assert machine.paths.serial is not None
    console = await Console.unix(machine.paths.serial)
    await machine.wait_booted(BOOT_TIMEOUT)
    await console.wait_for(PROMPT, timeout=BOOT_TIMEOUT)
    return console


MachineFactory = Callable[..., Coroutine[Any, Any, QemuMachine]]


@pytest.fixture
async def machines(guest_image: GuestImage, namespaces: list[str],
                   request: pytest.FixtureRequest) -> AsyncIterator[MachineFactory]:
    """`await machines(name=..., **QemuMachine kwargs)` starts a machine; all are stopped,
    reaped and their run directories removed afterwards (QEMU's log printed first, which
    pytest shows when the test failed). Depends on `namespaces` so that they go last."""
    made: list[QemuMachine] = []

    async def make(**kwargs: Any) -> QemuMachine:
        kwargs.setdefault("name", unique("kq"))
        m = QemuMachine(guest_image, **kwargs)
        made.append(m)
        await m.start()
        return m

    try:
        yield make
    finally:
        for m in made:
            print(f"--- {m.name} (pid {m.pid}) qemu.log:\n{m.log_tail()}")
            await m.close(keep_journal=False)
        leftover = [m.pid for m in made if m.pid is not None and pid_alive(m.pid)]
        assert not leftover, f"QEMU processes outlived their test: {leftover}"


@dataclasses.dataclass(frozen=True)
class MigrationNet:
    """Two namespaces joined by a veth pair: QEMU's migration stream runs between them."""

    source: str
    target: str
    source_addr: str
    target_addr: str


@pytest.fixture
def migration_net(namespaces: list[str]) -> MigrationNet:
    base = unique("kq")
    net = MigrationNet(f"{base}-src", f"{base}-dst", "198.18.254.1", "198.18.254.2")
    namespaces += [net.source, net.target]
    for ns in (net.source, net.target):
        netns.ensure(ns)
    netns.ensure_veth(net.source, "mig0", net.target, "mig0")
    for ns, addr in ((net.source, net.source_addr), (net.target, net.target_addr)):
        netns.ensure_addr(ns, "mig0", addr, 30)
        netns.set_up(ns, "mig0")
    return net
