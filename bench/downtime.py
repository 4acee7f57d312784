#!/usr/bin/env python3
"""§5.4: downtime of Domain R and of Domain U, and the downtime a user perceives (the
longest key-to-echo time overlapping the final stage), over VNC and over SSH, per
Domain U memory size.

    python bench/downtime.py --sizes 256,512,1024,2048 --migrations 4

Writes bench/out/downtime.json and .png, prints a table. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

from common import finish, lab, need_root, pyplot, save

from keeper import demo
from keeper.lab import ops


async def one(mem_mb: int, rms: str, migrations: int) -> dict[str, Any]:
    async with lab("dt") as spec:
        await ops.create_guest(spec, demo.GUEST, "a", mem_mb=mem_mb, dirty_rate=2000)
        summary = await demo.run_migrations(spec, migrations=migrations, interval=1.0,
                                            rms=rms, say=lambda *a: None)
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
    p.add_argument("--sizes", default="256,1024")
    p.add_argument("--rms", default="vnc,ssh")
    p.add_argument("--migrations", type=int, default=4)
    args = p.parse_args(argv)
    need_root("bench/downtime.py")
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
    path = save("downtime", {"args": vars(args), "rows": rows})
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
