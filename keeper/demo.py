"""`keeper demo`: a guest's console session survives co-migrations back and forth.

Builds a lab (switch, hosts a and b with their agents, a client), starts guest1 on
host a (a simulated Domain U with no network of its own, and its Domain R), connects
to the guest's console through Domain R from the client namespace, and types one key
every 50 ms (the paper's §5.1 workload) for the whole run while guest1 migrates
a→b→a… Then it compares what was typed with what the guest received (its input
journal), prints the pauses, downtimes and retransmissions, and removes the lab —
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.errors import KeeperError
from keeper.lab import ops, topology
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.lab.vncclient import VncTypist
from keeper.migrate.trace import longest_wait
from keeper.qemu.image import PROMPT as QEMU_PROMPT
from keeper.qemu.image import TYPIST as QEMU_TYPIST

GUEST = "guest1"


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "max": 0.0}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


async def _typist(spec: LabSpec, ip: str, rms: str, workdir: Path,
                  say: Any, prompt: bytes, qemu: bool, period: float) -> Typist | VncTypist:
    extra: dict[str, Any] = dict(QEMU_TYPIST) if qemu else {}
    extra["period"] = period
    if rms == "vnc":
        say(f"{GUEST}'s screen and keyboard through Domain R's VNC server at {ip}:{ports.VNC}")
        say(f"  watch it:  ip netns exec {spec.client_ns} vncviewer {ip}:{ports.VNC}   "
            "(any VNC viewer; see the README)")
        return await VncTypist.connect(spec.client_ns, (ip, ports.VNC), period=period)
    if rms == "console":
        say(f"{GUEST}'s console through Domain R at {ip}:{ports.CONSOLE} (raw TCP)")
        say(f"  attach yourself:  ip netns exec {spec.client_ns} telnet {ip} {ports.CONSOLE}")
        return await Typist.over_tcp(spec.client_ns, (ip, ports.CONSOLE), prompt=prompt,
                                     **extra)
    key = spec.ssh_dir / "id_ed25519"
    say(f"{GUEST}'s console through Domain R over SSH at {ip}:22, OpenSSH as the client")
    say(f"  attach yourself:  ip netns exec {spec.client_ns} ssh -i {key} admin@{ip}"
        "   (Ctrl-] leaves)")
    link = await SshLink.start(spec.client_ns, ip, key=key, workdir=workdir,
                               known_hosts=workdir / "known_hosts")
    await link.wait_connected()
    await asyncio.sleep(1.0)  # the login's own output settles first
    return Typist(link, prompt, **extra)


async def run_migrations(spec: LabSpec, *, migrations: int, interval: float, rms: str = "console",
                         say: Any = print, period: float = 0.05) -> dict[str, Any]:
    """guest1 must exist; type into its console (a key every `period` s, a person's
    pace by default) while it migrates back and forth."""
    status = await ops.status(spec)
    dom = next(d for d in status["domains"] if d["name"] == GUEST)
    hosts = [h.name for h in spec.hosts]
    first = await ops.journal(spec, GUEST)
    before = first["count"]
    kind = dom.get("kind", "sim")
    prompt = QEMU_PROMPT if kind == "qemu" else f"{GUEST}:~$ ".encode()
    workdir = Path(tempfile.mkdtemp(prefix="keeper-demo-"))
    typist = await _typist(spec, dom["ip"], rms, workdir, say, prompt, kind == "qemu",
                            period)
    stop = asyncio.Event()
    typing = asyncio.create_task(typist.run(stop))
    stats_ref = typist.stats
    traces: list[dict[str, Any]] = []
    server_retrans: list[int] = []
    try:
        await asyncio.sleep(interval)
        where = dom["host"]
        for i in range(migrations):
            target = next(h for h in hosts if h != where)
            server_retrans.append(await ops.server_retransmits(spec))
            trace = await ops.migrate(spec, GUEST, target)
            where = target
            traces.append(trace)
            await asyncio.sleep(interval)
            # the pause a user saw in this migration: the slowest key whose round trip
            # overlapped the frozen window of Domain R
            trace["pause_ms"] = round(longest_wait(trace, stats_ref.samples, "R stopped",
                                                   "R resumed"), 3)
            say(f"migration {i + 1:3d}: {trace['source']} -> {trace['target']} "
                f"{trace['total_ms']:7.1f} ms, downtime U {trace['downtime_ms']['U']:6.1f} ms "
                f"R {trace['downtime_ms']['R']:6.1f} ms, pause seen {trace['pause_ms']:6.1f} ms, "
                f"{len(trace['rounds'])} rounds, "
                f"sync points {'in order' if trace['trace_ok'] else 'OUT OF ORDER'}")
            if typing.done():
                break
    finally:
        stop.set()
        stats = await typing
    server_retrans.append(await ops.server_retransmits(spec))
    exit_status = None
    if isinstance(typist, Typist) and isinstance(typist.link, SshLink):
        typist.stats.retransmits = typist.link.retransmits()
        exit_status = await typist.link.finish()
        stderr = typist.link.stderr()
        if exit_status != 0 or "WARNING" in stderr:
            stats.errors.append(f"ssh exited {exit_status}: {stderr.strip()[-300:]}")
    else:
        typist.close()
    shutil.rmtree(workdir, ignore_errors=True)
    last = await ops.journal(spec, GUEST)
    journal = last["journal"][before:]
    diff = compare(bytes(stats.sent), journal)
    guest = {"kind": kind}
    if kind == "qemu":
        guest.update(accel=last["info"].get("accel"), kernel=last["info"].get("kernel"))
    # restored sockets start counting at zero: what each one counted before the next move
    retrans_server = sum(server_retrans[1:])
    return {
        "rms": rms,
        "guest": guest,
        "migrations": len(traces),
        "sent": len(stats.sent),
        "received": len(journal),
        **diff,
        "reconnects": 1 if stats.errors else 0,
        "errors": stats.errors,
        "echo_mismatches": stats.mismatches,
        "vnc_updates": stats.updates,
        "retransmits_client": stats.retransmits,
        "retransmits_server": retrans_server,
        "pause_ms_max": round(stats.pause_ms_max, 3),
        "pause_ms_median": round(statistics.median(stats.echo_latencies_ms), 3)
        if stats.echo_latencies_ms else 0.0,
        "downtime_ms": {"U": _stats([t["downtime_ms"]["U"] for t in traces]),
                        "R": _stats([t["downtime_ms"]["R"] for t in traces])},
        "migration_ms": _stats([t["total_ms"] for t in traces]),
        "mem_bytes": traces[0]["mem_bytes"] if traces else None,
        "trace_ok": bool(traces) and all(t["trace_ok"] for t in traces),
        "traces": traces,
        "samples": list(stats.samples),  # (sent at, ms to echo): for the benches
    }


def qemu_available() -> bool:
    """QEMU and keeper's guest image are installed (./scripts/setup does both)."""
    from keeper.qemu import image

    return shutil.which("qemu-system-x86_64") is not None and image.load() is not None


