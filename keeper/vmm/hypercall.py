"""The hypercall channel: how a domain's process asks its host's hypervisor for things.

One Unix SEQPACKET socket per domain, at a path only root can reach; which socket a
request came through tells us which domain is asking (as the hypervisor knows the
calling domain). A message is msgpack {"op": name, ...args}; the answer is
{"ok": result} or {"error": text}, with any file descriptors (memory to map,
eventfds) attached by SCM_RIGHTS. Calls are rare (setup, restore), so each
connection gets a thread with blocking I/O and the hypervisor's lock does the rest.

Operations: whoami; map(domid, pfn, writable) -> fd; unmap(pfn);
alloc_unbound(remote) -> port; bind_interdomain(remote_domid, remote_port) -> port;
evtchn_fds(port) -> [upcall fd, notify fd]; xs_read(path); xs_write(path, value);
xs_ls(path).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import threading
from pathlib import Path
from typing import Any

import msgpack

from keeper.errors import KeeperError
from keeper.vmm.hypervisor import PAGE, Hypervisor

log = logging.getLogger("keeper.hypercall")
MAX_MSG = 1 << 16


class HypercallServer:
    def __init__(self, hv: Hypervisor, domid: int, path: Path) -> None:
        self.hv, self.domid, self.path = hv, domid, path
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"hc-{domid}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"hc-{self.domid}-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    data = conn.recv(MAX_MSG)
                except OSError:
                    return
                if not data:
                    return
                fds: list[int] = []
                fresh = False
                try:
                    req = msgpack.unpackb(data, raw=False)
                    result, fds, fresh = self._dispatch(req)
                    reply = {"ok": result}
                except (KeeperError, KeyError, TypeError, ValueError) as exc:
                    reply = {"error": str(exc) or type(exc).__name__}
                try:
                    socket.send_fds(conn, [msgpack.packb(reply)], fds)
                except OSError:
                    return
                finally:
                    if fresh:  # map() opened an fd just for this answer
                        for fd in fds:
                            os.close(fd)
        finally:
            self._conns.discard(conn)
            conn.close()

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
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)


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
