#!/usr/bin/env python3
"""§5.4: downtime of Domain R and of Domain U, and the downtime a user perceives (the
longest key-to-echo time overlapping the final stage), over VNC and over SSH, per
Domain U memory size.

    python bench/downtime.py --sizes 256,512,1024,2048 --migrations 4
    python bench/downtime.py --guest qemu --json
    python bench/downtime.py --migrations 100 --json

On the simulated guest (console, SSH and VNC by default) the table and the JSON line
also give, per RMS over every migration, the longest pause a client saw, its 99th
percentile and median, against issue 13's goal (max ≤ 60 ms over 100 migrations);
the client types a key every 10 ms there, so that every frozen window is sampled
(`unsampled` counts the migrations no key overlapped).

With `--guest qemu` (a real Linux VM under QEMU, 128 MiB unless `--sizes`), per RMS
(`ssh`: keeper's row OpenSSH through Domain R, the baseline's a raw TCP client of
QEMU's serial chardev on the host address, it has no SSH server; `vnc`) each row has
the VM's downtime as QEMU reports it (`qemu_downtime_ms`), keeper's span "U stopped"
→ "U resumed", Domain R's downtime and the pause the client saw (the slowest key
whose round trip overlapped Domain R's frozen window, as `keeper demo` measures it);
the baseline's row has no Domain R and no pause but a cut: the span from the VM's
stop to the source QEMU's exit (its consoles close; keys typed meanwhile are
dropped) and when the client was connected to the new host again. The goal is
printed, never asserted: keeper's pause under QEMU's default downtime limit (300
ms) and close to the VM's downtime plus one round trip (the median key-to-echo).

Writes bench/out/downtime.json and .png, prints a table (with `--json`, then one
JSON line last: every row). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import OUT, finish, lab, need_root, pyplot, save
from keyloss import typing

from keeper import demo
from keeper.lab import ops

QEMU_DOWNTIME_LIMIT_MS = 300.0  # QEMU's default downtime-limit


GOAL_PAUSE_MS = 60.0  # issue 13: the longest pause over 100 co-migrations, every RMS
# On the simulated guest the client types a key every 10 ms (a person: 50 ms), so
# that keys are in flight in every frozen window of Domain R (20 ms and more here):
# a window no key overlapped would show a pause of 0 that nobody measured.
PERIOD_S = 0.01


def p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank (of 100 values: the second largest)."""
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)] if ordered else 0.0


def pause_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per RMS, over every migration of every size: the pause a client saw (max, p99,
    median) and Domain R's downtime (median, max)."""
    out: dict[str, dict[str, float]] = {}
    for rms in dict.fromkeys(r["rms"] for r in rows):
        pauses = [v for r in rows if r["rms"] == rms for v in r["perceived_ms"]]
        down_r = [v for r in rows if r["rms"] == rms for v in r["downtime_r_ms"]]
        if not pauses:
            continue
        out[rms] = {"migrations": len(pauses), "unsampled": sum(1 for v in pauses if v <= 0),
                    "max_ms": round(max(pauses), 3),
                    "p99_ms": round(p99(pauses), 3),
                    "median_ms": round(statistics.median(pauses), 3),
                    "downtime_r_median_ms": round(statistics.median(down_r), 3),
                    "downtime_r_max_ms": round(max(down_r), 3)}
    return out


def _med(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


async def qemu_keeper(mem_mb: int, rms: str, migrations: int) -> dict[str, Any]:
    async with lab("dt") as spec:
        await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, guest="qemu")
        summary = await demo.run_migrations(spec, migrations=migrations, interval=1.0,
                                            rms=rms, say=lambda *a: None)
    traces = summary.pop("traces")
    rtt = summary["pause_ms_median"]
    return {
        "config": "keeper", "guest": "qemu", "mem_mb": mem_mb, "rms": rms,
        "client": "OpenSSH -> Domain R" if rms == "ssh" else f"{rms} -> Domain R",
        "lost": summary["lost"], "reconnects": summary["reconnects"],
        "qemu_downtime_ms": [t.get("qemu_downtime_ms") for t in traces],
        "downtime_u_ms": [t["downtime_ms"]["U"] for t in traces],
        "downtime_r_ms": [t["downtime_ms"]["R"] for t in traces],
        "pause_ms": [t.get("pause_ms", 0.0) for t in traces],
        "rtt_ms_median": rtt,
    }


