"""Loss on the wire: co-migrations while the client's path drops packets.

Each drill builds its own lab with guest1 (simulated) on host a, opens one session
from the client namespace (raw console, OpenSSH, or VNC with keeper's RFB client),
types a key every 50 ms, turns on random loss both ways on the client's switch port
(`keeper.lab.wireloss`: nftables in the switch namespace, the kernel has no netem),
co-migrates a→b→a… and then compares what was typed with the guest's input
journal. The typists check every echo byte for byte (VNC: a screen update per key),
so a broken or confused session shows as a reconnect.

Per migration the row's extras report the pause the client saw (the slowest key
whose round trip overlapped Domain R's frozen window), the client socket's TCP
retransmissions from just before the migration until the next one starts
(TCP_INFO of the client's socket; for OpenSSH, its socket borrowed with
pidfd_getfd), the frames the loss rules dropped meanwhile, and the downtimes; and,
for comparison, the retransmissions per second over a stretch of typing under the
same loss before the first migration (the loss alone retransmits too).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.lab import ops, topology, wireloss
from keeper.lab.faults import Drill, Row
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.lab.vncclient import VncTypist
from keeper.migrate.trace import longest_wait

GUEST = "guest1"
RMS = ("console", "ssh", "vnc")
LOSSES = (2, 10)  # percent, each way
MIGRATIONS = 3
INTERVAL_S = 1.5  # typing between migrations (and before the first)
MEM_MB = 32
SETTLE_S = 30.0  # for the last echoes: under 10 % loss a segment may back off a few times


async def open_typist(spec: LabSpec, ip: str, rms: str, work: Path,
                      period: float = 0.05) -> Typist | VncTypist:
    """A checking typist of guest1's console (raw TCP or OpenSSH) or screen (VNC)."""
    prompt = f"{GUEST}:~$ ".encode()
    if rms == "vnc":
        return await VncTypist.connect(spec.client_ns, (ip, ports.VNC), period=period)
    if rms == "console":
        return await Typist.over_tcp(spec.client_ns, (ip, ports.CONSOLE), prompt, period)
    link = await SshLink.start(spec.client_ns, ip, key=spec.ssh_dir / "id_ed25519",
                               known_hosts=work / "known_hosts", workdir=work)
    await link.wait_connected()
    await asyncio.sleep(1.0)  # the login's own output settles before the first key
    return Typist(link, prompt, period=period)


async def close_typist(typist: Typist | VncTypist) -> list[str]:
    """End the session as its user would; what went wrong, if anything."""
    if isinstance(typist, Typist) and isinstance(typist.link, SshLink):
        typist.stats.retransmits = typist.link.retransmits()
        status = await typist.link.finish()
        stderr = typist.link.stderr()
        if status != 0 or "WARNING" in stderr:
            return [f"ssh exited {status}: {stderr.strip()[-300:]}"]
        return []
    typist.close()
    return []


async def serving(spec: LabSpec, name: str = GUEST) -> list[dict[str, Any]]:
    """The Domain Rs of `name` that serve (not a twin waiting for a checkpoint)."""
    return [d for d in (await ops.status(spec))["domains"]
            if d["name"] == name and d["state"] == "running"]


