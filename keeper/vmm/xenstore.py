"""XenStore-lite: the key/value tree frontends and backends use for their handshake.

Paths look like Xen's: /local/domain/<domid>/console/ring-ref, .../port,
/local/domain/<domid>/device/vkbd/0/state. Values are strings. XenBus states as in
xen/include/public/io/xenbus.h.
"""

from __future__ import annotations

import enum
import threading

from keeper.errors import KeeperError


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class XenStore:
    def __init__(self) -> None:
        self._tree: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _check(path: str) -> str:
        if not path.startswith("/") or "//" in path or (path.endswith("/") and path != "/"):
            raise KeeperError(f"xenstore: bad path {path!r}")
        return path

    def read(self, path: str) -> str | None:
        with self._lock:
            return self._tree.get(self._check(path))

    def write(self, path: str, value: str) -> None:
        with self._lock:
            self._tree[self._check(path)] = str(value)

    def ls(self, path: str) -> list[str]:
        prefix = self._check(path).rstrip("/") + "/"
        with self._lock:
            return sorted({k[len(prefix):].split("/", 1)[0] for k in self._tree
                           if k.startswith(prefix)})

    def rm(self, path: str) -> None:
        """Remove `path` and everything below it."""
        path = self._check(path)
        with self._lock:
            for k in [k for k in self._tree if k == path or k.startswith(path + "/")]:
                del self._tree[k]

    def subtree(self, path: str) -> dict[str, str]:
        prefix = self._check(path).rstrip("/") + "/"
        with self._lock:
            return {k: v for k, v in self._tree.items() if k.startswith(prefix)}
