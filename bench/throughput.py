#!/usr/bin/env python3
"""§5.2: throughput through the remote-management servers, in Domain R (keeper) and
in Dom0 (the baseline): VNC full-screen updates per second per encoding (Raw,
Hextile, ZRLE) while the guest's screensaver redraws the whole 800x600 screen
uncapped (a new frame as soon as the last is drawn), and SSH characters per second
while the guest prints about 10,000,000 characters (`seq`) to its console.

    python bench/throughput.py --seconds 10 --chars 10000000 [--encodings raw] [--no-qemu]
                               [--json]

With QEMU and the guest image installed (./scripts/setup) it also measures the same
updates on a QEMU guest whose VGA text console (720x400) a hex dump keeps scrolling:
keeper (Domain R's server, fed by QEMU's VNC server over its Unix socket) against
QEMU's own VNC server on the host's address, the same client on the same lab path;
`vnc_ratio_vs_qemu` is keeper's full screens per second over QEMU's, per encoding.

Writes bench/out/throughput.json and .png, prints a table. Needs root. The paper
ran OpenSSH's sshd for scale: so do we, on the same lab path, when /usr/sbin/sshd
exists (`apt-get install openssh-server`); it is started only for the measurement,
in the lab's own namespace. With `--json` it ends with one JSON line (issue #13):
`ssh_ratio_vs_openssh` (Domain R path, whole path), `vnc_updates_per_s` per encoding
(simulated guest) and `vnc_ratio_vs_qemu`, each ratio null with the reason when it
was not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from common import finish, lab, need_root, pyplot, save
from ssh_feed import FEED_END

from keeper import demo, ports
from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.typist import SocketLink
from keeper.lab.vncclient import VncTypist
from keeper.vnc import encodings as enc

GUEST = "guest1"
PROMPT = b"guest1:~$ "


def seq_last(chars: int) -> int:
    """The N for which `seq 1 N` prints about `chars` characters (with CR LF)."""
    n, total, digits = 0, 0, 1
    while True:
        block = 9 * 10 ** (digits - 1)
        if total + block * (digits + 2) >= chars:
            return n + (chars - total) // (digits + 2)
        n, total, digits = n + block, total + block * (digits + 2), digits + 1


ENCODINGS = {"raw": enc.RAW, "hextile": enc.HEXTILE, "zrle": enc.ZRLE}


class UpdateReader:
    """The client side of the measurement: reads whole framebuffer updates off an RFB
    connection in the encoding it asked for, keeping one incremental request
    outstanding, as a viewer does. Raw and Hextile are walked tile by tile to find
    their ends; ZRLE's zlib stream is inflated (as a viewer must) but its tiles are not
    painted: what is timed is the server's output, not a Python painter."""

    def __init__(self, t: VncTypist, encoding: str) -> None:
        self.t, self.encoding = t, encoding
        self.inflate = zlib.decompressobj()
        self.frames: list[float] = []
        self.pixels: list[int] = []
        self.nbytes = 0

    async def _read(self, n: int) -> bytes:
        data = await self.t.r.readexactly(n)
        self.nbytes += n
        return data

    async def _hextile(self, w: int, h: int) -> None:
        bg = fg = 4  # 32 bpp: every colour is 4 bytes
        for ty in range(0, h, 16):
            for tx in range(0, w, 16):
                tw, th = min(16, w - tx), min(16, h - ty)
                (sub,) = await self._read(1)
                if sub & 1:  # Raw tile
                    await self._read(tw * th * 4)
                    continue
                head = (bg if sub & 2 else 0) + (fg if sub & 4 else 0)
                if head:
                    await self._read(head)
                if sub & 8:
                    (n,) = await self._read(1)
                    await self._read(n * (6 if sub & 16 else 2))

    async def run(self) -> None:
        r = self.t
        r.w.write(struct.pack(">BxHi", 2, 1, ENCODINGS[self.encoding]))
        r._request()
        await r.w.drain()
        while True:
            (kind,) = await self._read(1)
            if kind != 0:
                raise ConnectionError(f"unexpected server message {kind}")
            (n,) = struct.unpack(">xH", await self._read(3))
            px = 0
            for _ in range(n):
                _x, _y, w, h, code = struct.unpack(">HHHHi", await self._read(12))
                if code == enc.RAW:
                    await self._read(w * h * 4)
                elif code == enc.HEXTILE:
                    await self._hextile(w, h)
                elif code == enc.ZRLE:
                    (length,) = struct.unpack(">I", await self._read(4))
                    self.inflate.decompress(await self._read(length))
                elif code == enc.LAST_RECT:
                    break
                else:
                    raise ConnectionError(f"encoding {code} not asked for")
                px += w * h
            self.frames.append(time.monotonic())
            self.pixels.append(px)
            r._request()
            await r.w.drain()


