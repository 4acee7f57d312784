#!/usr/bin/env python3
"""Move a live Domain R between two hosts N times and measure what it costs.

Sessions: typists (a few bytes every 50 ms, the paper's §5.1 workload) and one bulk
stream, all from the lab's client namespace, every echoed byte checked. Per move:
the pause the client saw (slowest round trip overlapping the frozen window), the
server-side pause (quiesce → resumed on the target), TCP retransmissions on the
client's sockets and on Domain R's restored sockets, and time spent dumping,
transferring and restoring, per socket.

    python bench/move.py --moves 20 --json

prints a table, writes every sample to bench/out/move.json, and ends with one JSON
line. Exit status 0 only if nothing was lost or corrupted and nothing reconnected.
Needs root (it builds its own lab, named uniquely, and removes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path

from keeper.lab import domr_moves as demo
from keeper.lab import ops, topology


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moves", type=int, default=20)
    p.add_argument("--typists", type=int, default=3)
    p.add_argument("--no-bulk", action="store_true", help="no bulk stream, typists only")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between moves")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "move.json")
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/move.py needs root (network namespaces, TCP_REPAIR)", file=sys.stderr)
        return 2
    lab = f"bm{secrets.token_hex(3)}"
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    async def run() -> dict:
        spec = await ops.up(lab)
        return await demo.run_moves(spec, moves=args.moves, typists=args.typists,
                                    bulk=not args.no_bulk, interval=args.interval, say=say)

    started = time.time()
    try:
        summary = asyncio.run(run())
    finally:
        topology.down(lab)
    per = summary["per_move"]

    def col(key: str) -> list[float]:
        return [float(m[key]) for m in per] or [0.0]

    say("\n                         median       max")
    for key, label in (("pause_ms_client", "pause, client (ms)"),
                       ("pause_ms_server", "pause, server (ms)"),
                       ("dump_ms_per_socket", "dump / socket (ms)"),
                       ("transfer_ms", "transfer (ms)"),
                       ("restore_ms_per_socket", "restore / socket (ms)"),
                       ("retransmits_client", "retransmits, client"),
                       ("retransmits_server", "retransmits, server")):
        say(f"{label:22s} {statistics.median(col(key)):9.3f} {max(col(key)):9.3f}")
    say(f"bytes sent {summary['bytes_sent']}, received {summary['bytes_received']}, "
        f"corrupted {summary['corrupted']}, reconnects {summary['reconnects']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": "move", "started": started, "machine": {
        "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()}, **summary}
    args.out.write_text(json.dumps(record, indent=1))
    say(f"raw samples: {args.out}")
    brief = {k: v for k, v in summary.items() if k not in ("per_move", "errors")}
    brief["dump_ms_per_socket_median"] = statistics.median(col("dump_ms_per_socket"))
    brief["restore_ms_per_socket_median"] = statistics.median(col("restore_ms_per_socket"))
    brief["transfer_ms_median"] = statistics.median(col("transfer_ms"))
    if args.json:
        print(json.dumps(brief))
    return 0 if demo.ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
