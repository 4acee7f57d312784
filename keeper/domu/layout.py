"""Where a Domain U keeps everything in its physical memory (layout version 1).

    pfn 0                superblock: magic, version, the region map below, hostname,
                         console event-channel port, ring_init_count, boot_count,
                         and the vCPU record (workload cursor, ticks, console events)
    pfn 1                console ring (`keeper.xen.console`, struct xencons_interface)
    pfn 2                console state: line buffer, line-discipline state,
                         pending-output queue (output that did not fit in `out`)
    pfn 3 .. 3+J-1       input journal: u64 bytes ever received, u64 overflow flag,
                         then the bytes in order (J = 256 pages by default, 1 MiB)
    pfn 3+J .. 3+J+F-1   read-only file system for `cat`/`ls` (F = 4 pages)
    the rest             workload region (pages the workload dirties)

The region map is written into the superblock at boot and read back on attach, so a
guest migrated to a host running a later keeper still finds its regions. Formatting
writes only the metadata pages: a 2 GiB guest boots without touching its other pages
(and so without dirtying them).

The classes here are views: every property reads or writes guest memory, nothing is
cached, so a fresh view on a copy of the memory sees exactly the same state.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from keeper.domu.memory import PAGE, GuestMemory
from keeper.errors import CheckpointError

MAGIC = b"KEEPERU1"
LAYOUT_VERSION = 2
MIN_BYTES = 4 * 1024 * 1024

SUPERBLOCK_PFN = 0
CONSOLE_RING_PFN = 1
STATE_PFN = 2
JOURNAL_PFN = 3
DEFAULT_JOURNAL_PAGES = 256
FS_PAGES = 4
# The display devices (keeper.domu.display): vkbd page, vfb page, framebuffer page
# directory, tty1 state, tty1 screen, then the 800x600x32 framebuffer itself.
DEV_PAGES = 5 + (800 * 600 * 4 + PAGE - 1) // PAGE

# Superblock (pfn 0) byte offsets.
SB_MAGIC = 0  # 8 bytes
SB_VERSION = 8  # u32
SB_TOTAL_PAGES = 16  # u64
SB_RING_PFN = 24  # u32
SB_STATE_PFN = 28  # u32
SB_JOURNAL_PFN = 32  # u32
SB_JOURNAL_PAGES = 36  # u32
SB_FS_PFN = 40  # u32
SB_FS_PAGES = 44  # u32
SB_WORKLOAD_PFN = 48  # u32
SB_WORKLOAD_PAGES = 52  # u32
SB_DEV_PFN = 56  # u32
SB_DEV_PAGES = 60  # u32
SB_CONSOLE_PORT = 64  # u32, 0 until the frontend binds its event channel
SB_RING_INIT_COUNT = 68  # u32, how often the frontend initialised the ring
SB_BOOT_COUNT = 72  # u32
SB_HOSTNAME_LEN = 76  # u32
SB_HOSTNAME = 80  # HOSTNAME_MAX bytes
HOSTNAME_MAX = 32
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
# vCPU record: the guest's "registers" that matter across a move.
SB_VCPU_WORKLOAD_CURSOR = 128  # u64, next workload page (mod workload pages)
SB_VCPU_TICKS = 136  # u64, workload steps run
SB_VCPU_CONSOLE_EVENTS = 144  # u64, console services run

# Console state (pfn 2) byte offsets.
ST_LINE_LEN = 0  # u32
ST_PENDING_LEN = 4  # u32
ST_LDISC = 8  # u32, line-discipline state (keeper.domu.guestos.Ldisc)
ST_DROPPED = 16  # u64, output bytes dropped because the pending queue was full
# a running job streams its output over many steps (e.g. `seq 1 1000000`)
ST_JOB = 24  # u32, 0: none, 1: seq
ST_JOB_NEXT = 32  # u64, the next number to print
ST_JOB_LAST = 40  # u64, the last number to print
ST_LINE = 64
LINE_CAP = 1024
ST_PENDING = 1152
PENDING_CAP = PAGE - ST_PENDING  # 2944 bytes

# Journal header (first page of the journal region).
JR_COUNT = 0  # u64, bytes ever received
JR_OVERFLOW = 8  # u64, 1 once a byte did not fit
JR_DATA = 16

# File system region.
FS_MAGIC = b"KFS1"


@dataclass(frozen=True, slots=True)
class Layout:
    """The region map: what the superblock says, cached as constants."""

    total_pages: int
    ring_pfn: int
    state_pfn: int
    journal_pfn: int
    journal_pages: int
    fs_pfn: int
    fs_pages: int
    workload_pfn: int
    workload_pages: int
    dev_pfn: int = 0
    dev_pages: int = 0

    @property
    def journal_capacity(self) -> int:
        return self.journal_pages * PAGE - JR_DATA

    @property
    def metadata_pfns(self) -> range:
        """Every pfn below the workload region (what boot may write)."""
        return range(0, self.workload_pfn)

    @classmethod
    def plan(cls, total_pages: int, journal_pages: int = DEFAULT_JOURNAL_PAGES) -> Layout:
        """The layout for a fresh guest of `total_pages` pages."""
        if total_pages * PAGE < MIN_BYTES:
            raise ValueError(f"a guest needs at least {MIN_BYTES} bytes, got {total_pages * PAGE}")
        if journal_pages < 1:
            raise ValueError("the journal needs at least one page")
        fs_pfn = JOURNAL_PFN + journal_pages
        dev_pfn = fs_pfn + FS_PAGES
        workload_pfn = dev_pfn + DEV_PAGES
        if workload_pfn >= total_pages:
            raise ValueError(f"{total_pages} pages leave no workload region")
        return cls(
            total_pages=total_pages,
            ring_pfn=CONSOLE_RING_PFN,
            state_pfn=STATE_PFN,
            journal_pfn=JOURNAL_PFN,
            journal_pages=journal_pages,
            fs_pfn=fs_pfn,
            fs_pages=FS_PAGES,
            workload_pfn=workload_pfn,
            workload_pages=total_pages - workload_pfn,
            dev_pfn=dev_pfn,
            dev_pages=DEV_PAGES,
        )

    @classmethod
    def load(cls, mem: GuestMemory) -> Layout:
        """Read and validate the superblock's region map; reads only, writes nothing."""
        if mem.pages * PAGE < MIN_BYTES:
            raise CheckpointError(f"guest memory of {mem.pages} pages is below the minimum")
        magic = mem.read(SB_MAGIC, len(MAGIC))
        if magic != MAGIC:
            raise CheckpointError(f"no keeper guest superblock (magic {magic!r})")
        version = mem.u32(SB_VERSION)
        if version != LAYOUT_VERSION:
            raise CheckpointError(f"guest layout version {version}, expected {LAYOUT_VERSION}")
        total = mem.u64(SB_TOTAL_PAGES)
        if total != mem.pages:
            raise CheckpointError(f"superblock says {total} pages, memory has {mem.pages}")
        got = cls(
            total_pages=total,
            ring_pfn=mem.u32(SB_RING_PFN),
            state_pfn=mem.u32(SB_STATE_PFN),
            journal_pfn=mem.u32(SB_JOURNAL_PFN),
            journal_pages=mem.u32(SB_JOURNAL_PAGES),
            fs_pfn=mem.u32(SB_FS_PFN),
            fs_pages=mem.u32(SB_FS_PAGES),
            workload_pfn=mem.u32(SB_WORKLOAD_PFN),
            workload_pages=mem.u32(SB_WORKLOAD_PAGES),
            dev_pfn=mem.u32(SB_DEV_PFN),
            dev_pages=mem.u32(SB_DEV_PAGES),
        )
        ordered = (
            0 < got.ring_pfn < got.state_pfn < got.journal_pfn
            and got.journal_pages >= 1
            and got.fs_pfn == got.journal_pfn + got.journal_pages
            and got.dev_pfn == got.fs_pfn + got.fs_pages
            and got.workload_pfn == got.dev_pfn + got.dev_pages
            and got.workload_pages >= 1
            and got.workload_pfn + got.workload_pages == total
        )
        if not ordered:
            raise CheckpointError(f"guest superblock holds an inconsistent region map: {got}")
        return got

    def store(self, mem: GuestMemory) -> None:
        """Write the region map (and magic, version) into the superblock."""
        head = bytearray(SB_CONSOLE_PORT)
        head[SB_MAGIC : SB_MAGIC + len(MAGIC)] = MAGIC
        struct.pack_into("<I", head, SB_VERSION, LAYOUT_VERSION)
        struct.pack_into("<Q", head, SB_TOTAL_PAGES, self.total_pages)
        struct.pack_into(
            "<8I",
            head,
            SB_RING_PFN,
            self.ring_pfn,
            self.state_pfn,
            self.journal_pfn,
            self.journal_pages,
            self.fs_pfn,
            self.fs_pages,
            self.workload_pfn,
            self.workload_pages,
        )
        struct.pack_into("<2I", head, SB_DEV_PFN, self.dev_pfn, self.dev_pages)
        mem.write(SUPERBLOCK_PFN * PAGE, bytes(head))


