"""Event channels: per-domain ports, unbound ports, interdomain binding, eventfds.

A channel joins (domain A, port a) and (domain B, port b). Each side has an eventfd
it reads for its upcalls; notifying the other side writes the other's eventfd. Ports
are allocated per domain from 1 upward, as Xen does. A port allocated "unbound for
remote domain X" may be bound by X — or by a Domain R associated with the domain
that allocated it: the paper's interception of a frontend that offered its port to
Dom0.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass, field

from keeper.errors import KeeperError

MAX_PORTS = 4096


class ChannelState(enum.Enum):
    UNBOUND = "unbound"
    INTERDOMAIN = "interdomain"


@dataclass
class Endpoint:
    domid: int
    port: int
    upcall_fd: int  # this side reads it; the peer writes it to notify us


@dataclass
class Channel:
    a: Endpoint
    remote_domid: int  # who may bind an unbound port (0: Dom0)
    # the binder's upcall eventfd exists from the start: what the allocator notifies
    # before anyone binds is counted there and delivered when the peer arrives
    b_fd: int
    state: ChannelState = ChannelState.UNBOUND
    b: Endpoint | None = None

    def ends(self) -> list[Endpoint]:
        return [self.a] if self.b is None else [self.a, self.b]


@dataclass
class EventChannels:
    """The table for one host. Not thread-safe by itself: the hypervisor holds its lock."""

    channels: dict[tuple[int, int], Channel] = field(default_factory=dict)

    def _free_port(self, domid: int, want: int | None = None) -> int:
        if want is not None:
            if (domid, want) in self.channels:
                raise KeeperError(f"event channel port {want} of domain {domid} is in use")
            return want
        for port in range(1, MAX_PORTS):
            if (domid, port) not in self.channels:
                return port
        raise KeeperError(f"domain {domid} has no free event-channel port")

    def alloc_unbound(self, domid: int, remote_domid: int, port: int | None = None) -> int:
        port = self._free_port(domid, port)
        ch = Channel(a=Endpoint(domid, port, _eventfd()), remote_domid=remote_domid,
                     b_fd=_eventfd())
        self.channels[(domid, port)] = ch
        return port

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int,
                         *, may_intercept: bool, port: int | None = None) -> int:
        ch = self.channels.get((remote_domid, remote_port))
        if ch is None or ch.a.domid != remote_domid:
            raise KeeperError(f"domain {remote_domid} has no unbound port {remote_port}")
        if ch.state is not ChannelState.UNBOUND:
            raise KeeperError(f"port {remote_port} of domain {remote_domid} is already bound")
        if ch.remote_domid != domid and not may_intercept:
            raise KeeperError(f"port {remote_port} of domain {remote_domid} is offered to "
                              f"domain {ch.remote_domid}, not {domid}")
        port = self._free_port(domid, port)
        ch.b = Endpoint(domid, port, ch.b_fd)
        ch.state = ChannelState.INTERDOMAIN
        self.channels[(domid, port)] = ch
        return port

    def lookup(self, domid: int, port: int) -> Channel:
        ch = self.channels.get((domid, port))
        if ch is None:
            raise KeeperError(f"domain {domid} has no event-channel port {port}")
        return ch

    def fds(self, domid: int, port: int) -> tuple[int, int]:
        """(upcall fd to read, notify fd to write) for `domid`'s end of the channel."""
        ch = self.lookup(domid, port)
        if ch.a.domid == domid and ch.a.port == port:
            return ch.a.upcall_fd, ch.b_fd
        return ch.b_fd, ch.a.upcall_fd

    def pairs_between(self, dom_a: int, dom_b: int) -> list[tuple[int, int]]:
        """[(port of dom_a, port of dom_b)] for every interdomain channel joining them."""
        out = set()
        for ch in self.channels.values():
            if ch.state is ChannelState.INTERDOMAIN and ch.b is not None:
                ends = {ch.a.domid: ch.a.port, ch.b.domid: ch.b.port}
                if dom_a in ends and dom_b in ends:
                    out.add((ends[dom_a], ends[dom_b]))
        return sorted(out)

    def close_domain(self, domid: int) -> None:
        """A domain goes away. Channels it allocated go with it; where it was the
        binder, the allocator's port becomes unbound again (as in Xen), so a new
        backend can bind it."""
        for key in [k for k, ch in self.channels.items()
                    if any(e.domid == domid for e in ch.ends())]:
            ch = self.channels.get(key)
            if ch is None:
                continue
            if ch.a.domid != domid and ch.b is not None and ch.b.domid == domid:
                self.channels.pop((ch.b.domid, ch.b.port), None)
                with contextlib.suppress(OSError):
                    os.close(ch.b_fd)
                ch.b, ch.b_fd, ch.state = None, _eventfd(), ChannelState.UNBOUND
                continue
            for end in ch.ends():
                self.channels.pop((end.domid, end.port), None)
            for fd in (ch.a.upcall_fd, ch.b_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
