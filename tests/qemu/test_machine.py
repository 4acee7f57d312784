"""QemuMachine against real QEMU: boot, serial console, keys, journal, live migration.

Each boot costs about 4 s under TCG; the tests boot as few guests as they can."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keeper.errors import MigrationError
from keeper.qemu import journal
from keeper.qemu.image import GuestImage
from keeper.qemu.machine import ACCELS, QemuError, QemuMachine, TcpConsoles, probe_accel
from tests.conftest import unique
from tests.qemu.conftest import (
    BOOT_TIMEOUT,
    Console,
    MachineFactory,
    MigrationNet,
    booted_console,
    pid_alive,
)

pytestmark = pytest.mark.root
MIGRATION_PORT = 4444


async def wait_journal(m: QemuMachine, done: Callable[[list[journal.Record]], bool],
                       timeout: float = 10.0) -> list[journal.Record]:
    deadline = time.monotonic() + timeout
    while not done(records := m.journal_records()):
        assert time.monotonic() < deadline, f"journal never got there: {records[-5:]}"
        await asyncio.sleep(0.05)
    return records


async def test_probe_accel_answers_and_caches(guest_image: GuestImage,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPER_QEMU_ACCEL", raising=False)
    accel = await probe_accel(guest_image)
    assert accel in ACCELS
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        # the probe booted (or tried to boot) the guest under KVM and kept the answer
        assert (guest_image.cache / "accel.json").is_file()
    t0 = time.monotonic()
    assert await probe_accel(guest_image) == accel
    assert time.monotonic() - t0 < 1.0, "the second probe is the cached answer"
    monkeypatch.setenv("KEEPER_QEMU_ACCEL", "tcg")
    assert await probe_accel(guest_image) == "tcg"
    monkeypatch.setenv("KEEPER_QEMU_ACCEL", "xen")
    with pytest.raises(QemuError):
        await probe_accel(guest_image)


async def test_boot_serial_shell_and_journal(machines: MachineFactory,
                                            guest_image: GuestImage) -> None:
    t0 = time.monotonic()
    m = await machines()
    assert m.pid is not None and pid_alive(m.pid)
    assert m.accel in ACCELS
    for sock in m.paths.sockets():
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
    assert stat.S_IMODE(m.paths.dir.stat().st_mode) == 0o700
    console = await booted_console(m)
    boot_s = time.monotonic() - t0
    print(f"boot to prompt: {boot_s:.1f} s ({m.accel})")
    assert stat.S_IMODE(m.paths.journal.stat().st_mode) == 0o600
    assert m.paths.vnc is not None
    vnc = await Console.unix(m.paths.vnc)
    try:
        await vnc.wait_for(b"RFB 003.008\n", timeout=10)
    finally:
        await vnc.close()
    try:
        assert journal.kernel_release(m.journal_records()) == guest_image.release
        assert await m.status() == "running"

        await console.run("echo $((6*7))", b"42")
        # job control: ^C reaches the foreground job because the pty is the shell's ctty
        since = console.mark()
        await console.send(b"sleep 30\r")
        await console.wait_for(b"sleep 30\r\n", since=since)
        await asyncio.sleep(0.3)
        await console.send(b"\x03")
        await console.run("echo after-$((1+1))", b"after-2", timeout=10)
        await console.run("uname -r", guest_image.release.encode())

        # the journal holds exactly the bytes typed, in order (the last record may
        # still be on its way: the shell answers after the relay journals)
        assert journal.serial_bytes(m.journal_records()) == bytes(console.sent)
    finally:
        await console.close()

    pid, sockets = m.pid, m.paths.sockets()
    await m.close()
    await m.close()  # idempotent
    assert not pid_alive(pid)
    assert not any(s.exists() for s in sockets)
    assert m.paths.journal.exists(), "the journal is kept unless asked"


async def test_keys_on_tty1_are_journaled(machines: MachineFactory, tmp_path: Path) -> None:
    m = await machines()
    console = await booted_console(m)
    try:
        # typed on the VGA console's keyboard; the tty1 shell answers on ttyS0
        text = "echo vt-$((6*7)) >/dev/ttyS0\n"
        since = console.mark()
        for chord in journal.qcodes_for(text):
            await m.send_key(*chord)
        await console.wait_for(b"vt-42", since=since, timeout=30)

        def typed_and_released(records: list[journal.Record]) -> bool:
            keys = journal.key_events(records)
            return (journal.typed_text(records) == text
                    and sum(k.value == 1 for k in keys) == sum(k.value == 0 for k in keys))

        # the VT ran the shell's line on Enter's press, in the kernel; keeper-guest
        # journals the evdev events a moment later
        records = await wait_journal(m, typed_and_released)
        assert not any(isinstance(r, journal.Dropped) for r in records)
        assert journal.key_events(records)[0] == journal.Key(18, 1)  # KEY_E pressed
        assert journal.serial_bytes(records) == b""

        shot = await m.screendump(tmp_path / "screen.ppm")
        header = shot.read_bytes()[:15]
        assert header.startswith(b"P6\n720 400\n"), header
    finally:
        await console.close()


async def test_start_failure_leaves_nothing(guest_image: GuestImage) -> None:
    broken = dataclasses.replace(guest_image, kernel=Path("/nonexistent/vmlinuz"))
    m = QemuMachine(broken, name=unique("kq"), accel="tcg")
    with pytest.raises(QemuError, match="exited"):
        await m.start()
    assert m.pid is not None and not pid_alive(m.pid)
    assert not m.paths.qmp.exists()
    await m.close(keep_journal=False)
    assert not m.paths.dir.exists()


ABANDON = """
import asyncio, os, signal, sys
from pathlib import Path
from keeper.qemu import image
from keeper.qemu.machine import QemuMachine

