"""The hypercall channel: how a domain's process asks its host's hypervisor for things.

One Unix SEQPACKET socket per domain, at a path only root can reach; which socket a
request came through tells us which domain is asking (as the hypervisor knows the
calling domain). A message is msgpack {"op": name, ...args}; the answer is
{"ok": result} or {"error": text}, with any file descriptors (memory to map,
eventfds) attached by SCM_RIGHTS (keeper.net.seqpacket); the hypervisor's lock does
the rest.

Operations: whoami; map(domid, pfn, writable) -> fd; unmap(pfn);
alloc_unbound(remote) -> port; bind_interdomain(remote_domid, remote_port) -> port;
evtchn_fds(port) -> [upcall fd, notify fd]; xs_read(path); xs_write(path, value);
xs_ls(path).
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
from pathlib import Path
from typing import Any

import msgpack

from keeper.errors import KeeperError
from keeper.net.seqpacket import MAX_MSG, SeqpacketServer
from keeper.vmm.hypervisor import PAGE, Hypervisor

log = logging.getLogger("keeper.hypercall")


class HypercallServer:
    def __init__(self, hv: Hypervisor, domid: int, path: Path) -> None:
        self.hv, self.domid, self.path = hv, domid, path
        self._server = SeqpacketServer(path, self._dispatch, name=f"hc-{domid}")

    def _dispatch(self, req: dict[str, Any]) -> tuple[Any, list[int], bool]:
        """(result, fds to pass, whether those fds were opened for this call)."""
        hv, me, op = self.hv, self.domid, req["op"]
        if op == "whoami":
            dom = hv.domain(me)
            return {"domid": me, "name": dom.name, "kind": dom.kind.value,
                    "managed": dom.managed, "host": hv.host}, [], False
        if op == "map":
            fd = hv.map_page(me, int(req["domid"]), int(req["pfn"]), bool(req["writable"]),
                             count=int(req.get("count", 1)))
            return {"pfn": req["pfn"]}, [fd], True
        if op == "unmap":
            hv.unmap_page(me, int(req["pfn"]))
            return None, [], False
        if op == "alloc_unbound":
            return hv.alloc_unbound(me, int(req["remote"])), [], False
        if op == "bind_interdomain":
            port = hv.bind_interdomain(me, int(req["remote_domid"]), int(req["remote_port"]))
            return port, [], False
        if op == "evtchn_fds":
            up, notify = hv.evtchn_fds(me, int(req["port"]))
            return None, [up, notify], False
        if op == "xs_read":
            return hv.xs_read(str(req["path"])), [], False
        if op == "xs_write":
            hv.xs_write(me, str(req["path"]), str(req["value"]))
            return None, [], False
        if op == "xs_ls":
            return hv.xenstore.ls(str(req["path"])), [], False
        raise KeeperError(f"unknown hypercall {op!r}")

    def close(self) -> None:
        """Idempotent: stop accepting, drop connections, remove the socket file."""
        self._server.close()


class HypercallClient:
    """Blocking client, used by the guest and Domain R processes (setup and restore)."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise KeeperError(f"hypercall channel {path}: {exc}") from exc
        self._lock = threading.Lock()

    def call(self, op: str, **args: Any) -> tuple[Any, list[int]]:
        with self._lock:
            try:
                self._sock.send(msgpack.packb({"op": op, **args}))
                data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_MSG, 4)
            except OSError as exc:
                raise KeeperError(f"hypercall {op}: {exc}") from exc
        if not data:
            raise KeeperError(f"hypercall {op}: the hypervisor closed the channel")
        reply = msgpack.unpackb(data, raw=False)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise KeeperError(f"hypercall {op} refused: {reply['error']}")
        return reply["ok"], fds

    def managed_domain(self) -> int:
        """The Domain U this Domain R manages (refused if none)."""
        who, _ = self.call("whoami")
        if who["managed"] is None:
            raise KeeperError(f"Domain R {who['name']} manages no Domain U on {who['host']}")
        return int(who["managed"])

    def map_pages(self, domid: int, pfn: int, count: int = 1, *,
                  writable: bool = False) -> mmap.mmap:
        """Grant-map `count` pages of `domid` from `pfn` on, shared with the guest."""
        _, (fd,) = self.call("map", domid=domid, pfn=pfn, count=count, writable=writable)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(fd, count * PAGE, mmap.MAP_SHARED, prot, offset=pfn * PAGE)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