async def measure(t: VncTypist, encoding: str, seconds: float) -> dict[str, Any]:
    """Updates per second to one real client in `encoding`, over `seconds` after a
    second's warm-up, with one incremental request outstanding."""
    reader = UpdateReader(t, encoding)
    task = asyncio.create_task(reader.run())
    await asyncio.sleep(1.0)  # the screen gets going
    start, count0, bytes0 = time.monotonic(), len(reader.frames), reader.nbytes
    await asyncio.sleep(seconds)
    async with asyncio.timeout(30):  # a slow encoder: at least one update counted
        while len(reader.frames) == count0 and not task.done():
            await asyncio.sleep(0.02)
    if task.done():
        task.result()  # the reader failed: say why
    elapsed = time.monotonic() - start
    n, px = len(reader.frames) - count0, sum(reader.pixels[count0:])
    nbytes = reader.nbytes - bytes0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await task
    return {"what": "vnc", "encoding": encoding, "screen": f"{t.width}x{t.height}",
            "frames_per_s": n / elapsed,
            "full_screens_per_s": px / (t.width * t.height) / elapsed,
            "mbytes_per_s": nbytes / 1e6 / elapsed, "seconds": elapsed}


async def vnc_rates(mode: str, seconds: float, encodings: list[str]) -> list[dict[str, Any]]:
    """Full-screen updates per second to one real client per encoding, the guest's
    screensaver uncapped (a new 800x600 frame as soon as the last is drawn)."""
    rows = []
    async with lab("tv") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=64, mode=mode)
        for encoding in encodings:
            t = await VncTypist.connect(spec.client_ns, (doc["ip"], ports.VNC))
            await t.type_text(b"screensaver uncapped\r")
            rows.append({"mode": mode, "guest": "sim", **await measure(t, encoding, seconds)})
            await t.type_text(b"\r")  # a key ends the screensaver for the next client
            await asyncio.sleep(0.3)
            t.close()
    return rows


# The QEMU guest's screen is the VGA text console (720x400, 80 columns): a hex dump
# of random bytes flooding tty1 scrolls it with rows that differ across their whole
# width, so all of it changes between two of QEMU's display refreshes (QEMU sends
# only the changed cells of a row: `seq` changed its last digits, 7 % of the
# screen). Started from the serial console's shell (bytes, no keymap), so keeper and
# the stock set-up show the same screen, whoever serves it.
QEMU_FLOOD = b"hexdump -C /dev/urandom >/dev/tty1 &\r"


async def qemu_vnc_rates(mode: str, seconds: float, encodings: list[str]) -> list[dict[str, Any]]:
    """The same on a QEMU guest whose text console scrolls without pause: keeper
    (Domain R's RFB server, fed by QEMU's VNC server over its Unix socket) or the
    stock set-up (QEMU's own VNC server, C, on the host's address), one real client
    on the same lab path either way."""
    rows = []
    async with lab("tq") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=128, mode=mode, guest="qemu")
        console = await SocketLink.connect(spec.client_ns, (doc["ip"], ports.CONSOLE))
        await console.send(b"\r")
        await asyncio.sleep(0.5)
        await console.send(QEMU_FLOOD)
        try:
            for encoding in encodings:
                t = await VncTypist.connect(spec.client_ns, (doc["ip"], ports.VNC))
                rows.append({"mode": mode, "guest": "qemu",
                             **await measure(t, encoding, seconds)})
                t.close()
        finally:
            console.close()
    return rows


