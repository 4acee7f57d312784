#!/usr/bin/env python3
"""§5.2: throughput through the remote-management servers, in Domain R (keeper) and
in Dom0 (the baseline): VNC frames per second while the guest's screensaver redraws
the whole 800x600 screen, and SSH characters per second while the guest prints
about 10,000,000 characters (`seq`) to its console.

    python bench/throughput.py --seconds 10 --chars 10000000

Writes bench/out/throughput.json and .png, prints a table. Needs root. The paper
ran OpenSSH's sshd for scale: so do we, on the same lab path, when /usr/sbin/sshd
exists (`apt-get install openssh-server`); it is started only for the measurement,
in the lab's own namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import finish, lab, need_root, pyplot, save

from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.vncclient import VncTypist

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


async def vnc_fps(mode: str, seconds: float) -> dict[str, Any]:
    async with lab("tv") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=64, mode=mode)
        t = await VncTypist.connect(spec.client_ns, (doc["ip"], 5900))
        await t.type_text(b"screensaver\r")
        frames: list[float] = []
        pixels: list[int] = []
        reader = asyncio.create_task(t.watch_frames(frames, pixels))
        await asyncio.sleep(1.0)  # the screensaver starts
        start, count0 = time.monotonic(), len(frames)
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - start
        n, px = len(frames) - count0, sum(pixels[count0:count0 + len(frames) - count0])
        reader.cancel()
        t.close()
    return {"mode": mode, "what": "vnc", "frames_per_s": n / elapsed,
            "full_screens_per_s": px / (800 * 600) / elapsed, "seconds": elapsed}


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


async def sshd_rate(chars: int) -> dict[str, Any]:
    """The same output through OpenSSH's own sshd on the same lab path (host a's
    address, from the client namespace): a real peer, for scale."""
    import asyncssh

    from keeper.net import netns

    async with lab("td") as spec:
        host = spec.hosts[0]
        work = spec.rundir / "sshd"
        work.mkdir(mode=0o700)
        data = b"".join(b"%d\n" % i for i in range(1, seq_last(chars) + 1))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="VNC measuring time")
    p.add_argument("--chars", type=int, default=10_000_000, help="SSH output size")
    args = p.parse_args(argv)
    need_root("bench/throughput.py")
    rows = []
    for mode in ("keeper", "baseline"):
        print(f"VNC screensaver, servers in {mode} ...", file=sys.stderr)
        rows.append(asyncio.run(vnc_fps(mode, args.seconds)))
        print(f"SSH seq output, servers in {mode} ...", file=sys.stderr)
        rows.append(asyncio.run(ssh_rate(mode, args.chars)))
    if SSHD.exists():
        print("the same output through OpenSSH's sshd ...", file=sys.stderr)
        rows.append(asyncio.run(sshd_rate(args.chars)))
    else:
        print("no /usr/sbin/sshd (apt-get install openssh-server): no OpenSSH comparison",
              file=sys.stderr)
    print()
    for r in rows:
        where = {"keeper": "Domain R", "baseline": "Dom0"}.get(r["mode"], r["mode"])
        if r["what"] == "vnc":
            print(f"VNC, servers in {where:8s}: {r['frames_per_s']:6.1f} updates/s, "
                  f"{r['full_screens_per_s']:5.1f} full screens/s")
        else:
            print(f"SSH, servers in {where:8s}: {r['chars_per_s'] / 1e6:6.2f} M chars/s "
                  f"({r['chars']} chars in {r['seconds']:.1f} s)")
    path = save("throughput", {"args": vars(args), "rows": rows})
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    vnc = [r for r in rows if r["what"] == "vnc"]
    ssh = [r for r in rows if r["what"] == "ssh"]
    a1.bar([r["mode"] for r in vnc], [r["full_screens_per_s"] for r in vnc])
    a1.set_title("VNC full screens / s")
    a2.bar([r["mode"] for r in ssh], [r["chars_per_s"] / 1e6 for r in ssh])
    a2.set_title("SSH M chars / s")
    finish(fig, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
