"""The simulated hypervisor of one host: domains, their memory, grants, event
channels, XenStore and log-dirty, behind one lock (the agent's event loop and the
hypercall threads both call in).

Domain U memory is a memfd of N 4 KiB pages that this process owns and maps; the
guest process maps the same memfd. Its dirty log is a second memfd of N bytes, one
per page: the guest stores 1 after writing a page (keeper.domu.memory); we clear a
byte, then copy its page, so a write that races the copy is caught next round.
Single-byte stores, never shared bits: nothing to lose in a read-modify-write.

Grants: Domain R maps page N of its associated Domain U by asking us (a hypercall).
We refuse any other domain's pages and keep, per Domain R, which pages it mapped and
which writable. The may-write bitmap is those writable pages; with the D-MORE
extension on, every read of the dirty log ORs it in (paper §4.4): the pages Domain R
can write are always re-sent, because nothing else would notice Domain R's writes.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from keeper.errors import KeeperError
from keeper.vmm.evtchn import EventChannels
from keeper.vmm.xenstore import XenStore

PAGE = 4096
DOM0 = 0


class Kind(enum.Enum):
    U = "U"  # a user VM: memory, frontends
    R = "R"  # a Domain R: no memory of ours, maps its Domain U's pages


@dataclass
class Domain:
    domid: int
    name: str
    kind: Kind
    pages: int = 0
    mem_fd: int = -1
    dirty_fd: int = -1
    mem: mmap.mmap | None = None
    dirty: mmap.mmap | None = None
    managed: int | None = None  # Domain R: the Domain U it manages
    mapped: dict[int, bool] = field(default_factory=dict)  # Domain R: pfn -> writable
    paused: bool = False

    def dirty_view(self) -> np.ndarray:
        assert self.dirty is not None
        return np.frombuffer(self.dirty, dtype=np.uint8)


class Hypervisor:
    def __init__(self, host: str, *, may_write: bool = True) -> None:
        self.host = host
        self.may_write_enabled = may_write
        self.domains: dict[int, Domain] = {}
        self.evtchn = EventChannels()
        self.xenstore = XenStore()
        self.lock = threading.RLock()
        self._next_domid = 1

    # -- domains ----------------------------------------------------------------------

    def _new_domid(self) -> int:
        domid = self._next_domid
        self._next_domid += 1
        return domid

    def create_domain_u(self, name: str, mem_bytes: int) -> Domain:
        if mem_bytes % PAGE or mem_bytes < 4 * 1024 * 1024:
            raise KeeperError(f"Domain U memory must be a multiple of 4 KiB, >= 4 MiB: {mem_bytes}")
        pages = mem_bytes // PAGE
        with self.lock:
            domid = self._new_domid()
            mem_fd = os.memfd_create(f"keeper-u{domid}-mem", os.MFD_CLOEXEC)
            dirty_fd = os.memfd_create(f"keeper-u{domid}-dirty", os.MFD_CLOEXEC)
            os.ftruncate(mem_fd, mem_bytes)
            os.ftruncate(dirty_fd, pages)
            dom = Domain(domid, name, Kind.U, pages=pages, mem_fd=mem_fd, dirty_fd=dirty_fd,
                         mem=mmap.mmap(mem_fd, mem_bytes), dirty=mmap.mmap(dirty_fd, pages))
            self.domains[domid] = dom
            self.xenstore.write(f"/local/domain/{domid}/name", name)
            return dom

    def create_domain_r(self, name: str, managed: int | None = None) -> Domain:
        with self.lock:
            domid = self._new_domid()
            dom = Domain(domid, name, Kind.R)
            self.domains[domid] = dom
            self.xenstore.write(f"/local/domain/{domid}/name", name)
            if managed is not None:
                self.associate(domid, managed)
            return dom

    def associate(self, r_domid: int, u_domid: int) -> None:
        """Register Domain U as Domain R's managed domain (S1 on the target)."""
        with self.lock:
            r, u = self.domain(r_domid), self.domain(u_domid)
            if r.kind is not Kind.R or u.kind is not Kind.U:
                raise KeeperError(f"associate: {r.name} must be a Domain R, {u.name} a Domain U")
            r.managed = u.domid

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except KeyError:
            raise KeeperError(f"no domain {domid} on host {self.host}") from None

    def by_name(self, name: str, kind: Kind) -> Domain:
        with self.lock:
            for d in self.domains.values():
                if d.name == name and d.kind is kind:
                    return d
        raise KeeperError(f"no Domain {kind.value} named {name!r} on host {self.host}")

    def destroy(self, domid: int) -> None:
        with self.lock:
            dom = self.domains.pop(domid, None)
            if dom is None:
                return
            self.evtchn.close_domain(domid)
            self.xenstore.rm(f"/local/domain/{domid}")
            for other in self.domains.values():
                if other.managed == domid:
                    other.managed = None
                    other.mapped.clear()
            for m in (dom.mem, dom.dirty):
                if m is not None:
                    with contextlib.suppress(BufferError):
                        m.close()
            for fd in (dom.mem_fd, dom.dirty_fd):
                if fd >= 0:
                    os.close(fd)

    # -- grants ------------------------------------------------------------------------

    def map_page(self, r_domid: int, u_domid: int, pfn: int, writable: bool,
                 count: int = 1) -> int:
        """Domain R maps `count` pages of Domain U from `pfn` on. Returns a new fd to
        mmap at pfn*4096: the memfd itself if writable, a read-only reopen of it
        otherwise (so a read-only grant cannot be written, as the MMU would enforce).
        Every page is recorded, as a grant each."""
        with self.lock:
            r = self.domain(r_domid)
            if r.kind is not Kind.R:
                raise KeeperError(f"domain {r_domid} is not a Domain R: it may not map pages")
            if r.managed != u_domid:
                raise KeeperError(f"Domain R {r.name} ({r_domid}) may not map pages of domain "
                                  f"{u_domid}: it manages {r.managed}")
            u = self.domain(u_domid)
            if count < 1 or not 0 <= pfn <= pfn + count - 1 < u.pages:
                raise KeeperError(f"domain {u_domid} has no page {pfn + count - 1} "
                                  f"(it has {u.pages})")
            for p in range(pfn, pfn + count):
                r.mapped[p] = r.mapped.get(p, False) or writable
            flags = os.O_RDWR if writable else os.O_RDONLY
            return os.open(f"/proc/self/fd/{u.mem_fd}", flags | os.O_CLOEXEC)

    def unmap_page(self, r_domid: int, pfn: int) -> None:
        with self.lock:
            self.domain(r_domid).mapped.pop(pfn, None)

    def may_write(self, u_domid: int) -> np.ndarray:
        """PFNs some Domain R has mapped writable (the may-write bitmap, as indices)."""
        with self.lock:
            pfns = {pfn for d in self.domains.values() if d.managed == u_domid
                    for pfn, w in d.mapped.items() if w}
        return np.array(sorted(pfns), dtype=np.int64)

    # -- log-dirty -----------------------------------------------------------------------

    def collect_dirty(self, u_domid: int) -> np.ndarray:
        """PFNs dirtied since the last call (their bytes are cleared before returning,
        and before the caller copies the pages), ORed with may-write when enabled."""
        u = self.domain(u_domid)
        view = u.dirty_view()
        # The guest keeps writing while we look: take a snapshot, then clear only what
        # we saw. A page re-marked between the two is cleared here but copied after
        # the clear, so the copy holds that write; one marked later waits for the
        # next round.
        pfns = np.flatnonzero(view.copy())
        view[pfns] = 0
        if self.may_write_enabled:
            pfns = np.union1d(pfns, self.may_write(u_domid))
        return pfns.astype(np.int64)

    def mark_all_dirty(self, u_domid: int) -> None:
        self.domain(u_domid).dirty_view()[:] = 1

    def page_list(self, u_domid: int) -> int:
        """How many pages Domain U has (its pages are 0..N-1: the 'page list' of S7)."""
        return self.domain(u_domid).pages

    # -- event channels ---------------------------------------------------------------------

    def alloc_unbound(self, domid: int, remote: int) -> int:
        with self.lock:
            self.domain(domid)
            return self.evtchn.alloc_unbound(domid, remote)

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int) -> int:
        with self.lock:
            me = self.domain(domid)
            # a Domain R may take a port its Domain U offered to Dom0 (paper §4.1)
            intercept = me.kind is Kind.R and me.managed == remote_domid
            return self.evtchn.bind_interdomain(domid, remote_domid, remote_port,
                                                may_intercept=intercept)

    def evtchn_fds(self, domid: int, port: int) -> tuple[int, int]:
        with self.lock:
            return self.evtchn.fds(domid, port)

    def ports_of(self, domid: int) -> list[int]:
        """Every event-channel port `domid` allocated (its side of each channel)."""
        with self.lock:
            return sorted(p for (d, p), ch in self.evtchn.channels.items()
                          if d == domid and ch.a.domid == domid and ch.a.port == p)

    def save_evtchns(self, r_domid: int, u_domid: int) -> list[tuple[int, int]]:
        """S4: the port pairs joining R and U, as [(R's port, U's port)]."""
        with self.lock:
            return self.evtchn.pairs_between(r_domid, u_domid)

    def restore_evtchns(self, r_domid: int, u_domid: int,
                        pairs: list[tuple[int, int]]) -> None:
        """S6: re-establish R<->U channels with exactly the same port numbers."""
        with self.lock:
            for r_port, u_port in pairs:
                self.evtchn.alloc_unbound(u_domid, DOM0, port=u_port)
                self.evtchn.bind_interdomain(r_domid, u_domid, u_port, may_intercept=True,
                                             port=r_port)

    # -- XenStore ----------------------------------------------------------------------------

    def xs_read(self, path: str) -> str | None:
        return self.xenstore.read(path)

    def xs_write(self, domid: int, path: str, value: str) -> None:
        """A domain writes only below its own /local/domain/<domid>/ (Dom0 anywhere)."""
        if domid != DOM0 and not path.startswith(f"/local/domain/{domid}/"):
            raise KeeperError(f"domain {domid} may not write {path}")
        self.xenstore.write(path, value)