async def ssh_rate(mode: str, chars: int) -> dict[str, Any]:
    async with lab("ts") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=64, mode=mode)
        work = Path(tempfile.mkdtemp(prefix="keeper-bench-"))
        link = await SshLink.start(spec.client_ns, doc["ip"], key=spec.ssh_dir / "id_ed25519",
                                   known_hosts=work / "known_hosts", workdir=work)
        await link.wait_connected()
        await asyncio.sleep(1.0)
        last = seq_last(chars)
        end = b"%d\r\n" % last + PROMPT
        await link.send(b"seq 1 %d\r" % last)
        got, t0 = bytearray(), time.monotonic()
        while not got.endswith(end):
            got += await asyncio.wait_for(link.recv(), 60)
        elapsed = time.monotonic() - t0
        await link.finish()
    return {"mode": mode, "what": "ssh", "chars": len(got), "seconds": elapsed,
            "chars_per_s": len(got) / elapsed}


SSHD = Path("/usr/sbin/sshd")


async def domr_ssh_rate(chars: int) -> dict[str, Any]:
    """Domain R's SSH path alone: keeper's SSH service in a process of its own, as
    Domain R runs it (bench/ssh_feed.py), on host a's address, fed directly as Domain
    R's console device feeds it from a source that is never the limit (the guest's
    `seq` output, made beforehand). The same OpenSSH client, the same path as sshd's
    row."""
    import asyncssh

    async with lab("tf") as spec:
        host = spec.hosts[0]
        work = spec.rundir / "feed"
        work.mkdir(mode=0o700)
        key = work / "host_key"
        key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        key.chmod(0o600)
        feeder = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("ssh_feed.py")),
            "--netns", host.ns, "--ip", host.mgmt_ip, "--port", "2223",
            "--host-key", str(key), "--authorized-keys", str(spec.ssh_dir / "authorized_keys"),
            "--last", str(seq_last(chars) + 1),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert feeder.stdin is not None and feeder.stdout is not None
        try:
            bound = await asyncio.wait_for(feeder.stdout.readline(), 30)
            if bound.strip() != b"bound":
                raise RuntimeError(f"bench/ssh_feed.py did not start: {bound!r}")
            link = await SshLink.start(spec.client_ns, host.mgmt_ip, port=2223,
                                       key=spec.ssh_dir / "id_ed25519", workdir=work,
                                       known_hosts=work / "known_hosts")
            await link.wait_connected()
            ready = await asyncio.wait_for(feeder.stdout.readline(), 30)
            if ready.strip() != b"ready":
                raise RuntimeError(f"bench/ssh_feed.py saw no login: {ready!r}")
            got = bytearray()

            async def read() -> None:
                while not got.endswith(FEED_END):
                    got.extend(await asyncio.wait_for(link.recv(), 60))

            reader = asyncio.create_task(read())
            t0 = time.monotonic()
            feeder.stdin.write(b"go\n")
            await reader
            elapsed = time.monotonic() - t0
            link.close()
        finally:
            with contextlib.suppress(OSError):
                feeder.stdin.close()
            try:
                await asyncio.wait_for(feeder.wait(), 10)
            except TimeoutError:
                feeder.kill()
                await feeder.wait()
    n = len(got) - len(FEED_END)
    return {"mode": "domain-r-fed", "what": "ssh", "chars": n, "seconds": elapsed,
            "chars_per_s": n / elapsed}


