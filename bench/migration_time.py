#!/usr/bin/env python3
"""§5.3: co-migration time against Domain U's memory size, with and without a client
typing, beside two independent migrations (the guest alone and Domain R alone)
started together.

    python bench/migration_time.py --sizes 256,512,1024,2048 --runs 3

Writes bench/out/migration_time.json and .png, prints a table. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

from common import finish, lab, need_root, pyplot, save

from keeper.lab import ops
from keeper.lab.typist import Typist

GUEST = "guest1"


async def co_migrations(mem_mb: int, runs: int, typing: bool) -> list[float]:
    async with lab("mt") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=mem_mb, dirty_rate=2000)
        stop = asyncio.Event()
        task = None
        if typing:
            t = await Typist.over_tcp(spec.client_ns, (doc["ip"], 2323), b"guest1:~$ ")
            task = asyncio.create_task(t.run(stop))
        times = []
        where = "a"
        for _ in range(runs):
            where = "b" if where == "a" else "a"
            times.append((await ops.migrate(spec, GUEST, where))["total_ms"])
            await asyncio.sleep(0.5)
        stop.set()
        if task is not None:
            await task
        return times


async def independent(mem_mb: int, runs: int) -> list[float]:
    """The guest (servers in Dom0) and a Domain R migrated at once, unsynchronised."""
    async with lab("mi") as spec:
        await ops.create_guest(spec, GUEST, "a", mem_mb=mem_mb, dirty_rate=2000,
                               mode="baseline")
        await ops.create_domr(spec, "r2", "a")
        times = []
        where = "a"
        loop = asyncio.get_running_loop()
        for _ in range(runs):
            where = "b" if where == "a" else "a"
            t0 = loop.time()
            await asyncio.gather(ops.migrate(spec, GUEST, where), ops.migrate(spec, "r2", where))
            times.append((loop.time() - t0) * 1e3)
            await asyncio.sleep(0.5)
        return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,512,1024")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    need_root("bench/migration_time.py")
    rows: list[dict[str, Any]] = []
    for mem in [int(x) for x in args.sizes.split(",")]:
        for kind in ("co-migration", "co-migration typing", "independent"):
            print(f"{mem} MiB {kind} ...", file=sys.stderr)
            if kind == "independent":
                samples = asyncio.run(independent(mem, args.runs))
            else:
                samples = asyncio.run(co_migrations(mem, args.runs, kind.endswith("typing")))
            rows.append({"mem_mb": mem, "kind": kind, "ms": samples,
                         "median_ms": statistics.median(samples)})
    print(f"\n{'memory':>8s}  {'co-migration':>14s}  {'+ typing':>10s}  {'independent':>12s}")
    for mem in sorted({r["mem_mb"] for r in rows}):
        med = {r["kind"]: r["median_ms"] for r in rows if r["mem_mb"] == mem}
        print(f"{mem:6d} MiB  {med['co-migration']:11.0f} ms  {med['co-migration typing']:7.0f} ms"
              f"  {med['independent']:9.0f} ms")
    path = save("migration_time", {"args": vars(args), "rows": rows})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in ("co-migration", "co-migration typing", "independent"):
        pts = [(r["mem_mb"], r["median_ms"] / 1e3) for r in rows if r["kind"] == kind]
        ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
    ax.set_xlabel("Domain U memory (MiB)")
    ax.set_ylabel("migration time (s)")
    ax.legend()
    finish(fig, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