class _Field:
    """A little-endian integer at a fixed offset of a view's page."""

    def __init__(self, off: int, fmt: str) -> None:
        self.off = off
        self.fmt = struct.Struct(fmt)

    def __get__(self, view: Any, owner: type | None = None) -> int:
        return self.fmt.unpack(view.mem.read(view.base + self.off, self.fmt.size))[0]

    def __set__(self, view: Any, value: int) -> None:
        view.mem.write(view.base + self.off, self.fmt.pack(value))


def _u32(off: int) -> Any:
    return _Field(off, "<I")


def _u64(off: int) -> Any:
    return _Field(off, "<Q")


class Superblock:
    """The mutable superblock fields (the region map is `Layout`)."""

    console_port: int = _u32(SB_CONSOLE_PORT)
    ring_init_count: int = _u32(SB_RING_INIT_COUNT)
    boot_count: int = _u32(SB_BOOT_COUNT)
    workload_cursor: int = _u64(SB_VCPU_WORKLOAD_CURSOR)
    ticks: int = _u64(SB_VCPU_TICKS)
    console_events: int = _u64(SB_VCPU_CONSOLE_EVENTS)

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.base = SUPERBLOCK_PFN * PAGE

    @property
    def hostname(self) -> str:
        n = min(self.mem.u32(self.base + SB_HOSTNAME_LEN), HOSTNAME_MAX)
        return self.mem.read(self.base + SB_HOSTNAME, n).decode("ascii", "replace")

    @hostname.setter
    def hostname(self, name: str) -> None:
        if not _HOSTNAME.fullmatch(name):
            raise ValueError(f"hostname must be 1..{HOSTNAME_MAX} of [A-Za-z0-9._-]: {name!r}")
        raw = name.encode("ascii")
        self.mem.write(self.base + SB_HOSTNAME, raw.ljust(HOSTNAME_MAX, b"\0"))
        self.mem.set_u32(self.base + SB_HOSTNAME_LEN, len(raw))