async def sshd_rate(chars: int) -> dict[str, Any]:
    """The same output through OpenSSH's own sshd on the same lab path (host a's
    address, from the client namespace): a real peer, for scale."""
    import asyncssh

    from keeper.net import netns

    async with lab("td") as spec:
        host = spec.hosts[0]
        work = spec.rundir / "sshd"
        work.mkdir(mode=0o700)
        data = b"".join(b"%d\n" % i for i in range(1, seq_last(chars) + 2))  # >= chars
        (work / "seq.txt").write_bytes(data)
        key = work / "host_key"
        key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        key.chmod(0o600)
        (work / "sshd_config").write_text(
            f"Port 2222\nListenAddress {host.mgmt_ip}\nHostKey {key}\n"
            f"AuthorizedKeysFile {spec.ssh_dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile {work / 'sshd.pid'}\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        sshd = await asyncio.create_subprocess_exec(
            str(SSHD), "-D", "-e", "-f", str(work / "sshd_config"),
            stderr=asyncio.subprocess.DEVNULL, preexec_fn=lambda: netns.enter(host.ns))
        try:
            await asyncio.sleep(0.5)
            link = await SshLink.start(spec.client_ns, host.mgmt_ip, login="root", port=2222,
                                       key=spec.ssh_dir / "id_ed25519", workdir=work,
                                       known_hosts=work / "known_hosts",
                                       command=("cat", str(work / "seq.txt")))
            got = bytearray(await asyncio.wait_for(link.recv(), 30))
            t0 = time.monotonic()
            while chunk := await asyncio.wait_for(link.recv(), 60):
                got += chunk
            elapsed = time.monotonic() - t0
            link.close()
        finally:
            sshd.terminate()
            await sshd.wait()
    return {"mode": "openssh-sshd", "what": "ssh", "chars": len(got), "seconds": elapsed,
            "chars_per_s": len(got) / elapsed}


def qemu_ratio(rows: list[dict[str, Any]], why_no_qemu: str | None) -> dict[str, Any]:
    """Per encoding, keeper's full screens per second on the QEMU guest over QEMU's
    own VNC server's on the same screen (goal 0.9), or null with the reason."""
    qemu = {(r["mode"], r["encoding"]): r["full_screens_per_s"] for r in rows
            if r["what"] == "vnc" and r["guest"] == "qemu"}
    ratio = {enc: qemu[("keeper", enc)] / qemu[("baseline", enc)] for mode, enc in qemu
             if mode == "keeper" and qemu.get(("baseline", enc))}
    if not ratio:
        return {"vnc_ratio_vs_qemu": None,
                "vnc_ratio_vs_qemu_why_null": why_no_qemu or "no QEMU guest row measured"}
    return {"vnc_ratio_vs_qemu": ratio,
            "vnc_updates_per_s_qemu": {
                who: {enc: v for (mode, enc), v in qemu.items() if mode == key}
                for who, key in (("keeper", "keeper"), ("qemu_vnc_server", "baseline"))}}


