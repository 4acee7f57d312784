#!/usr/bin/env python3
"""Soak: a guest ping-pongs a↔b N times while a raw console, an OpenSSH and a VNC
session type into it at once; nothing may be lost and no process may grow.

Three sessions from the client namespace type one key every 50 ms each (each with
keys of its own, `keeper.lab.chorus`), for the whole run, while guest1 (simulated,
`--mem-mb` MiB) co-migrates a→b→a… Every `--sample-every` migrations (and before the
first, and after the last) the open descriptors, resident memory and threads of
every host agent and of guest1's Domain R and Domain U processes are read from
/proc. A Domain R (and Domain U) is a new process after each migration, so its
series is one line through its incarnations: growth there means the state that
moves grows. At the end the guest's input journal is checked per session (lost,
duplicated, reordered), each session must still answer, and each series gets a
verdict: growth from the baseline (the second sample, after warm-up) to the last
within max(absolute, relative) limits, with the least-squares slope per 100
migrations beside it, over the samples taken with the guest on host a (the agent
that holds a guest holds its memory: the others are not comparable).

Prints a line per sample and a table; with `--json`, one JSON line last: lost,
reconnects, the series and verdicts per process, per-migration times. Exit status 0
only if nothing was lost, no session broke, every trace was in order and nothing
grew. Needs root (builds and removes its own lab). Writes bench/out/soak.json.

    python bench/soak.py --migrations 1000 --json
    python bench/soak.py --migrations 50 --sample-every 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT, interruptible, lab, need_root, save

from keeper.errors import KeeperError, MigrationError
from keeper.hostd import procs
from keeper.lab import ops, procstat
from keeper.lab.chorus import Chorus, check, open_voice
from keeper.lab.topology import LabSpec

GUEST = "guest1"
RMS = ("console", "ssh", "vnc")
# the phases of a co-migration whose medians say where its time goes
PHASES = ("U created on target", "R created on target", "S2", "R resumed",
          "source released")


def pids(spec: LabSpec, status: dict[str, Any]) -> dict[str, int]:
    """The processes to sample: every host agent, guest1's Domain R and Domain U."""
    out = {}
    for h in spec.hosts:
        path = procs.pidfile(spec.rundir, f"hostd-{h.name}")
        if path.exists():
            out[f"hostd-{h.name}"] = int(path.read_text())
    for h in status["hosts"]:
        for d in h.get("domrs", []):
            if d["name"] == GUEST and d["state"] == "running" and d.get("pid"):
                out["domr-guest1"] = int(d["pid"])
        for g in h.get("guests", []):
            if g["name"] == GUEST and g.get("state") == "running" and g.get("pid"):
                out["domu-guest1"] = int(g["pid"])
    return out


async def take_sample(spec: LabSpec, at: int, on: str,
                      series: dict[str, dict[str, list[Any]]]) -> str:
    found = pids(spec, await ops.status(spec))
    said = []
    for label, pid in sorted(found.items()):
        got = procstat.sample(pid)
        if got is None:
            continue
        s = series.setdefault(label, {"at": [], "pid": [], "guest_on": [],
                                      **{m: [] for m in procstat.METRICS}})
        s["at"].append(at)
        s["guest_on"].append(on)
        s["pid"].append(pid)
        for m in procstat.METRICS:
            s[m].append(got[m])
        said.append(f"{label} fds {got['fds']} rss {got['rss_kb'] / 1024:.1f} MiB "
                    f"threads {got['threads']}")
    return "; ".join(said)


def verdicts(series: dict[str, dict[str, list[Any]]],
             limits: dict[str, tuple[float, float]]) -> dict[str, list[dict[str, Any]]]:
    """A verdict per process and metric, over the samples taken with the guest where
    it was at the first: the agent that holds the guest holds its memory (and its
    hypercall sockets), so samples with the guest elsewhere are not comparable."""
    out = {}
    for label, s in series.items():
        same = [k for k, on in enumerate(s["guest_on"]) if on == s["guest_on"][0]]
        out[label] = [procstat.verdict(m, [s["at"][k] for k in same],
                                       [float(s[m][k]) for k in same], limits).doc()
                      for m in procstat.METRICS]
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "max": round(ordered[-1], 3)}


