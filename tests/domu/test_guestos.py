"""The guest console OS: line discipline, shell, journal, flow control, dirty log,
and the property that matters for migration - a copy of the memory is the guest."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper.domu import layout as lay
from keeper.domu.guestos import CHUNK, GuestOS
from keeper.domu.memory import PAGE, GuestMemory
from keeper.errors import CheckpointError, ProtocolError
from keeper.xen import console as c
from keeper.xen.console import (
    OUT_SIZE,
    RawPage,
    backend_put_input,
    backend_take_output,
    input_pending,
)

MIB = 1024 * 1024
PROMPT = b"guest1:~$ "


@dataclass
class Vm:
    """A booted guest plus a Domain R stand-in: a RawPage on the same buffer."""

    buf: bytearray
    dirty: bytearray
    mem: GuestMemory
    os: GuestOS
    ring: RawPage = field(init=False)

    def __post_init__(self) -> None:
        self.ring = RawPage(self.buf, self.os.layout.ring_pfn * PAGE)

    @classmethod
    def boot(cls, size: int = 4 * MIB, **kw: object) -> Vm:
        buf = bytearray(size)
        dirty = bytearray(size // PAGE)
        mem = GuestMemory(buf, dirty)
        return cls(buf, dirty, mem, GuestOS.boot(mem, **kw))  # type: ignore[arg-type]

    def copy(self) -> Vm:
        """What a live migration delivers: the memory bytes, attached afresh."""
        buf = bytearray(self.buf)
        dirty = bytearray(len(self.dirty))
        mem = GuestMemory(buf, dirty)
        return Vm(buf, dirty, mem, GuestOS.attach(mem))

    def type(self, data: bytes) -> bytes:
        """Feed `data` through the ring, servicing and draining until all is done."""
        out = bytearray()
        rest = data
        while True:
            rest = rest[backend_put_input(self.ring, rest) :]
            self.os.service_console()
            out += backend_take_output(self.ring)
            idle = not rest and not input_pending(self.ring)
            if idle and not self.os.info()["pending_output"]:
                return bytes(out)


@pytest.fixture
def vm() -> Vm:
    v = Vm.boot()
    banner = backend_take_output(v.ring)
    assert banner.endswith(b"\r\n" + PROMPT)
    assert b"Welcome to guest1" in banner
    return v


def test_echo_command(vm: Vm) -> None:
    assert vm.type(b"echo hi\r") == b"echo hi\r\nhi\r\n" + PROMPT


def test_service_returns_whether_anything_moved(vm: Vm) -> None:
    assert vm.os.service_console() is False
    backend_put_input(vm.ring, b"x")
    assert vm.os.service_console() is True
    assert backend_take_output(vm.ring) == b"x"


def test_crlf_is_one_line_end_even_across_calls(vm: Vm) -> None:
    assert vm.type(b"echo a\r\necho b\r") == (
        b"echo a\r\na\r\n" + PROMPT + b"echo b\r\nb\r\n" + PROMPT
    )
    assert vm.type(b"\n") == b""  # second half of the CRLF above
    assert vm.type(b"\n\r") == b"\r\n" + PROMPT + b"\r\n" + PROMPT
    assert vm.type(b"echo c\n") == b"echo c\r\nc\r\n" + PROMPT


def test_backspace_erases_one_character(vm: Vm) -> None:
    assert vm.type(b"\x7f") == b""  # nothing to erase
    out = vm.type(b"echo abx\x7fc\x08d\r")
    assert out == b"echo abx\b \bc\b \bd\r\nabd\r\n" + PROMPT
    assert vm.type("é\x7f".encode()) == "é".encode() + b"\b \b"  # a whole UTF-8 char
    assert vm.os.info()["line_len"] == 0


def test_ctrl_c_discards_the_line(vm: Vm) -> None:
    assert vm.type(b"echo abc\x03") == b"echo abc^C\r\n" + PROMPT
    assert vm.type(b"\r") == b"\r\n" + PROMPT


def test_other_control_bytes_are_journaled_not_echoed(vm: Vm) -> None:
    assert vm.type(b"e\x01cho\x1b\x00 z\r") == b"echo z\r\nz\r\n" + PROMPT
    assert vm.os.journal() == b"e\x01cho\x1b\x00 z\r"


def test_line_is_capped_at_its_buffer(vm: Vm) -> None:
    out = vm.type(b"a" * (lay.LINE_CAP + 50))
    assert out == b"a" * lay.LINE_CAP
    assert vm.os.journal_count() == lay.LINE_CAP + 50
    out = vm.type(b"\r")
    assert out == b"\r\n" + b"a" * lay.LINE_CAP + b": command not found\r\n" + PROMPT


def test_journal_holds_every_byte_in_order(vm: Vm) -> None:
    data = bytes(range(256)) * 5 + b"\r\n\x03\x7f"
    vm.type(data)
    assert vm.os.journal() == data
    assert vm.os.journal_count() == len(data)


def test_journal_overflow_keeps_a_prefix_and_counts_everything() -> None:
    vm = Vm.boot(journal_pages=1)
    backend_take_output(vm.ring)
    data = b"echo 0123456789\r" * 400  # 6400 bytes > 4080 kept
    vm.type(data)
    assert vm.os.journal_count() == len(data)
    assert vm.os.journal() == data[: PAGE - lay.JR_DATA]
    assert vm.os.info()["journal_overflow"] is True
    assert b"the first 4080 kept" in vm.type(b"journal\r")


def test_shell_commands(vm: Vm) -> None:
    assert b"cat" in vm.type(b"help\r") and b"journal" in vm.type(b"help\r")
    assert vm.type(b"cat /etc/hostname\r") == b"cat /etc/hostname\r\nguest1\r\n" + PROMPT
    assert b"This guest is a simulated Xen Domain U." in vm.type(b"cat README\r")
    assert b"cat: /nope: No such file or directory\r\n" in vm.type(b"cat /nope\r")
    assert b"cat: /etc: Is a directory" in vm.type(b"cat /etc\r")
    assert vm.type(b"ls /\r") == b"ls /\r\netc  proc  root\r\n" + PROMPT
    assert vm.type(b"ls\r") == b"ls\r\nREADME\r\n" + PROMPT
    assert b"hostname  motd  os-release" in vm.type(b"ls /etc\r")
    assert b"ls: cannot access 'x'" in vm.type(b"ls x\r")
    assert vm.type(b"uname\r") == b"uname\r\nKeeper\r\n" + PROMPT
    assert b"Keeper guest1 1.0-keeper #1 keeper-domu x86_64\r\n" in vm.type(b"uname -a\r")
    assert b"guest1\r\n" in vm.type(b"uname -n\r")
    assert b"invalid option" in vm.type(b"uname -q\r")
    assert vm.type(b"frob 1 2\r") == b"frob 1 2\r\nfrob: command not found\r\n" + PROMPT
    assert vm.type(b"\r") == b"\r\n" + PROMPT


def test_journal_command_shows_count_and_escaped_tail(vm: Vm) -> None:
    vm.type(b"x\x01\x7f\r")
    n = len(b"x\x01\x7f\r" + b"journal\r")
    out = vm.type(b"journal\r")
    assert f"journal: {n} bytes received\r\n".encode() in out
    assert f"last {n}: x\\x01\\x7f\\rjournal\\r\r\n".encode() in out
    vm.type(b"z" * 300 + b"\x03")
    assert b"last 200: " + b"z" * 191 in vm.type(b"journal\r")


def test_output_larger_than_the_out_ring_drains_over_several_calls(vm: Vm) -> None:
    expected = Vm.boot()
    backend_take_output(expected.ring)
    lines = [b"echo " + b"x" * 1000 + b"\r", b"cat README\r", b"echo " + b"y" * 900 + b"\r"]
    lines += [b"help\r"]
    want = b"".join(expected.type(line) for line in lines)
    assert len(want) > 2 * OUT_SIZE

    # Domain R does not read `out` while the input goes in.
    rest = b"".join(lines)
    for _ in range(50):
        rest = rest[backend_put_input(vm.ring, rest) :]
        vm.os.service_console()
    assert vm.os.info()["pending_output"] > 0  # `out` is full, the rest waits in memory
    assert input_pending(vm.ring) > 0  # and input stalls instead of output being lost

    got = bytearray()
    rounds = 0
    while len(got) < len(want):
        chunk = backend_take_output(vm.ring)
        assert len(chunk) <= OUT_SIZE
        got += chunk
        rest = rest[backend_put_input(vm.ring, rest) :]
        vm.os.service_console()
        rounds += 1
        assert rounds < 100
    assert bytes(got) == want
    assert rounds >= 3
    assert vm.os.info()["dropped_output"] == 0


def test_a_full_pending_queue_drops_the_oldest_output(vm: Vm) -> None:
    data = bytes(i % 251 for i in range(OUT_SIZE + lay.PENDING_CAP + 8))
    vm.os._emit(data)
    assert vm.os.info()["dropped_output"] == 8
    got = bytearray()
    for _ in range(3):
        got += backend_take_output(vm.ring)
        vm.os.service_console()
    assert got == data[:OUT_SIZE] + data[OUT_SIZE + 8 :]


def test_service_limit_bounds_the_input_taken(vm: Vm) -> None:
    backend_put_input(vm.ring, b"echo hello\r")
    vm.os.service_console(limit=3)
    assert vm.os.journal() == b"ech"
    assert backend_take_output(vm.ring) == b"ech"
    vm.os.service_console(limit=0)
    assert vm.os.journal_count() == 3
    vm.os.service_console()
    assert backend_take_output(vm.ring) == b"o hello\r\nhello\r\n" + PROMPT


def test_a_broken_backend_index_is_a_peer_error(vm: Vm) -> None:
    vm.ring.write(c.IN_PROD, struct.pack("<I", 5000))
    with pytest.raises(ProtocolError) as err:
        vm.os.service_console()
    assert err.value.fault == "peer"


def test_dirty_log_sees_guest_writes_not_raw_page_writes(vm: Vm) -> None:
    vm.dirty[:] = bytes(len(vm.dirty))
    vm.mem.write(3 * PAGE - 2, b"abcd")  # straddles pages 2 and 3
    assert [i for i, d in enumerate(vm.dirty) if d] == [2, 3]
    vm.dirty[:] = bytes(len(vm.dirty))
    backend_put_input(vm.ring, b"hi")  # Domain R writes the ring page: not logged
    assert not any(vm.dirty)
    vm.os.service_console()  # the guest moves in_cons and writes `out`: logged
    assert vm.dirty[vm.os.layout.ring_pfn] == 1
    vm.dirty[:] = bytes(len(vm.dirty))
    vm.mem.write(0, b"")
    assert not any(vm.dirty)


def test_guest_memory_bounds_and_page_views() -> None:
    mem = GuestMemory(bytearray(2 * PAGE), bytearray(2))
    with pytest.raises(ValueError):
        mem.read(2 * PAGE - 1, 2)
    with pytest.raises(ValueError):
        mem.write(-1, b"x")
    with pytest.raises(ValueError):
        mem.page(2)
    with pytest.raises(ValueError):
        GuestMemory(bytearray(PAGE + 1))
    with pytest.raises(ValueError):
        GuestMemory(bytearray(2 * PAGE), bytearray(1))
    mem.set_u64(PAGE, 2**64 - 1)
    assert mem.u64(PAGE) == 2**64 - 1
    mem.set_u32(8, 7)
    assert mem.u32(8) == 7
    page = mem.page(1)
    page.write(4090, b"xyz")
    assert mem.read(PAGE + 4090, 3) == b"xyz"
    with pytest.raises(ValueError):
        page.write(4095, b"ab")
    mem.release()


def test_workload_cycles_through_its_region_and_marks_pages(vm: Vm) -> None:
    layout = vm.os.layout
    vm.dirty[:] = bytes(len(vm.dirty))
    vm.os.dirty_workload(layout.workload_pages + 5)
    assert all(vm.dirty[layout.workload_pfn :])
    info = vm.os.info()
    assert (info["workload_cursor"], info["ticks"]) == (5, 1)
    vm.os.dirty_workload(3)
    assert vm.mem.u64((layout.workload_pfn + 6) * PAGE) == 2
    assert vm.copy().os.info()["workload_cursor"] == 8


def test_attach_continues_without_touching_memory(vm: Vm) -> None:
    vm.os.set_console_port(7)
    vm.type(b"echo before\r")
    vm.type(b"echo mid")
    moved = vm.copy()
    assert moved.buf == vm.buf
    assert not any(moved.dirty)  # attach wrote nothing at all
    info = moved.os.info()
    assert (info["ring_init_count"], info["boot_count"], info["console_port"]) == (1, 1, 7)
    assert moved.type(b"dle\r") == b"dle\r\nmiddle\r\n" + PROMPT
    assert moved.os.journal() == b"echo before\recho middle\r"


def test_attach_refuses_what_is_not_a_guest() -> None:
    mem = GuestMemory(bytearray(4 * MIB))
    with pytest.raises(CheckpointError):
        GuestOS.attach(mem)
    vm = Vm.boot()
    vm.mem.set_u32(lay.SB_VERSION, 99)
    with pytest.raises(CheckpointError):
        GuestOS.attach(vm.mem)


def test_reboot_counts_boots_and_ring_inits() -> None:
    vm = Vm.boot()
    again = GuestOS.boot(vm.mem, hostname="other")
    info = again.info()
    assert (info["boot_count"], info["ring_init_count"], info["hostname"]) == (2, 2, "other")
    assert info["journal_count"] == 0


def test_boot_validates_size_and_hostname() -> None:
    with pytest.raises(ValueError):
        GuestOS.boot(GuestMemory(bytearray(MIB)))
    with pytest.raises(ValueError):
        GuestOS.boot(GuestMemory(bytearray(4 * MIB)), hostname="bad name")
    with pytest.raises(ValueError):
        GuestOS.boot(GuestMemory(bytearray(4 * MIB)), hostname="x" * 33)


def test_boot_of_a_large_guest_touches_only_metadata() -> None:
    size = 256 * MIB
    buf = mmap.mmap(-1, size)
    dirty = bytearray(size // PAGE)
    mem = GuestMemory(buf, dirty)
    try:
        os_ = GuestOS.boot(mem, hostname="big")
        layout = os_.layout
        touched = {i for i, d in enumerate(dirty) if d}
        console = {0, layout.ring_pfn, layout.state_pfn, layout.journal_pfn, layout.fs_pfn}
        assert console <= touched
        display = touched - console  # the display region, nothing of the workload
        assert display and min(display) >= layout.dev_pfn
        assert max(display) < layout.workload_pfn
        assert layout.workload_pages == size // PAGE - layout.workload_pfn
        assert layout.ring_pfn == 1 and layout.state_pfn == 2 and layout.journal_pfn == 3
    finally:
        mem.release()
        buf.close()


# -- the checkpoint property -----------------------------------------------------------

TOKENS = [
    b"echo hi",
    b"echo",
    b" ",
    b"ls",
    b"ls /etc",
    b"x",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x7f",
    b"\x08",
    b"\x03",
    b"\x00",
    b"\x1b[A",
    "é".encode(),
    b"a" * 300,
    # whole commands with long output, so `out` fills and the pending queue is used
    b"help\r",
    b"cat README\r",
    b"journal\r",
    b"uname -a\r",
    b"echo " + b"b" * 600 + b"\r",
]
inputs = st.one_of(
    st.integers(5, 80)
    .flatmap(lambda n: st.lists(st.sampled_from(TOKENS), min_size=n, max_size=n))
    .map(b"".join),
    st.binary(max_size=3000),
)
steps = st.integers(2, 30).flatmap(
    lambda n: st.lists(
        st.tuples(
            st.integers(1, 1024),  # bytes Domain R tries to put
            st.sampled_from([None, 0, 1, 7, 100]) | st.integers(0, 2 * CHUNK),  # service limit
            st.sampled_from([False, False, False, True]),  # does Domain R read `out` this step
        ),
        min_size=n,
        max_size=n,
    )
)


Script = list[tuple[int, int | None, bool]]


def run(data: bytes, script: Script, split: int | None) -> tuple[bytes, bytes, dict[str, object]]:
    """Play `script` as Domain R; with `split`, move to a copy of the memory before that step."""
    vm = Vm.boot()
    out = bytearray()
    rest = data
    for i, (put, limit, take) in enumerate(script):
        if i == split:
            vm = vm.copy()  # everything not yet taken from `out` travels in memory
        rest = rest[backend_put_input(vm.ring, rest[:put]) :]
        vm.os.service_console(limit)
        if take:
            out += backend_take_output(vm.ring)
    if split == len(script):
        vm = vm.copy()
    out += vm.type(rest)
    return bytes(out), vm.os.journal(), vm.os.info()


@settings(max_examples=150, deadline=None)
@given(data=inputs, script=steps, where=st.floats(0, 1))
def test_a_copy_of_memory_continues_exactly(
    data: bytes, script: list[tuple[int, int | None, bool]], where: float
) -> None:
    split = round(where * len(script))
    whole = run(data, script, None)
    moved = run(data, script, split)
    assert moved == whole
    assert whole[1] == data  # the journal holds every byte, in order
    assert whole[2]["dropped_output"] == 0


def test_a_copy_taken_with_output_queued_and_input_unread_continues() -> None:
    """The hard case, pinned: pending output in the state page, unread input in `in`,
    unread output in `out` and a half-typed line, all at the moment of the copy."""
    data = b"help\rcat README\recho " + b"z" * 700 + b"\rhelp\recho mid" + b"dle\r"
    script: list[tuple[int, int | None, bool]] = [(len(data) - 4, None, False)] * 4
    script += [(4, None, False)]
    vm = Vm.boot()
    vm.os.service_console()
    backend_put_input(vm.ring, data[:-4])
    vm.os.service_console()
    vm.os.service_console()
    info = vm.os.info()
    assert info["pending_output"] > 0 and input_pending(vm.ring) > 0
    assert run(data, script, 2) == run(data, script, None)
