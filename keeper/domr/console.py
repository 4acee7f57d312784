"""The console backend of Domain R: the guest's console ring, mapped from Domain U.

Set-up (first start, on the host where the guest booted): ask the hypervisor who we
manage, read the frontend's ring page number and event-channel port from XenStore,
map the page writable, bind the port (the frontend offered it to Dom0: we take it,
paper §4.1). After a move the same page is re-mapped from the new host and the same
port is already re-established there (S6, S7): nothing is re-negotiated, the
frontend never notices.

Data path: bytes typed in any session go into the ring's `in` as space allows (the
rest waits in the session, so nothing is lost when the ring is full), then we notify
the guest. On an upcall we take everything in `out` and hand it to every session:
several sessions on one console behave like several terminals on one serial line,
output to all, input from any.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from keeper.console.raw import RawSession
from keeper.errors import KeeperError
from keeper.vmm.hypercall import HypercallClient
from keeper.vmm.xenstore import XenbusState
from keeper.xen import console as ring

PAGE = 4096


@dataclass(slots=True)
class ConsoleBackendState:
    """What the backend carries in a checkpoint (plain data)."""

    u_port: int
    r_port: int
    ring_pfn: int
    mapped: list[tuple[int, bool]] = field(default_factory=list)  # (pfn, writable), as S7 needs


class ConsoleBackend:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc
        self.state: ConsoleBackendState | None = None
        self._map: mmap.mmap | None = None
        self._maps: list[mmap.mmap] = []  # other mapped pages (none yet besides the ring)
        self._page: ring.RawPage | None = None
        self._upcall_fd = self._notify_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self.broadcast: Callable[[bytes], None] = lambda data: None
        self.retry_inputs: Callable[[], None] = lambda: None
        self.may_output: Callable[[], bool] = lambda: True
        self._pumping = False
        self.bytes_in = self.bytes_out = 0

    # -- set-up ---------------------------------------------------------------------------

    def _open_channel(self, port: int) -> None:
        _, fds = self.hc.call("evtchn_fds", port=port)
        self._upcall_fd, self._notify_fd = fds

    def connect(self) -> None:
        """First start: find the frontend in XenStore, map its ring, bind its port."""
        u = self.hc.managed_domain()
        ref, _ = self.hc.call("xs_read", path=f"/local/domain/{u}/console/ring-ref")
        port, _ = self.hc.call("xs_read", path=f"/local/domain/{u}/console/port")
        if ref is None or port is None:
            raise KeeperError(f"Domain U {u} has not published its console (ring-ref, port)")
        pfn, u_port = int(ref), int(port)
        self._map = self.hc.map_pages(u, pfn, writable=True)
        self._page = ring.RawPage(self._map)
        r_port, _ = self.hc.call("bind_interdomain", remote_domid=u, remote_port=u_port)
        self._open_channel(int(r_port))
        self._publish_state(u, XenbusState.CONNECTED)
        self.state = ConsoleBackendState(u_port=u_port, r_port=int(r_port), ring_pfn=pfn,
                                         mapped=[(pfn, True)])

    def _publish_state(self, u: int, state: XenbusState) -> None:
        """The backend's side of the XenBus handshake, under our own domain's tree."""
        who, _ = self.hc.call("whoami")
        self.hc.call("xs_write", path=f"/local/domain/{who['domid']}/backend/console/{u}/0/state",
                     value=str(int(state)))

    def reconnect(self, state: ConsoleBackendState) -> None:
        """After a move (S7): re-map exactly the pages we had, take our re-made port."""
        u = self.hc.managed_domain()
        self._maps = [self.hc.map_pages(u, pfn, writable=w) for pfn, w in state.mapped
                      if pfn != state.ring_pfn]
        self._map = self.hc.map_pages(u, state.ring_pfn, writable=True)
        self._page = ring.RawPage(self._map)
        self._open_channel(state.r_port)
        self.state = state
        self._publish_state(u, XenbusState.CONNECTED)

    # -- data path --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self._reading and self._upcall_fd >= 0:
            loop.add_reader(self._upcall_fd, self._on_upcall)
            self._reading = True
        self._on_upcall()  # whatever arrived while we were not looking

    def stop(self) -> None:
        """Quiesce: from now on we neither read nor write the ring (S3 relies on it)."""
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._upcall_fd)
        self._reading = False

    def _notify(self) -> None:
        os.eventfd_write(self._notify_fd, 1)

    def on_input(self, session: RawSession) -> None:
        """Move what fits of the session's typed bytes into the ring; notify the guest."""
        if not self._reading or self._page is None or not session.pending_in:
            return
        taken = ring.backend_put_input(self._page, session.pending_in)
        if taken:
            session.take_input(taken)
            self.bytes_in += taken
            self._notify()

    def _on_upcall(self) -> None:
        if self._page is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._upcall_fd)
        self.pump_output()
        self.retry_inputs()  # the guest may have made room in `in`

    def pump_output(self) -> None:
        """Hand the guest's output to the sessions, unless one of them is backed up:
        then the ring stays full and the guest waits, as behind a slow serial line
        (and checkpoints stay small)."""
        if self._page is None or not self._reading or self._pumping or not self.may_output():
            return
        self._pumping = True  # a session draining during broadcast must not re-enter
        try:
            out = ring.backend_take_output(self._page)
            if out:
                self.bytes_out += len(out)
                self.broadcast(out)
                self._notify()  # room in `out` again
        finally:
            self._pumping = False

    def close(self) -> None:
        self.stop()
        for fd in (self._upcall_fd, self._notify_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._upcall_fd = self._notify_fd = -1
        if self._page is not None:
            self._page.release()
        self._page = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
