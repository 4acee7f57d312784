"""`keeper domu run`: the simulated guest, a process whose whole state is its memory.

Started by its host agent with its memory (a memfd), its dirty log and a control
socket already open (inherited fds). On a migration target it is started early,
while the memory is still arriving, and waits for b"G" before it looks at it: the
guest's downtime is then not a Python start-up. It has no network at all: it enters a fresh,
empty network namespace first. Everything it knows lives in guest memory
(keeper.domu.guestos), so the migration manager moves it by copying pages; a new
process on the target attaches to the copy (`--resume`) and goes on.

Event loop: wait on the console event channel (eventfd) and the control socket.
An upcall runs the console OS; if it made progress we notify Domain R. With
`--event-delay-ms` the guest handles each upcall that much later (the paper's
200 ms ablation). Control from the agent: b"P" pause (finish the current step,
answer b"p", wait), b"R" resume (answer b"r"), b"Q" or EOF: exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import mmap
import os
import selectors
import socket
import time

from keeper.domu.display import warm_glyphs
from keeper.domu.guestos import GuestOS
from keeper.domu.memory import GuestMemory
from keeper.errors import KeeperError
from keeper.vmm.hypercall import HypercallClient
from keeper.vmm.xenstore import XenbusState

log = logging.getLogger("keeper.domu")
CLONE_NEWNET = 0x40000000
WORKLOAD_TICK = 0.01


def _no_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise KeeperError(f"unshare(CLONE_NEWNET): errno {ctypes.get_errno()}")


class Guest:
    def __init__(self, args: argparse.Namespace) -> None:
        size = os.fstat(args.mem_fd).st_size
        self.mem_map = mmap.mmap(args.mem_fd, size)
        self.dirty_map = mmap.mmap(args.dirty_fd, os.fstat(args.dirty_fd).st_size)
        self.mem = GuestMemory(self.mem_map, self.dirty_map)
        self.ctl = socket.socket(fileno=args.ctl_fd)
        self.hc = HypercallClient(args.hypercall)
        self.delay = args.event_delay_ms / 1000
        self.dirty_rate = args.dirty_rate
        self.exit_now = False
        if args.resume:
            # Started ahead of time on the target: wait until the memory is all here,
            # meanwhile warming what this process derives from it (the font's cells)
            self.ctl.sendall(b"w")
            warm_glyphs()
            if self.ctl.recv(1) != b"G":
                self.exit_now = True
                return
            self.os = GuestOS.attach(self.mem)  # no re-initialisation of anything
            port = self.os.console_port
        else:
            self.os = GuestOS.boot(self.mem, hostname=args.name)
            port = self._console_frontend_init()
            self._display_frontend_init()
        _, fds = self.hc.call("evtchn_fds", port=port)
        self.upcall_fd, self.notify_fd = fds
        self.kbd_fds = self.fb_fds = (-1, -1)
        if self.os.display is not None:
            _, self.kbd_fds = self.hc.call("evtchn_fds", port=self.os.display.kbd_port)
            _, self.fb_fds = self.hc.call("evtchn_fds", port=self.os.display.fb_port)
        self.due: float | None = time.monotonic()  # service once at start: an upcall
        # pending at the pause (its eventfd stayed on the old host) must not be lost
        self.ctl.sendall(b"u")  # up: the agent waits for this

    def _console_frontend_init(self) -> int:
        """Xen console frontend: offer a port to Dom0, publish ring-ref and port."""
        me, _ = self.hc.call("whoami")
        port, _ = self.hc.call("alloc_unbound", remote=0)
        self.os.set_console_port(int(port))
        base = f"/local/domain/{me['domid']}/console"
        self.hc.call("xs_write", path=f"{base}/ring-ref", value=str(self.os.console_pfn))
        self.hc.call("xs_write", path=f"{base}/port", value=str(port))
        self.hc.call("xs_write", path=f"{base}/state", value=str(int(XenbusState.INITIALISED)))
        return int(port)

    def _display_frontend_init(self) -> None:
        """Xen vkbd and vfb frontends: ports offered to Dom0, published in XenStore."""
        disp = self.os.display
        if disp is None:
            return
        me, _ = self.hc.call("whoami")
        kbd, _ = self.hc.call("alloc_unbound", remote=0)
        fb, _ = self.hc.call("alloc_unbound", remote=0)
        disp.set_ports(int(kbd), int(fb))
        for dev, pfn, port in (("vkbd", disp.kbd_pfn, kbd), ("vfb", disp.fb_pfn, fb)):
            base = f"/local/domain/{me['domid']}/device/{dev}/0"
            self.hc.call("xs_write", path=f"{base}/page-ref", value=str(pfn))
            self.hc.call("xs_write", path=f"{base}/event-channel", value=str(port))
            self.hc.call("xs_write", path=f"{base}/state",
                         value=str(int(XenbusState.INITIALISED)))
        self.hc.call("xs_write", path=f"/local/domain/{me['domid']}/device/vfb/0/feature-update",
                     value="1")

    def _service(self) -> None:
        # The console OS works in bounded steps (a line at most); run steps until it
        # makes no progress, then tell Domain R once.
        progress = False
        for _ in range(64):
            if not self.os.service_console():
                break
            progress = True
        if progress:
            os.eventfd_write(self.notify_fd, 1)
        if self.os.display is not None and self.os.display.service_keyboard():
            os.eventfd_write(self.kbd_fds[1], 1)  # room in the vkbd ring: held keys may come
            os.eventfd_write(self.fb_fds[1], 1)  # the screen changed: tell the vfb backend

    def _pause(self) -> bool:
        """Stopped at a clean point; all state is in memory. False: told to exit."""
        self.ctl.sendall(b"p")
        while True:
            cmd = self.ctl.recv(1)
            if cmd == b"R":
                self.ctl.sendall(b"r")
                self.due = time.monotonic()
                return True
            if cmd in (b"Q", b""):
                return False

    def run(self) -> int:
        if self.exit_now:
            return 0
        sel = selectors.DefaultSelector()
        sel.register(self.upcall_fd, selectors.EVENT_READ, "upcall")
        sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        for fd in (self.kbd_fds[0], self.fb_fds[0]):
            if fd >= 0:
                sel.register(fd, selectors.EVENT_READ, ("upcall", fd))
        next_work = time.monotonic()
        pages_per_tick = self.dirty_rate * WORKLOAD_TICK
        carry = 0.0
        while True:
            now = time.monotonic()
            timeout = None
            if self.due is not None:
                timeout = max(0.0, self.due - now)
            if pages_per_tick:
                timeout = min(timeout if timeout is not None else WORKLOAD_TICK,
                              max(0.0, next_work - now))
            for key, _ in sel.select(timeout):
                if key.data == "upcall" or isinstance(key.data, tuple):
                    fd = self.upcall_fd if key.data == "upcall" else key.data[1]
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    if self.due is None:
                        self.due = time.monotonic() + self.delay
                else:
                    cmd = self.ctl.recv(1)
                    if cmd == b"P":
                        if not self._pause():
                            return 0
                    elif cmd in (b"Q", b""):
                        return 0
            now = time.monotonic()
            if self.due is not None and now >= self.due:
                self.due = None
                self._service()
            disp = self.os.display
            if disp is not None and disp.saver_on and self.due is None:
                disp.saver_step()
                os.eventfd_write(self.fb_fds[1], 1)
                self.due = now + disp.saver_period  # the next frame, unless an event comes
            if pages_per_tick and now >= next_work:
                carry += pages_per_tick
                n = int(carry)
                carry -= n
                if n:
                    self.os.dirty_workload(n)
                next_work = now + WORKLOAD_TICK


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("domu", help="the simulated guest (its host agent starts it)")
    dsub = p.add_subparsers(dest="action", required=True)
    r = dsub.add_parser("run", help="run a simulated guest (its host agent starts it, with "
                        "the file descriptors below already open)")
    r.add_argument("--name", required=True, help="the guest's name (its shell's host name)")
    r.add_argument("--hypercall", required=True, help="the hypercall channel's Unix socket")
    r.add_argument("--mem-fd", type=int, required=True,
                   help="inherited fd: the guest's memory (a memfd its agent owns)")
    r.add_argument("--dirty-fd", type=int, required=True,
                   help="inherited fd: its log-dirty map (one byte per page)")
    r.add_argument("--ctl-fd", type=int, required=True,
                   help="inherited fd: the control socket (pause, resume, quit)")
    r.add_argument("--resume", action="store_true", help="attach to migrated memory")
    r.add_argument("--event-delay-ms", type=float, default=0.0,
                   help="handle each event-channel upcall this much later (ablation)")
    r.add_argument("--dirty-rate", type=float, default=0.0,
                   help="background workload: pages dirtied per second")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _no_network()
    logging.getLogger().setLevel(logging.INFO)
    return Guest(args).run()