async def qemu_baseline(mem_mb: int, rms: str, migrations: int) -> dict[str, Any]:
    """The stock QEMU set-up: the client is cut off at each migration and reconnects to
    the new host's address (bench/keyloss.py's client)."""
    rec: dict[str, Any] = {"config": "baseline", "sent": bytearray(), "reconnects": 0,
                           "connections": 0, "connect_failures": 0, "retransmits_client": 0,
                           "latencies_ms": [], "errors": [], "sessions": []}
    traces = []
    async with lab("dt") as spec:
        await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, guest="qemu",
                               mode="baseline")
        stop = asyncio.Event()
        task = asyncio.create_task(typing(spec, stop, 0.05, rms, rec, "qemu"))
        await asyncio.sleep(2.0)
        where = "a"
        for _ in range(migrations):
            where = "b" if where == "a" else "a"
            traces.append(await ops.migrate(spec, demo.GUEST, where))
            await asyncio.sleep(3.0)  # the client notices, finds the new host, types
        stop.set()
        await task
    echoes = sorted(t + ms / 1e3 for t, ms in rec.get("samples", []))
    connected = sorted(rec.get("connected_at", []))
    cut, back, gap = [], [], []
    for tr in traces:
        at = {m["name"]: tr["t0_monotonic"] + m["ms"] / 1e3 for m in tr["marks"]}
        stopped, released = at["U stopped"], at["source released"]
        cut.append(round((released - stopped) * 1e3, 3))
        again = next((c for c in connected if c >= released), None)
        back.append(round((again - stopped) * 1e3, 3) if again is not None else None)
        last = max((e for e in echoes if e <= stopped), default=None)
        first = next((e for e in echoes if e >= released), None)
        gap.append(round((first - last) * 1e3, 3) if first and last else None)
    return {
        "config": "baseline", "guest": "qemu", "mem_mb": mem_mb, "rms": rms,
        "client": ("RFB viewer -> QEMU's VNC server, host address :5900" if rms == "vnc" else
                   "raw TCP -> QEMU's serial chardev, host address :2323 (no SSH server)"),
        "reconnects": rec["reconnects"],
        "qemu_downtime_ms": [t.get("qemu_downtime_ms") for t in traces],
        "downtime_u_ms": [t["downtime_ms"]["U"] for t in traces],
        "cut_ms": cut,  # the VM's stop -> the source QEMU's exit: keys typed are dropped
        # the VM's stop -> the client ready to type on the new host: it noticed the cut,
        # asked where the guest is, connected (the console client then also waits for
        # a quiet console, 0.4 s, and types its mark line)
        "reconnected_ms": back,
        # last echo before the stop -> first echo after the reconnect (the console
        # client waits for a quiet console and types a mark line first: ~1 s of it)
        "client_gap_ms": gap,
    }


def qemu_main(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in (args.sizes or "128").split(",")]
    rows = []
    for mem in sizes:
        for rms in (args.rms or "ssh,vnc").split(","):
            for config, fn in (("keeper", qemu_keeper), ("baseline", qemu_baseline)):
                print(f"{mem} MiB over {rms}, {config} ...", file=sys.stderr)
                rows.append(asyncio.run(fn(mem, rms, args.migrations)))
    print(f"\nQEMU guest, {args.migrations} migrations per row; medians (max)")
    print(f"{'memory':>8s} {'rms':>4s} {'config':>8s} {'QEMU dt':>8s} {'U':>8s} {'R':>8s} "
          f"{'pause':>15s} {'cut':>8s} {'reconn':>8s} {'lost':>5s}")
    for r in rows:
        def f(key: str, r: dict[str, Any] = r) -> str:
            v = _med(r.get(key, []))
            return "-" if v is None else f"{v:.1f}"
        pause = (f"{_med(r['pause_ms']):.1f} ({max(r['pause_ms']):.1f})"
                 if r.get("pause_ms") else "cut off")
        print(f"{r['mem_mb']:5d} MiB {r['rms']:>4s} {r['config']:>8s} {f('qemu_downtime_ms'):>8s}"
              f" {f('downtime_u_ms'):>8s} {f('downtime_r_ms'):>8s} {pause:>15s}"
              f" {f('cut_ms'):>8s} {f('reconnected_ms'):>8s} {r.get('lost', '-')!s:>5s}")
    print(f"\ngoal (printed, not asserted): keeper's pause under QEMU's default downtime limit "
          f"({QEMU_DOWNTIME_LIMIT_MS:.0f} ms), close to the VM's downtime + one round trip")
    for r in rows:
        if r["config"] != "keeper":
            continue
        pause, vm = max(r["pause_ms"]), _med(r["qemu_downtime_ms"]) or 0.0
        r["goal"] = {"pause_max_ms": pause, "under_limit": pause < QEMU_DOWNTIME_LIMIT_MS,
                     "vm_downtime_plus_rtt_ms": round(vm + r["rtt_ms_median"], 3)}
        print(f"  {r['mem_mb']} MiB {r['rms']}: pause max {pause:.1f} ms "
              f"({'under' if pause < QEMU_DOWNTIME_LIMIT_MS else 'OVER'} "
              f"{QEMU_DOWNTIME_LIMIT_MS:.0f} ms); VM downtime {vm:.1f} + round trip "
              f"{r['rtt_ms_median']:.1f} = {vm + r['rtt_ms_median']:.1f} ms")
    path = save("downtime-qemu", {"args": {k: str(v) for k, v in vars(args).items()},
                                  "rows": rows}, args.out)
    print(f"\nraw samples: {path}")
    if args.json:
        print(json.dumps({"bench": "downtime", "guest": "qemu",
                          "migrations": args.migrations, "file": str(path), "rows": [
                              {k: v for k, v in r.items()} for r in rows]}))
    return 0