async def ping_pong(args: argparse.Namespace, spec: LabSpec, chorus: Chorus,
                    series: dict[str, dict[str, list[Any]]], migrations: list[dict[str, Any]],
                    failed: list[dict[str, Any]], say: Any, started: float) -> str | None:
    """Type while guest1 migrates a→b→a… `args.migrations` times, sampling as asked;
    what stopped it early, if anything. A migration that fails rolls back (the pair
    stays where it was): it is counted, and more than `--max-failed` end the run."""
    failure = None
    stop = asyncio.Event()
    typing = asyncio.create_task(chorus.run(stop))
    try:
        await asyncio.sleep(args.interval)
        say(f"sample at 0: {await take_sample(spec, 0, 'a', series)}")
        where = "a"
        for i in range(1, args.migrations + 1):
            if typing.done() or any(v.errors for v in chorus.voices):
                return "a session stopped typing"
            target = "b" if where == "a" else "a"
            t0 = time.monotonic()
            try:
                trace = await ops.migrate(spec, GUEST, target)
            except MigrationError as exc:  # rolled back: the pair goes on at the source
                failed.append({"at": i, "s": round(time.monotonic() - t0, 3),
                               "error": str(exc)[:300]})
                say(f"migration {i} failed and rolled back: {str(exc)[:200]}")
                if len(failed) > args.max_failed:
                    return f"{len(failed)} migrations failed (allowed {args.max_failed})"
            else:
                where = target
                marks = {m["name"]: m["ms"] for m in trace["marks"]}
                migrations.append({
                    "s": round(time.monotonic() - t0, 3), "trace_ok": trace["trace_ok"],
                    "downtime_ms": trace["downtime_ms"],
                    "phases_ms": {p: marks[p] for p in PHASES if p in marks}})
            if args.interval:
                await asyncio.sleep(args.interval)
            if i % args.sample_every == 0 or i == args.migrations:
                recent = [m["s"] for m in migrations[-args.sample_every:]] or [0.0]
                say(f"sample at {i} ({statistics.median(recent):.2f} s/migration, "
                    f"{time.monotonic() - started:.0f} s so far): "
                    f"{await take_sample(spec, i, where, series)}")
    except KeeperError as exc:  # a failed migration: report it with what we have
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        await typing
    return failure


