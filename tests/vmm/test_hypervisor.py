"""The simulated hypervisor: grants, may-write, event channels, XenStore, log-dirty,
and the hypercall channel (real Unix sockets, fds passed by SCM_RIGHTS). No root."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from keeper.domu.memory import GuestMemory
from keeper.errors import KeeperError
from keeper.vmm.hypercall import HypercallClient, HypercallServer
from keeper.vmm.hypervisor import PAGE, Hypervisor

MB = 1 << 20


@pytest.fixture
def hv() -> Hypervisor:
    return Hypervisor("test")


def test_domain_r_maps_only_its_own_domain_u(hv: Hypervisor) -> None:
    u1, u2 = hv.create_domain_u("g1", 4 * MB), hv.create_domain_u("g2", 4 * MB)
    r = hv.create_domain_r("g1", managed=u1.domid)
    fd = hv.map_page(r.domid, u1.domid, 5, writable=True)
    os.close(fd)
    with pytest.raises(KeeperError, match="may not map pages of domain"):
        hv.map_page(r.domid, u2.domid, 5, writable=True)
    with pytest.raises(KeeperError, match="is not a Domain R"):
        hv.map_page(u2.domid, u1.domid, 5, writable=False)
    with pytest.raises(KeeperError, match="has no page"):
        hv.map_page(r.domid, u1.domid, u1.pages, writable=False)


def test_mapping_shares_memory_and_read_only_is_enforced(hv: Hypervisor) -> None:
    u = hv.create_domain_u("g", 4 * MB)
    r = hv.create_domain_r("g", managed=u.domid)
    fd = hv.map_page(r.domid, u.domid, 7, writable=True)
    page = mmap.mmap(fd, PAGE, offset=7 * PAGE)
    os.close(fd)
    page[:5] = b"hello"
    assert u.mem is not None and u.mem[7 * PAGE:7 * PAGE + 5] == b"hello"
    fd = hv.map_page(r.domid, u.domid, 8, writable=False)
    with pytest.raises(PermissionError):
        mmap.mmap(fd, PAGE, offset=8 * PAGE)  # a read-only grant cannot be mapped writable
    ro = mmap.mmap(fd, PAGE, prot=mmap.PROT_READ, offset=8 * PAGE)
    os.close(fd)
    assert ro[:1] == b"\0"
    page.close()
    ro.close()


def test_dirty_log_sees_guest_writes_and_may_write_adds_domain_r_pages(hv: Hypervisor) -> None:
    u = hv.create_domain_u("g", 4 * MB)
    r = hv.create_domain_r("g", managed=u.domid)
    assert u.mem is not None and u.dirty is not None
    guest = GuestMemory(u.mem, u.dirty)
    guest.write(3 * PAGE + 10, b"x" * PAGE)  # spans pages 3 and 4
    os.close(hv.map_page(r.domid, u.domid, 9, writable=True))
    os.close(hv.map_page(r.domid, u.domid, 11, writable=False))
    assert list(hv.collect_dirty(u.domid)) == [3, 4, 9]  # 9: may-write; 11 is read-only
    assert list(hv.collect_dirty(u.domid)) == [9]  # the log was cleared; may-write stays
    hv.may_write_enabled = False
    guest.write(20 * PAGE, b"y")
    assert list(hv.collect_dirty(u.domid)) == [20]  # without the extension, R's page is unseen


def test_event_channels_intercept_notify_and_come_back_with_the_same_ports(
    hv: Hypervisor,
) -> None:
    u = hv.create_domain_u("g", 4 * MB)
    r = hv.create_domain_r("g", managed=u.domid)
    other = hv.create_domain_r("x")
    hv.alloc_unbound(u.domid, 0)  # port 1, unused
    u_port = hv.alloc_unbound(u.domid, 0)  # offered to Dom0 ...
    with pytest.raises(KeeperError, match="offered to domain 0"):
        hv.bind_interdomain(other.domid, u.domid, u_port)  # not ours to take
    r_port = hv.bind_interdomain(r.domid, u.domid, u_port)  # ... Domain R takes it
    u_up, u_notify = hv.evtchn_fds(u.domid, u_port)
    r_up, r_notify = hv.evtchn_fds(r.domid, r_port)
    os.eventfd_write(u_notify, 1)
    assert os.eventfd_read(r_up) == 1
    os.eventfd_write(r_notify, 3)
    assert os.eventfd_read(u_up) == 3
    pairs = hv.save_evtchns(r.domid, u.domid)
    assert pairs == [(r_port, u_port)]

    target = Hypervisor("target")
    u2 = target.create_domain_u("g", 4 * MB)
    r2 = target.create_domain_r("g", managed=u2.domid)
    target.restore_evtchns(r2.domid, u2.domid, pairs)
    assert target.save_evtchns(r2.domid, u2.domid) == pairs
    _, notify = target.evtchn_fds(u2.domid, u_port)
    os.eventfd_write(notify, 1)
    assert os.eventfd_read(target.evtchn_fds(r2.domid, r_port)[0]) == 1


def test_xenstore_writes_stay_in_the_callers_subtree(hv: Hypervisor) -> None:
    u = hv.create_domain_u("g", 4 * MB)
    hv.xs_write(u.domid, f"/local/domain/{u.domid}/console/port", "2")
    assert hv.xs_read(f"/local/domain/{u.domid}/console/port") == "2"
    with pytest.raises(KeeperError, match="may not write"):
        hv.xs_write(u.domid, "/local/domain/0/backend/console", "evil")


def test_hypercalls_over_a_real_socket(hv: Hypervisor, tmp_path: Path) -> None:
    u = hv.create_domain_u("g", 4 * MB)
    r = hv.create_domain_r("g", managed=u.domid)
    other = hv.create_domain_u("h", 4 * MB)
    su = HypercallServer(hv, u.domid, tmp_path / "u.sock")
    sr = HypercallServer(hv, r.domid, tmp_path / "r.sock")
    cu, cr = HypercallClient(su.path), HypercallClient(sr.path)
    try:
        who, _ = cr.call("whoami")
        assert (who["domid"], who["kind"], who["managed"]) == (r.domid, "R", u.domid)
        port, _ = cu.call("alloc_unbound", remote=0)
        cu.call("xs_write", path=f"/local/domain/{u.domid}/console/port", value=str(port))
        assert cr.call("xs_read", path=f"/local/domain/{u.domid}/console/port")[0] == str(port)
        r_port, _ = cr.call("bind_interdomain", remote_domid=u.domid, remote_port=port)
        _, (r_up, r_notify) = cr.call("evtchn_fds", port=r_port)
        _, (u_up, u_notify) = cu.call("evtchn_fds", port=port)
        os.eventfd_write(u_notify, 1)
        assert os.eventfd_read(r_up) == 1
        _, (fd,) = cr.call("map", domid=u.domid, pfn=1, writable=True)
        m = mmap.mmap(fd, PAGE, offset=PAGE)
        m[:3] = b"abc"
        assert u.mem is not None and u.mem[PAGE:PAGE + 3] == b"abc"
        with pytest.raises(KeeperError, match="may not map pages of domain"):
            cr.call("map", domid=other.domid, pfn=1, writable=True)
        with pytest.raises(KeeperError, match="unknown hypercall"):
            cu.call("reboot_the_world")
        for f in (fd, r_up, r_notify, u_up, u_notify):
            os.close(f)
        m.close()
    finally:
        cu.close()
        cr.close()
        su.close()
        sr.close()
    assert not (tmp_path / "u.sock").exists()


def test_collect_is_numpy_fast_path(hv: Hypervisor) -> None:
    u = hv.create_domain_u("g", 64 * MB)
    hv.mark_all_dirty(u.domid)
    pfns = hv.collect_dirty(u.domid)
    assert isinstance(pfns, np.ndarray) and len(pfns) == u.pages
    assert len(hv.collect_dirty(u.domid)) == 0
