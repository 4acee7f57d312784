#!/usr/bin/env python3
"""Scale: one Domain R with many client connections moved in one co-migration, and
many guests co-migrating at once.

Part 1 (`--sockets`): one simulated guest whose Domain R serves `--sockets` client
connections, raw console, OpenSSH and VNC mixed (`--mix`, in per cent). Before and
after one co-migration every connection gives a sign of life: it types one key of its
RMS's alphabet (console digits, SSH A-M, VNC N-Z), and a VNC connection also asks for
a small screen update and waits for it. A connection is lost if it broke (EOF, reset,
a dead ssh), if its VNC update never came, or if its keys are missing from the
guest's input journal (counted per key). A console typist types through the move and
gives the pause a client saw. Domain R reports how long the dump (every session and
socket, the checkpoint encoded) and the restore (decoded, every socket back in repair
mode) took: `dump_restore_ms`, the goal ≤ 100 ms for 1,000 sockets (printed, never
asserted).

Part 2 (`--guests`): that many guests on host a, a console typist on each, all
co-migrating to host b at once; per migration its time, Domain R's and Domain U's
downtime and the pause its typist saw; lost = keys missing from the journals or a
typist's session broken; a migration that failed and rolled back (the guest goes on
at a, nothing lost) is counted apart, `migrations_failed`.

    python bench/scale.py --json
    python bench/scale.py --sockets 200 --guests 4

Writes bench/out/scale.json; with `--json` ends with one JSON line (sockets,
dump_restore_ms, guests, lost, ...). Exit status 0 only if nothing was lost. Needs
root (it builds its own lab and removes it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import lab, need_root, quiet, save

from keeper import ports
from keeper.lab import ops
from keeper.lab.chorus import ALPHABETS
from keeper.lab.sshclient import SshLink
from keeper.lab.typist import SocketLink, Typist, compare
from keeper.migrate.trace import longest_wait
from keeper.net.tcpinfo import tcp_info

BIG = "big"
OPEN_AT_ONCE = 16  # connections being opened at a time (OpenSSH logins are costly)
SIGN_TIMEOUT = 60.0


class Conn:
    """One client connection of part 1: its RMS, a reader that counts what arrives,
    and a sign of life (a key; for VNC also a small screen update)."""

    def __init__(self, rms: str, index: int) -> None:
        self.rms, self.index = rms, index
        self.key = ALPHABETS[rms][index % len(ALPHABETS[rms])]
        self.keys_sent = 0
        self.received = 0
        self.updates = 0
        self.error: str | None = None
        self.sock: socket.socket | None = None
        self.ssh: SshLink | None = None
        self.link: SocketLink | None = None
        self._update = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, spec: Any, ip: str, work: Path) -> None:
        if self.rms == "ssh":
            self.ssh = await SshLink.start(spec.client_ns, ip, key=spec.ssh_dir / "id_ed25519",
                                           known_hosts=work / "known_hosts", workdir=work)
            await self.ssh.wait_connected()
            self._reader = asyncio.create_task(self._read_stream(self.ssh.recv))
            return
        port = ports.VNC if self.rms == "vnc" else ports.CONSOLE
        self.link = await SocketLink.connect(spec.client_ns, (ip, port))
        self.sock = self.link.sock
        if self.rms == "vnc":
            await self._rfb_handshake()
            self._reader = asyncio.create_task(self._read_rfb())
        else:
            self._reader = asyncio.create_task(self._read_stream(self.link.recv))

    async def _read_stream(self, recv: Any) -> None:
        try:
            while True:
                data = await recv()
                if not data:
                    raise ConnectionError("the server closed the connection")
                self.received += len(data)
        except (OSError, ConnectionError) as exc:
            self.error = f"{self.rms} {self.index}: {type(exc).__name__}: {exc}"

    async def _exactly(self, n: int, timeout: float = SIGN_TIMEOUT) -> bytes:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        buf = bytearray()
        async with asyncio.timeout(timeout):
            while len(buf) < n:
                data = await loop.sock_recv(self.sock, n - len(buf))
                if not data:
                    raise ConnectionError("the VNC server closed the connection")
                buf += data
        return bytes(buf)

    async def _send(self, data: bytes) -> None:
        assert self.sock is not None
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _rfb_handshake(self) -> None:
        """RFB 3.8, no authentication, 32 bpp, Raw only (as keeper.lab.vncclient)."""
        if not (await self._exactly(12)).startswith(b"RFB 003."):
            raise ConnectionError("not an RFB server")
        await self._send(b"RFB 003.008\n")
        (n,) = await self._exactly(1)
        if 1 not in await self._exactly(n):
            raise ConnectionError("no security type None")
        await self._send(b"\x01")
        if struct.unpack(">I", await self._exactly(4))[0] != 0:
            raise ConnectionError("security handshake failed")
        await self._send(b"\x01")
        await self._exactly(20)
        (name_len,) = struct.unpack(">I", await self._exactly(4))
        await self._exactly(name_len)
        await self._send(struct.pack(">B3x", 0) + struct.pack(
            ">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        await self._send(struct.pack(">BxHi", 2, 1, 0))

    async def _read_rfb(self) -> None:
        try:
            while True:
                (kind,) = await self._exactly(1, timeout=1e9)
                if kind == 0:  # FramebufferUpdate
                    (rects,) = struct.unpack(">xH", await self._exactly(3))
                    for _ in range(rects):
                        _, _, w, h, enc = struct.unpack(">HHHHi", await self._exactly(12))
                        if enc != 0:
                            raise ConnectionError(f"encoding {enc}, asked for Raw only")
                        await self._exactly(w * h * 4)
                    self.updates += 1
                    self._update.set()
                elif kind == 2:  # Bell
                    pass
                elif kind == 3:  # ServerCutText
                    (n,) = struct.unpack(">3xI", await self._exactly(7))
                    await self._exactly(n)
                else:
                    raise ConnectionError(f"unexpected RFB message {kind}")
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.error = f"vnc {self.index}: {type(exc).__name__}: {exc}"
            self._update.set()

    async def sign(self) -> None:
        """One key; VNC: then an 8x8 screen update asked for and received."""
        if self.error is not None:
            return
        try:
            if self.rms == "vnc":
                self._update.clear()
                keysym = self.key
                await self._send(struct.pack(">BBxxI", 4, 1, keysym)
                                 + struct.pack(">BBxxI", 4, 0, keysym)
                                 + struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8))
                self.keys_sent += 1
                async with asyncio.timeout(SIGN_TIMEOUT):
                    await self._update.wait()
            elif self.ssh is not None:
                await self.ssh.send(bytes([self.key]))
                self.keys_sent += 1
            else:
                assert self.link is not None
                await self.link.send(bytes([self.key]))
                self.keys_sent += 1
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.error = self.error or f"{self.rms} {self.index}: {type(exc).__name__}: {exc}"

    def established(self) -> bool:
        if self.ssh is not None:
            return self.ssh.proc.returncode is None
        if self.sock is None or self.sock.fileno() < 0:
            return False
        return tcp_info(self.sock).state_name == "ESTABLISHED"

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ssh.finish(), 10)
        if self.link is not None:
            self.link.close()


def _counts(journal: bytes, alphabet: bytes) -> Counter[int]:
    return Counter(b for b in journal if b in alphabet)


async def _signs(spec: Any, conns: list[Conn], name: str) -> dict[str, int]:
    """Every connection types its key (VNC: and gets its update); per RMS, how many
    keys are missing from the journal (a key lost is a connection lost)."""
    before = (await ops.journal(spec, name))["count"]
    sent_before = {id(c): c.keys_sent for c in conns}
    sem = asyncio.Semaphore(64)

    async def one(c: Conn) -> None:
        async with sem:
            await c.sign()

    await asyncio.gather(*(one(c) for c in conns))
    typed = [c for c in conns if c.keys_sent > sent_before[id(c)]]
    journal = await ops.settled_journal(spec, name, before, len(typed), SIGN_TIMEOUT)
    missing: dict[str, int] = {}
    for rms, alphabet in ALPHABETS.items():
        want = Counter(c.key for c in typed if c.rms == rms)
        got = _counts(journal, alphabet)
        missing[rms] = sum(max(0, n - got[k]) for k, n in want.items())
    return missing


async def part1(spec: Any, sockets: int, mix: tuple[int, ...], work: Path,
                say: Any) -> dict[str, Any]:
    doc = await ops.create_guest(spec, BIG, "a", mem_mb=64)
    ip = doc["ip"]
    n_ssh = sockets * mix[1] // 100
    n_vnc = sockets * mix[2] // 100
    n_console = sockets - n_ssh - n_vnc
    conns = ([Conn("console", i) for i in range(n_console)]
             + [Conn("ssh", i) for i in range(n_ssh)] + [Conn("vnc", i) for i in range(n_vnc)])
    say(f"part 1: {BIG} on a, {ip}; opening {n_console} console, {n_ssh} SSH (OpenSSH), "
        f"{n_vnc} VNC connections")
    sem = asyncio.Semaphore(OPEN_AT_ONCE)

    async def open_one(c: Conn) -> None:
        async with sem:
            for attempt in range(3):  # setting up, not what is measured: try again
                try:
                    return await c.open(spec, ip, work)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    if attempt == 2:
                        raise
                    say(f"  {c.rms} {c.index}: {exc}; again")
                    await c.close()
                    c.ssh = c.link = c.sock = None
                    await asyncio.sleep(1.0)

    t0 = time.monotonic()
    await asyncio.gather(*(open_one(c) for c in conns))
    await asyncio.sleep(2.0)  # the logins' own output settles
    say(f"  opened in {time.monotonic() - t0:.1f} s")
    missing_before = await _signs(spec, conns, BIG)
    await asyncio.sleep(1.0)
    # one more console connection types through the move: the pause a client saw
    typist = await Typist.over_tcp(spec.client_ns, (ip, ports.CONSOLE),
                                   prompt=f"{BIG}:~$ ".encode())
    stop = asyncio.Event()
    await typist.link.send(b"\r")  # the others' keys end here: a fresh prompt
    await quiet(typist.link)
    typing = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(1.5)
    trace = await ops.migrate(spec, BIG, "b")
    await asyncio.sleep(1.0)
    stop.set()
    stats = await typing
    typist.close()
    pause = longest_wait(trace, stats.samples, "R stopped", "R resumed")
    missing_after = await _signs(spec, conns, BIG)
    broken = [c.error for c in conns if c.error is not None]
    not_established = [f"{c.rms} {c.index}" for c in conns
                       if c.error is None and not c.established()]
    for c in conns:
        await c.close()
    restore = trace.get("restore", {})
    dump_ms = float(trace.get("dump_ms", 0.0))
    restore_ms = float(restore.get("restore_ms", 0.0))
    by_rms = trace.get("by_rms", {})
    lost_keys = sum(missing_after.values())
    lost = len(broken) + len(not_established)
    lost = max(lost, lost_keys)  # a key missing is a connection lost (if not counted)
    moved = (sum(int(v.get("moved", 0)) for v in by_rms.values()) if by_rms
             else trace.get("sessions", 0))
    say(f"  moved {moved} sessions {by_rms}: dump {dump_ms:.1f} ms + restore "
        f"{restore_ms:.1f} ms = {dump_ms + restore_ms:.1f} ms (goal <= 100 ms for 1,000); "
        f"R down {trace['downtime_ms']['R']:.1f} ms, pause seen {pause:.1f} ms; "
        f"lost {lost} (keys missing {missing_after}, broken {len(broken)})")
    return {
        "sockets": len(conns), "mix": {"console": n_console, "ssh": n_ssh, "vnc": n_vnc},
        "moved": moved, "by_rms": by_rms,
        "dump_ms": round(dump_ms, 3), "restore_ms": round(restore_ms, 3),
        # the services' dump on Domain R's CPU (the encoding not counted): the part of
        # the wall time that is ours rather than the machine's load
        "dump_cpu_ms": round(sum(float(v.get("dump_cpu_ms", 0)) for v in by_rms.values()), 3),
        "dump_restore_ms": round(dump_ms + restore_ms, 3),
        "dump_restore_us_per_socket": round(1e3 * (dump_ms + restore_ms) / max(1, moved), 2),
        "checkpoint_bytes": trace.get("checkpoint_bytes"),
        "downtime_ms": trace["downtime_ms"], "migration_ms": trace["total_ms"],
        "pause_ms": round(pause, 3), "typist_errors": stats.errors,
        "lost": lost, "keys_missing_before": missing_before, "keys_missing_after": missing_after,
        "broken": broken[:20], "not_established": not_established[:20],
    }


async def part2(spec: Any, guests: int, say: Any) -> dict[str, Any]:
    names = [f"g{i}" for i in range(guests)]
    for name in names:
        await ops.create_guest(spec, name, "a", mem_mb=32)
    status = await ops.status(spec)
    ips = {d["name"]: d["ip"] for d in status["domains"] if d["name"] in names}
    befores = {n: (await ops.journal(spec, n))["count"] for n in names}
    typists = {n: await Typist.over_tcp(spec.client_ns, (ips[n], ports.CONSOLE),
                                        prompt=f"{n}:~$ ".encode()) for n in names}
    stop = asyncio.Event()
    tasks = {n: asyncio.create_task(t.run(stop)) for n, t in typists.items()}
    say(f"part 2: {guests} guests on a, a typist on each; all co-migrate to b at once")
    await asyncio.sleep(1.5)
    t0 = time.monotonic()
    results = await asyncio.gather(*(ops.migrate(spec, n, "b") for n in names),
                                   return_exceptions=True)
    wall_ms = (time.monotonic() - t0) * 1e3
    await asyncio.sleep(1.0)
    stop.set()
    rows = []
    lost = failed = 0
    for n, trace in zip(names, results, strict=True):
        stats = await tasks[n]
        typists[n].close()
        journal = (await ops.journal(spec, n))["journal"][befores[n]:]
        diff = compare(bytes(stats.sent), journal)
        row: dict[str, Any] = {"guest": n, "sent": len(stats.sent), **diff,
                               "errors": stats.errors}
        if isinstance(trace, BaseException):  # rolled back: it goes on at a
            row["migration_error"] = f"{type(trace).__name__}: {trace}"
            failed += 1
        else:
            row.update(migration_ms=trace["total_ms"], downtime_ms=trace["downtime_ms"],
                       marks=trace.get("marks"), restore=trace.get("restore"),
                       pause_ms=round(longest_wait(trace, stats.samples, "R stopped",
                                                   "R resumed"), 3))
        lost += diff["lost"] + (1 if stats.errors else 0)
        rows.append(row)
        if "migration_error" in row:
            say(f"  {n}: rolled back ({row['migration_error'][-120:]}), lost {diff['lost']}")
        else:
            say(f"  {n}: {row['migration_ms']:7.1f} ms, R down {row['downtime_ms']['R']:6.1f}"
                f" ms, pause seen {row['pause_ms']:6.1f} ms, lost {diff['lost']}")
    ok_rows = [r for r in rows if "migration_ms" in r]

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in ok_rows), 3) if ok_rows else 0.0

    return {"guests": guests, "wall_ms": round(wall_ms, 3),
            "migration_ms_median": med("migration_ms"),
            "migration_ms_max": max((r["migration_ms"] for r in ok_rows), default=0.0),
            "migrations_failed": failed, "pause_ms_median": med("pause_ms"),
            "pause_ms_max": max((r["pause_ms"] for r in ok_rows), default=0.0),
            "lost": lost, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--mix", default="70,20,10", help="console,ssh,vnc in per cent")
    p.add_argument("--guests", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="directory for scale.json")
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = p.parse_args(argv)
    need_root("bench/scale.py")
    mix = tuple(int(x) for x in args.mix.split(","))
    if len(mix) != 3 or sum(mix) != 100:
        p.error("--mix: three per cent figures (console,ssh,vnc) that add up to 100")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    async def run() -> dict[str, Any]:
        work = Path(tempfile.mkdtemp(prefix="keeper-scale-"))
        try:
            doc: dict[str, Any] = {}
            if args.sockets:
                async with lab("sc") as spec:
                    doc["one_domr"] = await part1(spec, args.sockets, mix, work, say)
            if args.guests:
                async with lab("sc") as spec:
                    doc["many_guests"] = await part2(spec, args.guests, say)
            return doc
        finally:
            shutil.rmtree(work, ignore_errors=True)

    doc = asyncio.run(run())
    one, many = doc.get("one_domr", {}), doc.get("many_guests", {})
    summary = {
        "bench": "scale", "sockets": one.get("sockets", 0), "moved": one.get("moved", 0),
        "dump_ms": one.get("dump_ms"), "restore_ms": one.get("restore_ms"),
        "dump_restore_ms": one.get("dump_restore_ms"),
        "dump_cpu_ms": one.get("dump_cpu_ms"),
        "dump_restore_goal_ms": 100.0 * max(1, one.get("sockets", 0)) / 1000,
        "pause_ms_one_domr": one.get("pause_ms"),
        "guests": many.get("guests", 0),
        "migration_ms_median": many.get("migration_ms_median"),
        "migration_ms_max": many.get("migration_ms_max"),
        "pause_ms_max_guests": many.get("pause_ms_max"),
        "migrations_failed": many.get("migrations_failed", 0),
        "lost": one.get("lost", 0) + many.get("lost", 0),
    }
    kw = {"out": args.out} if args.out else {}
    path = save("scale", {"summary": summary, **doc}, **kw)
    say(f"raw samples: {path}")
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and summary["migrations_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