async def run_wire(rms: str, percent: int, migrations: int = MIGRATIONS,
                   interval: float = INTERVAL_S, mem_mb: int = MEM_MB) -> Row:
    """One drill: `migrations` co-migrations of guest1 with `percent` % loss each way
    on the client's path while one `rms` session types."""
    case = f"wire/{rms}/loss-{percent}pct"
    name = f"w{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="keeper-wire-"))
    extra: dict[str, Any] = {"loss_pct": percent, "migrations": 0}
    try:
        spec = await ops.up(name)
        await ops.create_guest(spec, GUEST, "a", mem_mb=mem_mb)
        before = (await ops.journal(spec, GUEST))["count"]
        ip = (await serving(spec))[0]["ip"]
        typist = await open_typist(spec, ip, rms, work)
        stop = asyncio.Event()
        typing = asyncio.create_task(typist.run(stop, settle=SETTLE_S))
        per: list[dict[str, Any]] = []
        errors: list[str] = []
        try:
            async with wireloss.loss(spec.switch_ns, percent):
                # what the loss alone costs, per second of typing, for comparison
                retrans0, t_idle = typist.retransmits(), time.monotonic()
                await asyncio.sleep(2 * interval)
                idle_s = time.monotonic() - t_idle
                extra["retransmits_client_no_migration"] = typist.retransmits() - retrans0
                extra["retransmits_client_per_s_no_migration"] = round(
                    extra["retransmits_client_no_migration"] / idle_s, 2)
                where = "a"
                for _ in range(migrations):
                    if typing.done():
                        break
                    where = "b" if where == "a" else "a"
                    retrans0 = typist.retransmits()
                    dropped0 = await asyncio.to_thread(wireloss.dropped, spec.switch_ns)
                    t0 = time.monotonic()
                    trace = await ops.migrate(spec, GUEST, where)
                    wall = time.monotonic() - t0
                    await asyncio.sleep(interval)
                    dropped1 = await asyncio.to_thread(wireloss.dropped, spec.switch_ns)
                    window_s = time.monotonic() - t0
                    per.append({
                        "window_s": round(window_s, 2),  # what the counts below cover
                        "to": where,
                        "pause_ms": round(longest_wait(trace, typist.stats.samples,
                                                       "R stopped", "R resumed"), 1),
                        "retransmits_client": typist.retransmits() - retrans0,
                        "dropped": {k: dropped1[k] - dropped0[k] for k in dropped1},
                        "downtime_ms": trace["downtime_ms"],
                        "migration_ms": round(wall * 1e3, 1),
                        "trace_ok": bool(trace["trace_ok"]),
                    })
                stop.set()
                stats = await typing  # the last echoes arrive under loss too
                extra["dropped_total"] = await asyncio.to_thread(
                    wireloss.dropped, spec.switch_ns)
        finally:
            stop.set()
            if not typing.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(typing, SETTLE_S + 10)
            errors += await close_typist(typist)
        stats = typist.stats
        errors = stats.errors + errors
        # A VNC key's "echo" is the first update after it, which the screen's own
        # changes can bring while the key itself is still being resent through the
        # loss (RTO backoff): wait, up to SETTLE_S, for the journal to hold as many keys
        # as were sent. A key that never arrives is still counted lost.
        journal = await ops.settled_journal(spec, GUEST, before, len(stats.sent), SETTLE_S)
        diff = compare(bytes(stats.sent), journal)
        doms = await serving(spec)
        pauses = [m["pause_ms"] for m in per]
        extra.update({
            "migrations": len(per), "keys_sent": len(stats.sent),
            "keys_received": len(journal), "duplicated": diff["duplicated"],
            "reordered": diff["reordered"],
            "pause_ms": {"median": round(statistics.median(pauses), 1) if pauses else 0.0,
                         "max": max(pauses, default=0.0)},
            # the slowest key of the whole run, migration or not (loss alone backs off)
            "pause_ms_any_key_max": round(stats.pause_ms_max, 1),
            "retransmits_client_per_migration": [m["retransmits_client"] for m in per],
            "retransmits_client_total": stats.retransmits,
            "per_migration": per, "errors": errors[:5],
        })
        # afterwards: exactly one Domain R serves the guest, where it was sent last,
        # every trace in order, and the session went on to the end
        recovered = (len(per) == migrations and all(m["trace_ok"] for m in per)
                     and len(doms) == 1 and doms[0]["host"] == where and not errors
                     and diff["duplicated"] == diff["reordered"] == 0)
        return Row(case=case, sessions=1, lost=diff["lost"],
                   reconnects=1 if errors else 0, recovered=recovered, extra=extra)
    except Exception as exc:  # the drill itself broke: a row that says so
        extra["error"] = f"{type(exc).__name__}: {exc}"
        return Row(case=case, sessions=1, lost=0, reconnects=0, recovered=False,
                   extra=extra)
    finally:
        await asyncio.to_thread(topology.down, name)
        shutil.rmtree(work, ignore_errors=True)


def drill(rms: str, percent: int, migrations: int = MIGRATIONS) -> Drill:
    async def run() -> Row:
        return await run_wire(rms, percent, migrations)

    return Drill(name=f"wire/{rms}/loss-{percent}pct", run=run)


CASES: list[Drill] = [drill(rms, pct) for pct in LOSSES for rms in RMS]