def ok(summary: dict[str, Any]) -> bool:
    return (summary["lost"] == summary["duplicated"] == summary["reordered"] == 0
            and summary["reconnects"] == 0 and summary["sent"] > 0 and summary["trace_ok"])


async def _demo(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    say(f"lab {args.lab}: switch, hosts a and b with their agents, client (198.18.0.0/24)")
    spec = await ops.up(args.lab)
    if args.guest == "auto":
        args.guest = "qemu" if qemu_available() else "sim"
    mem_mb = args.mem_mb or (128 if args.guest == "qemu" else 256)
    if args.guest == "qemu":
        say(f"starting {GUEST} on host a: a real Linux VM under QEMU ({mem_mb} MiB, "
            "no network device) + its Domain R")
        await ops.create_guest(spec, GUEST, spec.hosts[0].name, mem_mb=mem_mb, guest="qemu")
    else:
        say(f"starting {GUEST} on host a: {mem_mb} MiB Domain U + its Domain R")
        await ops.create_guest(spec, GUEST, spec.hosts[0].name, mem_mb=mem_mb,
                               dirty_rate=args.dirty_rate)
    return await run_migrations(spec, migrations=args.migrations, interval=args.interval,
                                rms=args.rms, say=say)


def run(args: argparse.Namespace) -> int:
    """Run the demo; always take the lab down, also on Ctrl-C or SIGTERM."""
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    topology.down(args.lab)  # a leftover from an interrupted run
    loop = asyncio.new_event_loop()
    main = loop.create_task(_demo(args, say))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        summary = loop.run_until_complete(main)
    except asyncio.CancelledError:
        say("interrupted: cleaning up")
        if args.json:
            print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    except KeeperError as exc:
        say(f"demo failed: {exc}")
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        for line in topology.down(args.lab):
            say(f"  removed {line}")
    brief = {k: v for k, v in summary.items() if k not in ("traces", "samples")}
    if args.json:
        print(json.dumps(brief))
    else:
        print(f"\n{summary['migrations']} migrations; typed {summary['sent']} keys, the guest "
              f"received {summary['received']}: lost {summary['lost']}, duplicated "
              f"{summary['duplicated']}, reordered {summary['reordered']}, reconnects "
              f"{summary['reconnects']}")
        print(f"longest key-to-echo pause {summary['pause_ms_max']:.1f} ms (median "
              f"{summary['pause_ms_median']:.1f}); downtime U median "
              f"{summary['downtime_ms']['U']['median']:.1f} ms max "
              f"{summary['downtime_ms']['U']['max']:.1f}, R median "
              f"{summary['downtime_ms']['R']['median']:.1f} max "
              f"{summary['downtime_ms']['R']['max']:.1f}; migration median "
              f"{summary['migration_ms']['median']:.0f} ms; TCP retransmissions client "
              f"{summary['retransmits_client']}, server {summary['retransmits_server']}; "
              f"sync points {'in order' if summary['trace_ok'] else 'OUT OF ORDER'}")
    return 0 if ok(summary) else 1