async def one(mem_mb: int, rms: str, migrations: int) -> dict[str, Any]:
    async with lab("dt") as spec:
        await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, dirty_rate=2000)
        summary = await demo.run_migrations(spec, migrations=migrations, interval=1.0,
                                            rms=rms, say=lambda *a: None, period=PERIOD_S)
    traces = summary.pop("traces")
    return {
        "mem_mb": mem_mb, "rms": rms, "lost": summary["lost"],
        "reconnects": summary["reconnects"],
        "downtime_u_ms": [t["downtime_ms"]["U"] for t in traces],
        "downtime_r_ms": [t["downtime_ms"]["R"] for t in traces],
        "perceived_ms": [t.get("pause_ms", 0.0) for t in traces],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="MiB; default 256,1024 (sim), 128 (qemu)")
    p.add_argument("--rms", default=None,
                   help="default console,ssh,vnc (sim), ssh,vnc (qemu)")
    p.add_argument("--migrations", type=int, default=4)
    p.add_argument("--guest", choices=["sim", "qemu"], default="sim")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", action="store_true", help="print one JSON line last: every row")
    args = p.parse_args(argv)
    need_root("bench/downtime.py")
    if args.guest == "qemu":
        return qemu_main(args)
    args.sizes, args.rms = args.sizes or "256,1024", args.rms or "console,ssh,vnc"
    rows = []
    for mem in [int(x) for x in args.sizes.split(",")]:
        for rms in args.rms.split(","):
            print(f"{mem} MiB over {rms} ...", file=sys.stderr)
            rows.append(asyncio.run(one(mem, rms, args.migrations)))
    print(f"\n{'memory':>8s} {'rms':>4s} {'U median':>9s} {'R median':>9s} {'perceived max':>14s}"
          f" {'lost':>5s}")
    for r in rows:
        print(f"{r['mem_mb']:5d} MiB {r['rms']:>4s} {statistics.median(r['downtime_u_ms']):7.1f}ms"
              f" {statistics.median(r['downtime_r_ms']):7.1f}ms {max(r['perceived_ms']):12.1f}ms"
              f" {r['lost']:5d}")
    pauses = pause_summary(rows)
    print(f"\npause a client saw, over {args.migrations} migrations per size "
          f"(goal: max <= {GOAL_PAUSE_MS:.0f} ms, printed, not asserted)")
    print(f"{'rms':>8s} {'n':>5s} {'max':>9s} {'p99':>9s} {'median':>9s} {'R median':>9s}")
    for rms, v in pauses.items():
        print(f"{rms:>8s} {v['migrations']:5.0f} {v['max_ms']:7.1f}ms {v['p99_ms']:7.1f}ms "
              f"{v['median_ms']:7.1f}ms {v['downtime_r_median_ms']:7.1f}ms")
    path = save("downtime", {"args": {k: str(v) for k, v in vars(args).items()},
                             "rows": rows, "pause": pauses}, args.out)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['mem_mb']}M {r['rms']}" for r in rows]
    xs = range(len(rows))
    width = 0.27
    for i, (key, name) in enumerate((("downtime_u_ms", "Domain U"), ("downtime_r_ms", "Domain R"),
                                     ("perceived_ms", "perceived (max)"))):
        vals = [max(r[key]) if key == "perceived_ms" else statistics.median(r[key])
                for r in rows]
        ax.bar([x + (i - 1) * width for x in xs], vals, width, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.legend()
    finish(fig, path)
    if args.json:
        print(json.dumps({"bench": "downtime", "guest": "sim", "migrations": args.migrations,
                          "goal_pause_ms": GOAL_PAUSE_MS, "pause": pauses, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
