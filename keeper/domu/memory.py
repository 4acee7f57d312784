"""A Domain U's physical memory, seen from inside the guest, with its dirty log.

Every write the guest makes goes through `GuestMemory.write`, which is what plays
the MMU's log-dirty mode: after the bytes are stored, it stores 1 into the dirty-log
byte of each page it touched. The order matters: the migration manager clears a
byte and then copies its page, so a write racing that copy is seen in the next
round. One byte per page and single-byte stores only: the manager clears bytes
concurrently, and a read-modify-write of shared bits could lose its clear or ours.

Writes by Domain R (a `keeper.xen.console.RawPage` over its own mapping) do not go
through here and are never logged: that is the gap D-MORE's may-write bitmap fills.
"""

from __future__ import annotations

import struct

PAGE = 4096

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """Guest-physical memory `mem` (N * 4096 bytes) and its dirty log `dirty` (N bytes).

    `dirty` may be None (no log-dirty mode, e.g. unit tests). Call `release()` before
    closing an mmap passed in: the memoryviews kept here pin it.
    """

    def __init__(self, mem: object, dirty: object | None = None) -> None:
        view = memoryview(mem).cast("B")  # type: ignore[arg-type]
        if view.readonly:
            raise ValueError("guest memory must be writable")
        if len(view) == 0 or len(view) % PAGE:
            raise ValueError(f"guest memory must be a positive multiple of {PAGE}: {len(view)}")
        self._mem = view
        self.pages = len(view) // PAGE
        self._dirty: memoryview | None = None
        if dirty is not None:
            log = memoryview(dirty).cast("B")  # type: ignore[arg-type]
            if log.readonly or len(log) < self.pages:
                raise ValueError(f"dirty log must be writable and hold {self.pages} bytes")
            self._dirty = log

    @property
    def size(self) -> int:
        return len(self._mem)

    def _check(self, addr: int, n: int) -> None:
        if addr < 0 or n < 0 or addr + n > len(self._mem):
            raise ValueError(f"guest access [{addr:#x}, {addr + n:#x}) outside memory")

    def read(self, addr: int, n: int) -> bytes:
        self._check(addr, n)
        return bytes(self._mem[addr : addr + n])

    def write(self, addr: int, data: bytes) -> None:
        """Store `data` at `addr`, then mark every page it touched dirty."""
        n = len(data)
        self._check(addr, n)
        if not n:
            return
        self._mem[addr : addr + n] = data
        log = self._dirty
        if log is not None:
            for pfn in range(addr // PAGE, (addr + n - 1) // PAGE + 1):
                log[pfn] = 1

    def u32(self, addr: int) -> int:
        return _U32.unpack(self.read(addr, 4))[0]

    def set_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value))

    def u64(self, addr: int) -> int:
        return _U64.unpack(self.read(addr, 8))[0]

    def set_u64(self, addr: int, value: int) -> None:
        self.write(addr, _U64.pack(value))

    def page(self, pfn: int) -> GuestPage:
        """A `PageIO` view of page `pfn` whose writes are logged like any guest write."""
        if not 0 <= pfn < self.pages:
            raise ValueError(f"pfn {pfn} outside memory of {self.pages} pages")
        return GuestPage(self, pfn)

    def release(self) -> None:
        """Drop the memoryviews so the mmaps behind them can be closed."""
        self._mem.release()
        if self._dirty is not None:
            self._dirty.release()


class GuestPage:
    """One page of guest memory as a `keeper.xen.console.PageIO`."""

    __slots__ = ("_base", "_mem", "pfn")

    def __init__(self, mem: GuestMemory, pfn: int) -> None:
        self._mem = mem
        self.pfn = pfn
        self._base = pfn * PAGE

    def read(self, off: int, n: int) -> bytes:
        _check_in_page(off, n)
        return self._mem.read(self._base + off, n)

    def write(self, off: int, data: bytes) -> None:
        _check_in_page(off, len(data))
        self._mem.write(self._base + off, data)


def _check_in_page(off: int, n: int) -> None:
    if off < 0 or n < 0 or off + n > PAGE:
        raise ValueError(f"access [{off}, {off + n}) outside the page")
