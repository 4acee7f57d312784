"""The guest image: a Debian cloud kernel and a busybox initramfs, built from Debian packages.

`build()` is idempotent and cached: it hashes its inputs (the kernel package's name
and version, busybox, the guest sources under `guest/`, the command line) and does
nothing when the cache already holds an image of that key. The kernel is fetched with
`apt-get download` and unpacked with `dpkg -x` into a scratch directory (never
installed on the host); busybox comes from `busybox-static`; `keeper-guest` (the input
journal and serial relay, `guest/keeper-guest.c`) is compiled static with Debian's gcc.

The initramfs is a gzip'd cpio (newc) written here, byte-for-byte reproducible:

    /init                  guest/init (busybox sh)
    /bin/busybox           static, applets installed by /init
    /bin/keeper-guest      static
    /dev/console           so the kernel can give /init its console before devtmpfs
    /lib/modules/*.ko      modules the kernel lacks built in (evdev), `load` lists them

CLI: ``python -m keeper.qemu.image [--cache DIR] [--force]`` prints the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from keeper.errors import KeeperError

DEFAULT_CACHE = Path("/var/cache/keeper/guest")
CMDLINE = "console=ttyS0 panic=-1 quiet"
META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
GUEST_DIR = Path(__file__).with_name("guest")
# Bump when the layout of the initramfs changes in a way the inputs don't show.
BUILDER_VERSION = 1
FORMAT = 1

# What the guest needs built in; a kernel without them would boot to nothing useful.
REQUIRED_CONFIG = (
    "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP", "CONFIG_DEVTMPFS", "CONFIG_UNIX98_PTYS",
    "CONFIG_SERIAL_8250", "CONFIG_VT", "CONFIG_VGA_CONSOLE", "CONFIG_SERIO_I8042",
    "CONFIG_KEYBOARD_ATKBD",
)
# Config options whose driver may be a module; /init loads it from the initramfs.
MODULE_CONFIG = {"CONFIG_INPUT_EVDEV": "evdev"}


class ImageError(KeeperError):
    """The guest image could not be built (a missing tool or package, a bad kernel)."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built image in `cache`; what QEMU needs to boot it and what it was made of."""

    cache: Path
    kernel: Path
    initrd: Path
    release: str  # the kernel release, e.g. 6.1.0-50-cloud-amd64
    package: str  # the Debian package it came from
    version: str  # that package's version
    cmdline: str
    key: str  # hash of every input; a new key means a rebuild
    modules: tuple[str, ...] = ()

    @property
    def metadata(self) -> Path:
        return self.cache / "image.json"


# what the guest's serial shell prints before each command: busybox ash's prompt
# (PS1 in guest/init); after it, unless keys are already waiting, its line editing
# asks the terminal where the cursor is (TERMINAL_QUERY, which we do not answer)
PROMPT = b"keeper-guest:/root# "
TERMINAL_QUERY = b"\x1b[6n"
# What a typing client of this guest's serial shell needs (keeper.lab.typist.Typist):
# the prompt, the query to ignore, and lines typed only once the prompt is back.
TYPIST = {"noise": TERMINAL_QUERY, "line_sync": True}

def default_cache() -> Path:
    return Path(os.environ.get("KEEPER_GUEST_CACHE") or DEFAULT_CACHE)


def load(cache: Path | None = None) -> GuestImage | None:
    """The image in `cache` as last built, or None if there is none (nothing is built)."""
    cache = Path(cache or default_cache())
    try:
        meta = json.loads((cache / "image.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    try:
        image = GuestImage(
            cache=cache, kernel=cache / meta["kernel"], initrd=cache / meta["initrd"],
            release=meta["release"], package=meta["package"], version=meta["version"],
            cmdline=meta["cmdline"], key=meta["key"], modules=tuple(meta.get("modules", ())),
        )
    except (KeyError, TypeError):
        return None  # a damaged metadata file: build() makes a new one
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def ensure(cache: Path | None = None) -> GuestImage:
    """The image, built first if it is missing or stale."""
    return build(cache)[0]


def build(cache: Path | None = None, *, force: bool = False) -> tuple[GuestImage, bool]:
    """Build the image into `cache` unless an image of the same inputs is there.

    Returns the image and whether anything was built. Safe to run concurrently: a
    lock file serialises builders, and files are replaced by rename.
    """
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        package, version = resolve_kernel_package()
        key = _input_key(package, version)
        have = load(cache)
        if have is not None and have.key == key and not force:
            return have, False
        deb = _download(cache / "debs", package, version)
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            image = _build_into(cache, Path(tmp), deb, package, version, key)
        return image, True


def resolve_kernel_package() -> tuple[str, str]:
    """The real cloud kernel package behind the meta-package, and its candidate version.

    One `apt-cache show` of the meta-package usually says both (it pins the exact
    version it depends on); apt-cache is slow where its binary cache is off.
    """
    out = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE],
               f"look up {META_PACKAGE} (apt-get update?)")
    found = re.search(r"^Depends:.*?\b(linux-image-\S+-cloud-amd64)\b(?:\s*\(=\s*([^)\s]+)\))?",
                      out, re.M)
    if not found:
        raise ImageError(f"{META_PACKAGE} depends on no linux-image-*-cloud-amd64:\n{out}")
    package, version = found.group(1), found.group(2)
    if version is None:
        show = _run(["apt-cache", "show", "--no-all-versions", package], f"look up {package}")
        pinned = re.search(r"^Version:\s*(\S+)", show, re.M)
        if not pinned:
            raise ImageError(f"apt-cache show {package} gives no version")
        version = pinned.group(1)
    return package, version