def ratios(rows: list[dict[str, Any]], why_no_qemu: str | None = None) -> dict[str, Any]:
    """Issue #13's ratios against OpenSSH's sshd (the same OpenSSH client for both),
    each null with the reason when not measured."""
    sshd = next((r for r in rows if r["mode"] == "openssh-sshd"), None)
    keeper = next((r for r in rows if r["what"] == "ssh" and r["mode"] == "keeper"), None)
    whole: float | None = None
    why_whole = None
    if sshd is None:
        why_whole = f"no {SSHD} on this machine (apt-get install openssh-server)"
    elif keeper is None:
        why_whole = "keeper's SSH path not measured"
    else:
        whole = keeper["chars_per_s"] / sshd["chars_per_s"]
    fed = next((r for r in rows if r["mode"] == "domain-r-fed"), None)
    domr: float | None = None
    why_domr = None
    if sshd is None:
        why_domr = why_whole
    elif fed is None:
        why_domr = "Domain R's SSH path alone not measured"
    else:
        domr = fed["chars_per_s"] / sshd["chars_per_s"]
    return {
        "ssh_ratio_vs_openssh": {
            "domain_r_path": domr, **({"domain_r_path_why_null": why_domr} if why_domr else {}),
            "whole_path": whole, **({"whole_path_why_null": why_whole} if why_whole else {}),
        },
        "vnc_updates_per_s": {r["encoding"]: r["full_screens_per_s"] for r in rows
                              if r["what"] == "vnc" and r["mode"] == "keeper"
                              and r["guest"] == "sim"},
        **qemu_ratio(rows, why_no_qemu),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="VNC measuring time, each")
    p.add_argument("--chars", type=int, default=10_000_000, help="SSH output size")
    p.add_argument("--encodings", default=",".join(ENCODINGS),
                   help=f"VNC encodings to measure, of {','.join(ENCODINGS)}")
    p.add_argument("--no-qemu", action="store_true",
                   help="skip the QEMU guest (keeper against QEMU's own VNC server)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line last: the ratios and every row")
    args = p.parse_args(argv)
    encodings = [e for e in args.encodings.split(",") if e]
    if bad := [e for e in encodings if e not in ENCODINGS]:
        p.error(f"unknown encoding {bad[0]!r}: choose from {', '.join(ENCODINGS)}")
    need_root("bench/throughput.py")
    rows = []
    for mode in ("keeper", "baseline"):
        print(f"VNC uncapped screensaver, servers in {mode} ...", file=sys.stderr)
        rows += asyncio.run(vnc_rates(mode, args.seconds, encodings))
        print(f"SSH seq output, servers in {mode} ...", file=sys.stderr)
        rows.append(asyncio.run(ssh_rate(mode, args.chars)))
    why_no_qemu = None
    if args.no_qemu:
        why_no_qemu = "not measured: --no-qemu"
    elif not demo.qemu_available():
        why_no_qemu = "no QEMU or no guest image on this machine (./scripts/setup)"
    else:
        for mode in ("keeper", "baseline"):
            print(f"VNC on a QEMU guest's scrolling console, {mode} ...", file=sys.stderr)
            rows += asyncio.run(qemu_vnc_rates(mode, args.seconds, encodings))
    print("SSH: Domain R's SSH service fed directly ...", file=sys.stderr)
    rows.append(asyncio.run(domr_ssh_rate(args.chars)))
    if SSHD.exists():
        print("the same output through OpenSSH's sshd ...", file=sys.stderr)
        rows.append(asyncio.run(sshd_rate(args.chars)))
    else:
        print(f"no {SSHD} (apt-get install openssh-server): no OpenSSH comparison",
              file=sys.stderr)
    print()
    for r in rows:
        where = {"keeper": "Domain R", "baseline": "Dom0"}.get(r["mode"], r["mode"])
        if r["what"] == "vnc" and r["guest"] == "qemu":
            where = {"keeper": "Domain R", "baseline": "QEMU"}[r["mode"]]
            print(f"VNC {r['encoding']:7s}, QEMU guest {r['screen']}, server {where:8s}: "
                  f"{r['frames_per_s']:6.1f} updates/s, {r['full_screens_per_s']:5.1f} full "
                  f"screens/s, {r['mbytes_per_s']:6.1f} MB/s")
        elif r["what"] == "vnc":
            print(f"VNC {r['encoding']:7s}, servers in {where:8s}: {r['frames_per_s']:6.1f} "
                  f"updates/s, {r['full_screens_per_s']:5.1f} full screens/s, "
                  f"{r['mbytes_per_s']:6.1f} MB/s")
        else:
            print(f"SSH, servers in {where:8s}: {r['chars_per_s'] / 1e6:6.2f} M chars/s "
                  f"({r['chars']} chars in {r['seconds']:.1f} s)")
    summary = ratios(rows, why_no_qemu)
    path = save("throughput", {"args": vars(args), **summary, "rows": rows})
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    vnc = [r for r in rows if r["what"] == "vnc"]
    ssh = [r for r in rows if r["what"] == "ssh"]
    a1.bar([f"{r['guest']} {r['mode']}\n{r['encoding']}" for r in vnc],
           [r["full_screens_per_s"] for r in vnc])
    a1.set_title("VNC full screens / s")
    a2.bar([r["mode"] for r in ssh], [r["chars_per_s"] / 1e6 for r in ssh])
    a2.set_title("SSH M chars / s")
    finish(fig, path)
    if args.json:
        print(json.dumps({"bench": "throughput", "chars": args.chars, "seconds": args.seconds,
                          "file": str(path), **summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