class ConsoleState:
    """The console's line buffer, line-discipline state and pending-output queue."""

    line_len: int = _u32(ST_LINE_LEN)
    pending_len: int = _u32(ST_PENDING_LEN)
    ldisc: int = _u32(ST_LDISC)
    dropped: int = _u64(ST_DROPPED)
    job: int = _u32(ST_JOB)
    job_next: int = _u64(ST_JOB_NEXT)
    job_last: int = _u64(ST_JOB_LAST)

    def __init__(self, mem: GuestMemory, pfn: int) -> None:
        self.mem = mem
        self.base = pfn * PAGE

    def format(self) -> None:
        self.mem.write(self.base, bytes(ST_LINE))

    def validate(self) -> None:
        if self.line_len > LINE_CAP or self.pending_len > PENDING_CAP:
            raise CheckpointError(
                f"console state damaged: line {self.line_len}, pending {self.pending_len}"
            )

    @property
    def line(self) -> bytes:
        return self.mem.read(self.base + ST_LINE, self.line_len)

    def line_append(self, data: bytes) -> int:
        """Append what fits of `data` to the line; return how many bytes fitted."""
        n = self.line_len
        take = data[: LINE_CAP - n]
        if take:
            self.mem.write(self.base + ST_LINE + n, take)
            self.line_len = n + len(take)
        return len(take)

    @property
    def pending(self) -> bytes:
        return self.mem.read(self.base + ST_PENDING, self.pending_len)

    @pending.setter
    def pending(self, data: bytes) -> None:
        if len(data) > PENDING_CAP:
            raise ValueError("pending output exceeds its area")
        if data:
            self.mem.write(self.base + ST_PENDING, data)
        self.pending_len = len(data)