def _input_key(package: str, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n{package} {version}\n{CMDLINE}\n".encode())
    h.update(_file_digest(BUSYBOX).encode())
    for src in sorted(GUEST_DIR.iterdir()):
        if src.is_file():
            h.update(f"\n{src.name}\n".encode())
            h.update(src.read_bytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror} (install busybox-static: scripts/setup)") from exc


def _download(debs: Path, package: str, version: str) -> Path:
    """The package's .deb, from the cache or `apt-get download` (older ones removed)."""
    debs.mkdir(parents=True, exist_ok=True)
    for old in debs.glob("*.deb"):
        if _deb_field(old, "Package") == package and _deb_field(old, "Version") == version:
            return old
    for old in debs.glob("*.deb"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="dl-", dir=debs) as tmp:
        # apt warns that it downloads unsandboxed as root: harmless, and it is quiet
        # only if _apt may write here, which a root-owned cache must not allow.
        _run(["apt-get", "download", "-q", f"{package}={version}"], f"download {package}",
             cwd=tmp)
        (got,) = Path(tmp).glob("*.deb")
        dest = debs / got.name
        got.rename(dest)
    return dest


def _deb_field(deb: Path, field: str) -> str:
    try:
        return _run(["dpkg-deb", "-f", str(deb), field], f"read {deb.name}").strip()
    except ImageError:
        return ""


def _build_into(cache: Path, tmp: Path, deb: Path, package: str, version: str,
                key: str) -> GuestImage:
    root = tmp / "deb"
    _run(["dpkg", "-x", str(deb), str(root)], f"unpack {deb.name}")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"{deb.name}: expected one /boot/vmlinuz-*, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    config = _read_config(root / "boot" / f"config-{release}")
    missing = [opt for opt in REQUIRED_CONFIG if config.get(opt) != "y"]
    if missing:
        raise ImageError(f"kernel {release} lacks built-in {', '.join(missing)}")
    modroot = root / "lib" / "modules" / release
    modules: list[Path] = []
    for opt, name in MODULE_CONFIG.items():
        if config.get(opt) == "m":
            for mod in _with_dependencies(modroot, name):
                if mod not in modules:
                    modules.append(mod)
        elif config.get(opt) != "y":
            raise ImageError(f"kernel {release} has no {opt}")

    relay = tmp / "keeper-guest"
    _compile(GUEST_DIR / "keeper-guest.c", relay)
    busybox = BUSYBOX.read_bytes()
    if not _is_static_elf(busybox):
        raise ImageError(f"{BUSYBOX} is not static: install busybox-static (scripts/setup)")

    entries = [
        CpioEntry.dir("bin"), CpioEntry.dir("dev"), CpioEntry.dir("proc"),
        CpioEntry.dir("sys"), CpioEntry.dir("tmp", 0o1777), CpioEntry.dir("root", 0o700),
        CpioEntry.dir("lib"), CpioEntry.dir("lib/modules"),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.file("init", (GUEST_DIR / "init").read_bytes(), 0o755),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.file("bin/keeper-guest", relay.read_bytes(), 0o755),
    ]
    if modules:
        entries += [CpioEntry.file(f"lib/modules/{m.name}", m.read_bytes()) for m in modules]
        load_list = "".join(f"{m.name}\n" for m in modules).encode()
        entries.append(CpioEntry.file("lib/modules/load", load_list))
    initrd = gzip.compress(write_cpio(entries), compresslevel=9, mtime=0)

    kernel_name, initrd_name = f"vmlinuz-{release}", "initrd.img"
    _replace(cache / kernel_name, kernels[0].read_bytes())
    _replace(cache / initrd_name, initrd)
    for stale in cache.glob("vmlinuz-*"):
        if stale.name != kernel_name:
            stale.unlink()
    meta = {
        "format": FORMAT, "key": key, "package": package, "version": version,
        "release": release, "kernel": kernel_name, "initrd": initrd_name,
        "cmdline": CMDLINE, "modules": [m.name for m in modules],
    }
    _replace(cache / "image.json", (json.dumps(meta, indent=2) + "\n").encode())
    image = load(cache)
    assert image is not None
    return image


def _read_config(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ImageError(f"kernel config {path.name}: {exc.strerror}") from exc
    return dict(re.findall(r"^(CONFIG_\w+)=(\S+)", text, re.M))


def _with_dependencies(modroot: Path, name: str) -> list[Path]:
    """Module `name` and what it depends on, dependencies first (no modules.dep in a .deb)."""
    def find(mod: str) -> Path:
        for variant in {mod, mod.replace("-", "_"), mod.replace("_", "-")}:
            hits = sorted(modroot.rglob(f"{variant}.ko"))
            if hits:
                return hits[0]
        raise ImageError(f"module {mod}.ko not in {modroot}")

    order: list[Path] = []

    def visit(mod: str, seen: tuple[str, ...]) -> None:
        if mod in seen:
            raise ImageError(f"module dependency loop: {' -> '.join((*seen, mod))}")
        path = find(mod)
        for dep in modinfo(path.read_bytes()).get("depends", "").split(","):
            if dep:
                visit(dep, (*seen, mod))
        if path not in order:
            order.append(path)

    visit(name, ())
    return order


def modinfo(ko: bytes) -> dict[str, str]:
    """key=value strings of a module's .modinfo (enough for depends= and vermagic=)."""
    out: dict[str, str] = {}
    for key in ("depends", "vermagic", "name"):
        found = re.search(rb"(?:^|\0)" + key.encode() + rb"=([^\0]*)\0", ko)
        if found:
            out[key] = found.group(1).decode(errors="replace")
    return out


def _compile(src: Path, out: Path) -> None:
    if shutil.which("gcc") is None:
        raise ImageError("gcc not found: install gcc and libc6-dev (scripts/setup)")
    _run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-o", str(out), str(src)],
         f"compile {src.name} (needs gcc and libc6-dev)")


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF64 executable without an interpreter (PT_INTERP)."""
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3
               for i in range(phnum))


def _replace(path: Path, data: bytes) -> None:
    """Write by rename, so a QEMU starting meanwhile reads the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.rename(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: Sequence[str], step: str, cwd: str | Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False,
                              env={**os.environ, "LC_ALL": "C"})
    except OSError as exc:
        raise ImageError(f"{step}: {argv[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        raise ImageError(f"{step}: {' '.join(argv)} exited {done.returncode}: "
                         f"{done.stderr.strip()}")
    return done.stdout


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive (path without a leading slash)."""

    name: str
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def dir(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def write_cpio(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """A newc ("070701") archive, as the kernel's initramfs unpacker reads it."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, e in enumerate(entries, start=1):
        member(ino, e.name, e.mode, e.data, e.rdev)
    member(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def read_cpio(blob: bytes) -> list[CpioEntry]:
    """The members of a newc archive (for tests and for looking inside an image)."""
    entries, at = [], 0
    while True:
        if blob[at:at + 6] != b"070701":
            raise ImageError(f"cpio: bad magic at {at}")
        f = [int(blob[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        at += 110
        name = blob[at:at + namesize - 1].decode()
        at += namesize
        at += -at % 4
        data = blob[at:at + size]
        at += size
        at += -at % 4
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, data, (f[9], f[10])))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keeper.qemu.image",
                                     description="Build (or find cached) keeper's QEMU guest.")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default {DEFAULT_CACHE}, or $KEEPER_GUEST_CACHE)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        image, built = build(args.cache, force=args.force)
    except ImageError as exc:
        print(f"keeper.qemu.image: {exc}", file=sys.stderr)
        return 1
    print(f"kernel   {image.kernel}")
    print(f"initrd   {image.initrd}")
    print(f"metadata {image.metadata}")
    print(f"release  {image.release}")
    print(f"package  {image.package} {image.version}")
    print("built" if built else "cached (inputs unchanged)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