async def main():
    m = QemuMachine(image.load(), name="abandoned", run_dir=Path(sys.argv[1]))
    await m.start()
    print(m.pid, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return m

machine = asyncio.run(main())  # still referenced at exit: only the safety net stops it
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
async def test_no_qemu_outlives_its_owner(guest_image: GuestImage, tmp_path: Path,
                                          how: str) -> None:
    """A caller that exits without close() (atexit finalizer), or is SIGKILLed (QEMU's
    parent-death signal), leaves no QEMU behind."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ABANDON, str(tmp_path / "run"), how,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    pid = int(out.split()[0])
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"QEMU {pid} outlived its owner ({how})"
        await asyncio.sleep(0.05)


async def test_baseline_tcp_consoles(machines: MachineFactory, migration_net: MigrationNet
                                     ) -> None:
    # as libvirt/OpenStack set it up: QEMU's own VNC server and serial on a host address
    ns = migration_net.source
    consoles = TcpConsoles(migration_net.source_addr, vnc_display=1, serial_port=4555)
    m = await machines(tcp_consoles=consoles, netns=ns)
    assert m.paths.serial is None and m.paths.vnc is None
    console = await Console.tcp(consoles.host, consoles.serial_port, ns)
    vnc = await Console.tcp(consoles.host, consoles.vnc_port, ns)
    try:
        await vnc.wait_for(b"RFB 003.008\n", timeout=10)
        await m.wait_booted(BOOT_TIMEOUT)
        await console.wait_for(b"# ", timeout=BOOT_TIMEOUT)
        await console.run("echo $((6*7))", b"42")
    finally:
        await console.close()
        await vnc.close()


async def _prepare_migration(machines: MachineFactory, net: MigrationNet
                             ) -> tuple[QemuMachine, QemuMachine, Console]:
    src = await machines(name=unique("kqs"), netns=net.source)
    dst = await machines(name=unique("kqt"), netns=net.target, incoming=True, accel=src.accel)
    console = await booted_console(src)
    for m in (src, dst):
        await m.set_capabilities(pause_before_switchover=True, return_path=True)
    await src.set_downtime_limit(50)
    assert await dst.status() == "inmigrate"
    await dst.migrate_incoming(f"tcp:{net.target_addr}:{MIGRATION_PORT}")
    return src, dst, console


async def test_live_migration_keeps_the_shell_and_the_journal(
        machines: MachineFactory, migration_net: MigrationNet) -> None:
    src, dst, console = await _prepare_migration(machines, migration_net)
    try:
        await console.run("echo before-$((6*7))", b"before-42")
        t0 = time.monotonic()
        await src.migrate(f"tcp:{migration_net.target_addr}:{MIGRATION_PORT}")
        await src.wait_migration("pre-switchover", timeout=60)
        t_pre = time.monotonic()
        assert await src.status() == "finish-migrate"  # stopped for the switchover
        await src.migrate_continue("pre-switchover")
        info = await src.wait_migration("completed", timeout=30)
        t_done = time.monotonic()
        await dst.wait_migration("completed", timeout=30)
        assert await dst.status() == "paused"  # -S holds it until we say cont
        downtime = await src.downtime_ms()
        print(f"migration: pre-copy {t_pre - t0:.2f} s, switchover {t_done - t_pre:.3f} s, "
              f"QEMU downtime {downtime} ms, total {info.get('total-time')} ms, "
              f"{info['ram']['transferred'] / 1e6:.0f} MB")
        assert downtime is not None and downtime >= 0
    finally:
        await console.close()

    target_console = await Console.unix(dst.paths.serial)
    try:
        await dst.cont()
        assert await dst.status() == "running"
        await target_console.run("echo after-$((6*7))", b"after-42")
        both = journal.read(src.paths.journal, dst.paths.journal)
        assert journal.serial_bytes(both) == bytes(console.sent) + bytes(target_console.sent)
        assert journal.kernel_release(journal.read(dst.paths.journal)) is None, \
            "the target continues the guest, it does not boot it"
    finally:
        await target_console.close()
    await src.close()


async def test_cancel_at_pre_switchover_keeps_the_source(
        machines: MachineFactory, migration_net: MigrationNet) -> None:
    src, _dst, console = await _prepare_migration(machines, migration_net)
    try:
        await src.migrate(f"tcp:{migration_net.target_addr}:{MIGRATION_PORT}")
        await src.wait_migration("pre-switchover", timeout=60)
        await src.migrate_cancel()
        await src.wait_migration("cancelled", timeout=30)
        with pytest.raises(MigrationError, match="cancelled"):
            await src.wait_migration("completed", timeout=1)
        if await src.status() != "running":
            await src.cont()
        assert await src.status() == "running"
        await console.run("echo still-$((6*7))", b"still-42")
        assert journal.serial_bytes(src.journal_records()) == bytes(console.sent)
    finally:
        await console.close()
