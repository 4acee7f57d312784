#!/usr/bin/env python3
"""§5.2: response time of a key (its echo: the console's bytes over SSH, the
framebuffer update over VNC), with the servers in Domain R (keeper) and in Dom0
(the conventional baseline). No migration: this is what Domain R costs at rest.

    python bench/latency.py --seconds 10 [--json]

Writes bench/out/latency.json and .png, prints a table (with `--json`, then one JSON
line last: every row without its samples). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import finish, lab, need_root, pyplot, save

from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.typist import Typist
from keeper.lab.vncclient import VncTypist

GUEST = "guest1"


async def one(mode: str, rms: str, seconds: float) -> dict[str, Any]:
    async with lab("la") as spec:
        doc = await ops.create_guest(spec, GUEST, "a", mem_mb=64, mode=mode)
        if rms == "vnc":
            typist: Typist | VncTypist = await VncTypist.connect(spec.client_ns,
                                                                 (doc["ip"], 5900))
        else:
            work = Path(tempfile.mkdtemp(prefix="keeper-bench-"))
            link = await SshLink.start(spec.client_ns, doc["ip"],
                                       key=spec.ssh_dir / "id_ed25519",
                                       known_hosts=work / "known_hosts", workdir=work)
            await link.wait_connected()
            await asyncio.sleep(1.0)
            typist = Typist(link, b"guest1:~$ ")
        stop = asyncio.Event()
        task = asyncio.create_task(typist.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        stats = await task
        if isinstance(typist, Typist):
            await typist.link.finish()  # type: ignore[attr-defined]
        else:
            typist.close()
    lat = sorted(stats.echo_latencies_ms)
    return {"mode": mode, "rms": rms, "samples_ms": lat, "errors": stats.errors,
            "median_ms": statistics.median(lat) if lat else None,
            "p95_ms": lat[int(0.95 * (len(lat) - 1))] if lat else None,
            "max_ms": lat[-1] if lat else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0,
                   help="how long to type in each configuration (default %(default)s)")
    p.add_argument("--rms", default="vnc,ssh",
                   help="sessions to measure, comma-separated: vnc, ssh (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON line last: every row")
    args = p.parse_args(argv)
    if unknown := set(args.rms.split(",")) - {"vnc", "ssh"}:
        p.error(f"--rms: unknown {', '.join(sorted(unknown))} (vnc, ssh)")
    need_root("bench/latency.py")
    rows = []
    for rms in args.rms.split(","):
        for mode in ("keeper", "baseline"):
            print(f"{rms} with servers in {'Domain R' if mode == 'keeper' else 'Dom0'} ...",
                  file=sys.stderr)
            rows.append(asyncio.run(one(mode, rms, args.seconds)))
    print(f"\n{'rms':>4s} {'servers in':>10s} {'keys':>5s} {'median':>8s} {'p95':>8s} {'max':>8s}")
    for r in rows:
        where = "Domain R" if r["mode"] == "keeper" else "Dom0"
        print(f"{r['rms']:>4s} {where:>10s} {len(r['samples_ms']):5d} {r['median_ms']:6.2f}ms "
              f"{r['p95_ms']:6.2f}ms {r['max_ms']:6.2f}ms")
    path = save("latency", {"args": vars(args), "rows": rows})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.boxplot([r["samples_ms"] for r in rows], showfliers=False)
    ax.set_xticks(range(1, len(rows) + 1),
                  [f"{r['rms']}\n{'Domain R' if r['mode'] == 'keeper' else 'Dom0'}"
                   for r in rows])
    ax.set_ylabel("key-to-echo (ms)")
    finish(fig, path)
    if args.json:
        print(json.dumps({"bench": "latency", "seconds": args.seconds, "file": str(path),
                          "rows": [{k: v for k, v in r.items() if k != "samples_ms"}
                                   | {"keys": len(r["samples_ms"])} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
