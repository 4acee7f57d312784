"""Domain R's console device for a QEMU guest: the guest's serial console, QEMU's
chardev socket, instead of a console ring (the same interface as
keeper.domr.console.ConsoleBackend, so the raw console and SSH ride on it unchanged).

Input: bytes typed in any session go to the socket as far as a small in-flight
budget allows; the rest waits in the session (nothing is lost when the guest reads
slowly), and goes on when the socket drains. Output: what the guest writes goes to
every session, unless one is backed up: then we stop reading and QEMU, then the
guest, wait (flow control, like a slow serial line).

Migration (DESIGN.md §8): before QEMU may stop the VM, input is held here and the
socket drained — `SIOCOUTQ` 0 means QEMU read every byte while the VM ran (what it
read and the guest did not yet take is in the UART and moves with the VM). On a
Unix socket SIOCOUTQ counts kernel memory, not bytes, so 0 is the only reading we
trust. From then on input waits in the sessions' state, which is checkpointed; on
the target a new link to the target QEMU is made (S6) and input flows once the VM
runs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass

from keeper.console.raw import RawSession
from keeper.errors import KeeperError
from keeper.qemu.devices import DeviceClient

log = logging.getLogger("keeper.qemu.chardev")

INFLIGHT = 16 << 10  # SIOCOUTQ units (kernel memory) we allow before waiting
RECV = 65536
DRAIN_POLL = 0.002
RETRY = 0.005  # how soon to look again when QEMU has not read our in-flight bytes


@dataclass(slots=True)
class ChardevState:
    """What the console link carries in a checkpoint: which guest it serves."""

    guest: str


def unread(sock: socket.socket) -> int:
    """SIOCOUTQ: >0 while the peer has not read everything we wrote."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


class ChardevConsole:
    def __init__(self, devices: DeviceClient) -> None:
        self.devices = devices
        self.state: ChardevState | None = None
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = self._watching_write = False
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self.held = False
        self.broadcast: Callable[[bytes], None] = lambda data: None
        self.retry_inputs: Callable[[], None] = lambda: None
        self.may_output: Callable[[], bool] = lambda: True
        self.bytes_in = self.bytes_out = 0

    # -- set-up -------------------------------------------------------------------------

    def connect(self) -> None:
        """First start: the guest's serial console from our agent."""
        guest = self.devices.guest()
        if guest is None:
            raise KeeperError("this Domain R serves no guest yet")
        self.reconnect(ChardevState(guest=guest))

    def reconnect(self, state: ChardevState) -> None:
        """After a move: a new link to the same guest's console, now on this host."""
        self.sock = self.devices.open("serial", state.guest)
        self.state = state

    # -- serving ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._serving = True
        self._want_read(True)
        self.retry_inputs()

    def stop(self) -> None:
        """Quiesce: no more reading or writing the chardev. What the guest wrote until
        now is taken first: on a migration the VM is stopped by then, and output left
        in the socket would die with the source QEMU."""
        if self._serving and self.sock is not None:
            while True:
                try:
                    data = self.sock.recv(RECV)
                except (BlockingIOError, InterruptedError, OSError):
                    break
                if not data:
                    break
                self.bytes_out += len(data)
                self.broadcast(data)  # sessions keep it (checkpointed) past their limit
        self._serving = False
        self._want_read(False)
        self._want_write(False)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def hold(self, on: bool) -> None:
        """Hold input here (True) or let it flow again (False)."""
        self.held = on
        if not on and self._serving:
            self.retry_inputs()

    async def drain(self, timeout: float) -> None:
        """Until QEMU has read every byte we wrote (call with input held)."""
        if self.sock is None:
            return
        deadline = time.monotonic() + timeout
        while unread(self.sock) > 0:
            if time.monotonic() > deadline:
                raise KeeperError(f"the guest's serial console did not take its input in "
                                  f"{timeout:.1f} s (QEMU holds {unread(self.sock)})")
            await asyncio.sleep(DRAIN_POLL)

    def on_input(self, session: RawSession) -> None:
        """Send what the in-flight budget allows of the session's typed bytes."""
        if not self._serving or self.held or self.sock is None or not session.pending_in:
            return
        room = INFLIGHT - unread(self.sock)
        if room <= 0:  # QEMU is behind; the socket stays writable, so look again soon
            if self._retry is None and self._loop is not None:
                self._retry = self._loop.call_later(RETRY, self._writable)
            return
        try:
            n = self.sock.send(session.pending_in[:room])
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._lost(f"send: {exc}")
            return
        if n:
            session.take_input(n)
            self.bytes_in += n
        self._want_write(bool(session.pending_in))

    def _writable(self) -> None:
        self._retry = None
        self._want_write(False)
        self.retry_inputs()

    def _readable(self) -> None:
        if self.sock is None:
            return
        if not self.may_output():  # a session is backed up: the guest waits
            self._want_read(False)
            return
        try:
            data = self.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"recv: {exc}")
            return
        if not data:
            self._lost("QEMU closed the serial console")
            return
        self.bytes_out += len(data)
        self.broadcast(data)

    def pump_output(self) -> None:
        """A backed-up session drained: read the guest's output again."""
        if self._serving:
            self._want_read(True)

    def _lost(self, why: str) -> None:
        log.warning("serial console link: %s", why)
        self.stop()

    def _want_read(self, on: bool) -> None:
        if self._loop is None or self.sock is None or on == self._reading:
            return
        if on:
            self._loop.add_reader(self.sock.fileno(), self._readable)
        else:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = on

    def _want_write(self, on: bool) -> None:
        if self._loop is None or self.sock is None or on == self._watching_write:
            return
        if on:
            self._loop.add_writer(self.sock.fileno(), self._writable)
        else:
            self._loop.remove_writer(self.sock.fileno())
        self._watching_write = on

    def close(self) -> None:
        self.stop()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
