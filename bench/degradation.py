#!/usr/bin/env python3
"""§5.5: how remote management feels while a co-migration runs: key response time
over time (VNC and SSH, one key every 50 ms), and the VNC frame rate over time with
the guest's screensaver redrawing the whole screen, with the migration marked.

    python bench/degradation.py --mem-mb 2048 [--json]

Writes bench/out/degradation.json and .png, prints before/during/after means (with
`--json`, then one JSON line last: every row's means, without its samples). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from common import finish, lab, need_root, pyplot, save

from keeper import demo
from keeper.lab import ops


def phases(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    def mean(sel: list[float]) -> float:
        return round(statistics.fmean(sel), 3) if sel else 0.0

    return {"before": mean([v for t, v in samples if t < start]),
            "during": mean([v for t, v in samples if start <= t <= end]),
            "after": mean([v for t, v in samples if t > end])}


async def response(mem_mb: int, rms: str, settle: float) -> dict[str, Any]:
    async with lab("dg") as spec:
        await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, dirty_rate=2000)
        summary = await demo.run_migrations(spec, migrations=1, interval=settle, rms=rms,
                                            say=lambda *a: None)
    (trace,) = summary["traces"]
    t0 = trace["t0_monotonic"]
    end = t0 + trace["total_ms"] / 1e3
    samples = [(t, ms) for t, ms in summary.pop("samples", [])]
    return {"rms": rms, "mem_mb": mem_mb, "migration": [t0, end], "samples": samples,
            "means_ms": phases(samples, t0, end), "lost": summary["lost"]}


async def frame_rate(mem_mb: int, settle: float) -> dict[str, Any]:
    from keeper.lab.vncclient import VncTypist

    async with lab("df") as spec:
        doc = await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, dirty_rate=2000)
        t = await VncTypist.connect(spec.client_ns, (doc["ip"], 5900))
        await t.type_text(b"screensaver\r")
        frames: list[float] = []
        reader = asyncio.create_task(t.watch_frames(frames, []))
        await asyncio.sleep(settle)
        trace = await ops.migrate(spec, demo.GUEST, "b")
        await asyncio.sleep(settle)
        reader.cancel()
        t.close()
    t0 = trace["t0_monotonic"]
    end = t0 + trace["total_ms"] / 1e3
    first = frames[0] if frames else t0
    bins: dict[int, int] = {}
    for f in frames:
        bins[int(f - first)] = bins.get(int(f - first), 0) + 1
    fps = [(first + k + 0.5, float(v)) for k, v in sorted(bins.items())][1:-1]
    return {"rms": "vnc-fps", "mem_mb": mem_mb, "migration": [t0, end], "samples": fps,
            "means_ms": phases(fps, t0, end), "lost": 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mb", type=int, default=1024,
                   help="the guest's memory in MiB (default %(default)s)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds measured before and after the migration (default %(default)s)")
    p.add_argument("--rms", default="vnc,ssh",
                   help="sessions whose response time to measure, comma-separated: vnc, ssh, "
                   "console (default %(default)s); the VNC frame rate is measured always")
    p.add_argument("--json", action="store_true", help="print one JSON line last: every row")
    args = p.parse_args(argv)
    if unknown := set(args.rms.split(",")) - {"vnc", "ssh", "console"}:
        p.error(f"--rms: unknown {', '.join(sorted(unknown))} (vnc, ssh, console)")
    need_root("bench/degradation.py")
    rows = []
    for rms in args.rms.split(","):
        print(f"response time over {rms} across a co-migration ...", file=sys.stderr)
        rows.append(asyncio.run(response(args.mem_mb, rms, args.settle)))
    print("VNC frame rate (screensaver) across a co-migration ...", file=sys.stderr)
    rows.append(asyncio.run(frame_rate(args.mem_mb, args.settle)))
    for r in rows:
        m = r["means_ms"]
        if r["rms"] == "vnc-fps":
            print(f"VNC frames/s: before {m['before']:.1f}, during {m['during']:.1f}, "
                  f"after {m['after']:.1f}")
        else:
            print(f"{r['rms']}: mean response before {m['before']:.2f} ms, during "
                  f"{m['during']:.2f} ms, after {m['after']:.2f} ms (lost {r['lost']})")
    path = save("degradation", {"args": vars(args), "rows": rows, "made": time.time()})
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.6 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        base = r["migration"][0]
        ax.plot([t - base for t, _ in r["samples"]], [v for _, v in r["samples"]], ".", ms=3)
        ax.axvspan(0, r["migration"][1] - base, alpha=0.2, label="co-migration")
        ax.set_ylabel("VNC frames/s" if r["rms"] == "vnc-fps" else f"{r['rms']} response (ms)")
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the start of the migration")
    finish(fig, path)
    if args.json:
        print(json.dumps({"bench": "degradation", "mem_mb": args.mem_mb,
                          "settle_s": args.settle, "file": str(path),
                          "rows": [{"rms": r["rms"], "means": r["means_ms"],
                                    "unit": "frames/s" if r["rms"] == "vnc-fps" else "ms",
                                    "lost": r["lost"],
                                    "samples": len(r["samples"]),
                                    "migration_s": round(r["migration"][1] - r["migration"][0],
                                                         3)} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