async def soak(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="keeper-soak-"))
    series: dict[str, dict[str, list[Any]]] = {}
    migrations: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    try:
        async with lab("sk") as spec:
            await ops.create_guest(spec, GUEST, "a", mem_mb=args.mem_mb)
            ip = next(d["ip"] for d in (await ops.status(spec))["domains"]
                      if d["name"] == GUEST)
            before = (await ops.journal(spec, GUEST))["count"]
            chorus = Chorus([], period=args.period)
            voices = chorus.voices
            try:
                for rms in RMS:
                    voices.append(await open_voice(spec, ip, rms, work))
                failure = await ping_pong(args, spec, chorus, series, migrations, failed,
                                          say, started)
                await asyncio.sleep(1.0)  # the last keys reach the guest
                alive = await chorus.alive()
            finally:  # also when interrupted: no client process outlives the bench
                await chorus.close()
            await asyncio.sleep(0.5)
            journal = (await ops.journal(spec, GUEST))["journal"][before:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checked = check(voices, journal)
    lost = sum(c["lost"] for c in checked.values())
    duplicated = sum(c["duplicated"] for c in checked.values())
    reordered = sum(c["reordered"] for c in checked.values())
    limits = {"fds": (args.max_fd_growth, 0.10), "threads": (args.max_thread_growth, 0.10),
              "rss_kb": (args.max_rss_growth_mb * 1024, args.max_rss_growth_pct / 100)}
    judged = verdicts(series, limits)
    grew = sorted(f"{label} {v['metric']}" for label, vs in judged.items() for v in vs
                  if not v["ok"])
    phases = {p: _stats([m["phases_ms"][p] for m in migrations if p in m["phases_ms"]])
              for p in PHASES}
    return {
        "guest": "sim", "mem_mb": args.mem_mb, "migrations": len(migrations),
        "migrations_asked": args.migrations, "sample_every": args.sample_every,
        "max_failed": args.max_failed,
        "sessions": {v.rms: {"keys_sent": len(v.sent), "received": v.received,
                             "retransmits_client": v.retransmits(), "errors": v.errors[:3],
                             "alive": alive.get(v.rms, False), **checked[v.rms]}
                     for v in voices},
        "enter": checked["enter"],
        "lost": lost, "duplicated": duplicated, "reordered": reordered,
        "reconnects": sum(1 for v in voices if v.errors),
        "alive": all(alive.get(v.rms, False) for v in voices),
        "trace_ok": bool(migrations) and all(m["trace_ok"] for m in migrations),
        "failure": failure, "failed_migrations": failed,
        "migration_s": _stats([m["s"] for m in migrations]),
        "downtime_ms": {"U": _stats([m["downtime_ms"]["U"] for m in migrations]),
                        "R": _stats([m["downtime_ms"]["R"] for m in migrations])},
        "phases_ms": phases,
        "wall_s": round(time.monotonic() - started, 1),
        "series": series, "verdicts": judged, "grew": grew,
        "per_migration_s": [m["s"] for m in migrations],
    }


def ok(doc: dict[str, Any]) -> bool:
    return (len(doc["failed_migrations"]) <= doc["max_failed"]
            and doc["migrations"] + len(doc["failed_migrations"]) == doc["migrations_asked"]
            and doc["failure"] is None
            and doc["lost"] == doc["duplicated"] == doc["reordered"] == 0
            and doc["reconnects"] == 0 and doc["alive"] and doc["trace_ok"]
            and not doc["grew"])


def table(doc: dict[str, Any]) -> str:
    lines = [f"{doc['migrations']} migrations (of {doc['migrations_asked']}; "
             f"{len(doc['failed_migrations'])} failed and rolled back) in "
             f"{doc['wall_s']:.0f} s: {doc['migration_s']['median']:.2f} s per migration "
             f"(p95 {doc['migration_s']['p95']:.2f}, max {doc['migration_s']['max']:.2f}); "
             f"downtime U median {doc['downtime_ms']['U']['median']:.1f} ms, R "
             f"{doc['downtime_ms']['R']['median']:.1f} ms",
             "where a migration's time goes (median ms since its start): " + ", ".join(
                 f"{p} {s['median']:.0f}" for p, s in doc["phases_ms"].items()), "",
             f"{'session':8} {'sent':>7} {'received':>8} {'lost':>5} {'dup':>4} {'reord':>5} "
             f"{'retrans':>7} alive errors"]
    for rms, s in doc["sessions"].items():
        lines.append(f"{rms:8} {s['sent']:7d} {s['received']:8d} {s['lost']:5d} "
                     f"{s['duplicated']:4d} {s['reordered']:5d} {s['retransmits_client']:7d} "
                     f"{'yes' if s['alive'] else 'NO ':5} {'; '.join(s['errors']) or '-'}")
    e = doc["enter"]
    lines += [f"{'Enter':8} {e['sent']:7d} {e['received']:8d} {e['lost']:5d} "
              f"{e['duplicated']:4d}", "",
              f"{'process':12} {'metric':8} {'series (every ' + str(doc['sample_every']) + ')'}"]
    for label, s in doc["series"].items():
        for v in doc["verdicts"][label]:
            m = v["metric"]
            shown = [f"{x / 1024:.1f}" for x in s[m]] if m == "rss_kb" else [str(x) for x in s[m]]
            unit = " MiB" if m == "rss_kb" else ""
            scale = 1024 if m == "rss_kb" else 1
            lines.append(
                f"{label:12} {m:8} {' '.join(shown[:12])}{' …' if len(shown) > 12 else ''}"
                f"{unit}  -> growth {v['growth'] / scale:+.1f} (allowed "
                f"{v['allowed'] / scale:.1f}), slope {v['slope_per_100'] / scale:+.2f}/100: "
                f"{'flat' if v['ok'] else 'GROWS'}")
    lines.append("")
    lines.append(f"lost {doc['lost']}, duplicated {doc['duplicated']}, reordered "
                 f"{doc['reordered']}, reconnects {doc['reconnects']}, every session alive: "
                 f"{'yes' if doc['alive'] else 'NO'}, traces "
                 f"{'in order' if doc['trace_ok'] else 'NOT in order'}"
                 f"{', ' + doc['failure'] if doc['failure'] else ''}; "
                 f"{'nothing grew' if not doc['grew'] else 'GREW: ' + ', '.join(doc['grew'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrations", type=int, default=1000)
    p.add_argument("--sample-every", type=int, default=100,
                   help="migrations between resource samples (default %(default)s; even, so "
                   "the guest is back on host a at every sample, as at the first)")
    p.add_argument("--guest", choices=("sim",), default="sim",
                   help="the simulated guest (a QEMU guest's soak is not built)")
    p.add_argument("--mem-mb", type=int, default=32)
    p.add_argument("--period", type=float, default=0.05, help="s between keys, per session")
    p.add_argument("--interval", type=float, default=0.2,
                   help="typing between migrations, s (they also type during them)")
    p.add_argument("--max-fd-growth", type=float, default=4)
    p.add_argument("--max-thread-growth", type=float, default=2)
    p.add_argument("--max-rss-growth-mb", type=float, default=16)
    p.add_argument("--max-rss-growth-pct", type=float, default=15)
    p.add_argument("--max-failed", type=int, default=0,
                   help="migrations that may fail (and roll back) without failing the soak")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.migrations < 1 or args.sample_every < 1:
        p.error("--migrations and --sample-every must be at least 1")
    need_root("bench/soak.py")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (
        lambda *a: print(*a, flush=True))
    try:
        doc = asyncio.run(interruptible(soak(args, say)))
    except asyncio.CancelledError:
        say("interrupted: the lab and its sessions are removed")
        return 130
    doc["ok"] = ok(doc)
    path = save("soak", doc, args.out)
    say(table(doc))
    say(f"raw samples: {path}")
    if args.json:
        print(json.dumps({k: v for k, v in doc.items() if k != "per_migration_s"}))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
