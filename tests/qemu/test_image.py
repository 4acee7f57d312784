"""The guest image (cpio writer, build, cache) and the journal format its guest writes.

The cpio and journal tests need neither root nor QEMU; building needs root (the cache
under /var/cache, apt-get download) and the Debian tools scripts/setup installs."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from keeper.qemu import image, journal
from keeper.qemu.image import CpioEntry, GuestImage
from keeper.qemu.journal import Boot, Dropped, JournalError, Key, SerialIn

# ---- cpio ---------------------------------------------------------------------------


def sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry.dir("bin"), CpioEntry.dir("dev"),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
        CpioEntry.file("bin/odd", b"x" * 5),  # forces padding after the data
    ]


def test_cpio_round_trip() -> None:
    blob = image.write_cpio(sample_entries())
    assert len(blob) % 4 == 0
    assert image.read_cpio(blob) == sample_entries()
    assert image.write_cpio(sample_entries()) == blob, "reproducible byte for byte"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_cpio_is_read_by_gnu_cpio() -> None:
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=image.write_cpio(sample_entries()),
                             capture_output=True, check=True).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["bin", "dev", "dev/console", "init", "bin/odd"]
    assert listing.splitlines()[2].startswith("crw-------")


def test_modinfo_and_static_elf() -> None:
    ko = b"\x7fELF junk\0depends=foo,bar\0vermagic=6.1.0-x SMP\0name=evdev\0more"
    assert image.modinfo(ko) == {"depends": "foo,bar", "vermagic": "6.1.0-x SMP",
                                 "name": "evdev"}
    assert not image._is_static_elf(b"#!/bin/sh\n")
    python = Path(shutil.which("python3") or "/usr/bin/python3").resolve()
    assert not image._is_static_elf(python.read_bytes()), "python3 is dynamically linked"


# ---- journal ------------------------------------------------------------------------


def test_journal_parse_and_truncated_last_line() -> None:
    data = b"B 6.1.0-50-cloud-amd64\nS 6563686f0d\nK 30 1\nK 30 0\nD\nS 41"
    records = journal.parse(data)
    assert records == [Boot("6.1.0-50-cloud-amd64"), SerialIn(b"echo\r"), Key(30, 1),
                       Key(30, 0), Dropped()]
    assert journal.kernel_release(records) == "6.1.0-50-cloud-amd64"
    assert journal.serial_bytes(records) == b"echo\r"
    assert journal.format_records(records) == data.rsplit(b"\n", 1)[0] + b"\n"
    assert journal.parse(b"") == []
    assert journal.kernel_release([]) is None


def test_journal_record_split_across_migration_files(tmp_path: Path) -> None:
    # the guest was stopped mid-write: the record ends in the target's file
    (tmp_path / "a").write_bytes(b"B r1\nS 6869")
    (tmp_path / "b").write_bytes(b"0a\nK 28 1\n")
    records = journal.read(tmp_path / "a", tmp_path / "b")
    assert journal.serial_bytes(records) == b"hi\n"
    assert journal.key_events(records) == [Key(28, 1)]


@pytest.mark.parametrize("bad", [b"S zz\n", b"X 1\n", b"K 1\n", b"B\n", b"S 6\n", b"D x\n"])
def test_journal_rejects_a_bad_complete_line(bad: bytes) -> None:
    with pytest.raises(JournalError, match="line 2"):
        journal.parse(b"B r\n" + bad)


def keys_for(text: str) -> list[Key]:
    """Press/release events as QEMU's send-key produces them for `text`."""
    codes = {cap.qcode: cap.code for cap in journal.KEYMAP_US.values()}
    codes["shift"] = journal.KEY_LEFTSHIFT
    out: list[Key] = []
    for chord in journal.qcodes_for(text):
        out += [Key(codes[q], 1) for q in chord]
        out += [Key(codes[q], 0) for q in chord]
    return out


def test_typed_text_us_layout() -> None:
    text = "echo vt-$((6*7)) >/dev/ttyS0 'A_b'|\"~\"\n"
    assert journal.typed_text(keys_for(text)) == text
    # shift held across keys, right shift, autorepeat, ctrl+c, a key without text
    events = [Key(54, 1), Key(30, 1), Key(30, 2), Key(30, 0), Key(54, 0), Key(30, 1),
              Key(30, 0), Key(29, 1), Key(46, 1), Key(46, 0), Key(29, 0), Key(59, 1)]
    assert journal.typed_text(events) == "AAa\x03"
    # after dropped events the shift's state is unknown: not held
    assert journal.typed_text([Key(42, 1), journal.Dropped(), Key(30, 1)]) == "a"
    with pytest.raises(ValueError):
        journal.qcodes_for("é")


# ---- the image ----------------------------------------------------------------------


def _built_image() -> GuestImage:
    for tool in ("apt-get", "dpkg", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: run scripts/setup")
    try:
        built, _ = image.build()
    except image.ImageError as exc:
        pytest.skip(f"cannot build the guest image here: {exc}")
    return built


@pytest.mark.root
def test_image_is_built_and_cached() -> None:
    first = _built_image()
    stamps = {p: p.stat().st_mtime_ns for p in (first.kernel, first.initrd, first.metadata)}
    again, built = image.build()
    assert not built and again == first, "unchanged inputs: nothing to do"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    assert first.kernel.name == f"vmlinuz-{first.release}"
    assert first.release.endswith("-cloud-amd64")
    assert first.package == f"linux-image-{first.release}"
    assert first.cmdline == image.CMDLINE
    members = {e.name: e for e in image.read_cpio(_gunzip(first.initrd))}
    assert {"init", "bin/busybox", "bin/keeper-guest", "dev/console"} <= set(members)
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    assert image._is_static_elf(members["bin/keeper-guest"].data)
    assert image._is_static_elf(members["bin/busybox"].data)
    for mod in first.modules:
        assert f"lib/modules/{mod}" in members
        assert image.modinfo(members[f"lib/modules/{mod}"].data)["vermagic"].startswith(
            first.release + " ")


@pytest.mark.root
def test_build_in_a_fresh_cache_is_reproducible(tmp_path: Path) -> None:
    cached = _built_image()
    # reuse the downloaded .deb: the build itself, not the mirror, is under test
    shutil.copytree(cached.cache / "debs", tmp_path / "debs")
    fresh, built = image.build(tmp_path)
    assert built
    assert fresh.key == cached.key and fresh.release == cached.release
    assert fresh.initrd.read_bytes() == cached.initrd.read_bytes()
    assert fresh.kernel.read_bytes() == cached.kernel.read_bytes()
    assert image.main(["--cache", str(tmp_path)]) == 0


def _gunzip(path: Path) -> bytes:
    import gzip

    return gzip.decompress(path.read_bytes())