class Journal:
    """The input journal: every byte the guest took from its console, in order.

    Bytes beyond the region's capacity are counted but not kept, and the overflow
    flag says so; what is kept is always a prefix of what was received.
    """

    count: int = _u64(JR_COUNT)
    overflow: int = _u64(JR_OVERFLOW)

    def __init__(self, mem: GuestMemory, pfn: int, pages: int) -> None:
        self.mem = mem
        self.base = pfn * PAGE
        self.capacity = pages * PAGE - JR_DATA

    def format(self) -> None:
        self.mem.write(self.base, bytes(JR_DATA))  # the data pages stay untouched

    def append(self, data: bytes) -> None:
        n = self.count
        kept = data[: max(self.capacity - n, 0)]
        if kept:
            self.mem.write(self.base + JR_DATA + n, kept)  # bytes before the count
        if len(kept) < len(data) and not self.overflow:
            self.overflow = 1
        self.count = n + len(data)

    def kept(self) -> int:
        return min(self.count, self.capacity)

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        """Kept bytes [start, end) (slice semantics, clamped to what is kept)."""
        kept = self.kept()
        lo, hi, _ = slice(start, end).indices(kept)
        return self.mem.read(self.base + JR_DATA + lo, hi - lo) if hi > lo else b""


# -- the read-only file system: magic, u32 count, then (u16 path, u32 size, path, data)


def format_fs(mem: GuestMemory, pfn: int, pages: int, files: dict[str, bytes]) -> None:
    """Write `files` (absolute path -> contents) into the file system region."""
    blob = bytearray(FS_MAGIC + struct.pack("<I", len(files)))
    for path, data in files.items():
        raw = path.encode()
        if not raw.startswith(b"/"):
            raise ValueError(f"file system paths are absolute: {path!r}")
        blob += struct.pack("<HI", len(raw), len(data)) + raw + data
    if len(blob) > pages * PAGE:
        raise ValueError(f"files need {len(blob)} bytes, the region holds {pages * PAGE}")
    mem.write(pfn * PAGE, bytes(blob))


def read_fs(mem: GuestMemory, pfn: int, pages: int) -> dict[str, bytes]:
    """The files of the file system region, in the order they were written."""
    region = mem.read(pfn * PAGE, pages * PAGE)
    if region[:4] != FS_MAGIC:
        raise CheckpointError("guest file system region is damaged")
    files: dict[str, bytes] = {}
    try:
        (count,) = struct.unpack_from("<I", region, 4)
        pos = 8
        for _ in range(count):
            plen, dlen = struct.unpack_from("<HI", region, pos)
            pos += 6
            if pos + plen + dlen > len(region):
                raise ValueError("entry runs past the region")
            files[region[pos : pos + plen].decode()] = region[pos + plen : pos + plen + dlen]
            pos += plen + dlen
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"guest file system region is damaged: {exc}") from exc
    return files
