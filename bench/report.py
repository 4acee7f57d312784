#!/usr/bin/env python3
"""Run the paper's section-5 benches at a chosen scale and write bench/RESULTS.md:
each of the paper's findings beside ours, and the machine it ran on.

    python bench/report.py --scale quick     # minutes: small guests, few migrations
    python bench/report.py --scale paper     # the paper's sizes (256 MiB-2 GiB, 10 runs)

Needs root and matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, machine, need_root

HERE = Path(__file__).parent
RESULTS_DIR = HERE / "results"
SCALES = {
    "quick": {
        "keyloss.py": ["--migrations", "4"],
        "keyloss.py ssh": ["--migrations", "4", "--rms", "ssh"],
        "latency.py": ["--seconds", "5"],
        "throughput.py": ["--seconds", "5", "--chars", "2000000"],
        "migration_time.py": ["--sizes", "256,512", "--runs", "2"],
        "downtime.py": ["--sizes", "256", "--migrations", "3"],
        "degradation.py": ["--mem-mb", "512", "--settle", "3"],
    },
    "paper": {
        "keyloss.py": ["--migrations", "10"],
        "keyloss.py ssh": ["--migrations", "10", "--rms", "ssh"],
        "latency.py": ["--seconds", "20"],
        "throughput.py": ["--seconds", "20", "--chars", "10000000"],
        "migration_time.py": ["--sizes", "256,512,1024,2048", "--runs", "10"],
        "downtime.py": ["--sizes", "256,512,1024,2048", "--migrations", "10"],
        "degradation.py": ["--mem-mb", "2048", "--settle", "10"],
    },
}

PAPER = {
    "keyloss": "(over VNC) conventional: 1.4 keys lost per run on average; D-MORE: none; "
               "8.5 TCP retransmissions per migration; with the may-write extension off "
               "and a 200 ms event delay, keys were lost",
    "keyloss-ssh": "(the paper measured key loss over VNC only)",
    "latency": "SSH response about 0.1 ms slower through Domain R; VNC about the same",
    "throughput": "VNC frame rate about the same; SSH throughput slightly lower through "
                  "Domain R",
    "migration_time": "grows with Domain U's memory; +1.6 s (VNC) / +0.4 s (SSH) over two "
                      "independent migrations; +4.2 s (VNC) / +3.2 s (SSH) while typing",
    "downtime": "Domain R's downtime above Domain U's; perceived downtime at most 827 ms "
                "(VNC) and 613 ms (SSH)",
    "degradation": "response time +5.4 ms (VNC) / +2.0 ms (SSH) during the co-migration "
                   "(2 GiB), for about 30 s; frame rate -0.4 fps",
}


NOTES = {
    "keyloss": "our baseline client stops typing when its connection breaks, so it can "
               "only lose keys sitting unread in the old server's socket; what it pays "
               "is one broken session per migration",
    "migration_time": "'independent' migrates the guest alone (its servers in Dom0, "
                      "restarted on the target, included in the time) and a stand-alone "
                      "Domain R at the same moment, unsynchronised; here typing goes "
                      "through the raw console",
    "keyloss-ssh": "over SSH our client checks every echo: when keys are lost (the "
                   "ablation) the echo stream is wrong, it gives up the session and "
                   "reconnects, which is what its reconnects count there",
    "downtime": "perceived = the slowest key whose round trip overlapped Domain R's "
                "frozen window",
    "throughput": "the guest prints `seq` output through its 2 KiB console ring; the "
                  "OpenSSH row is sshd's `cat` of the same bytes on the same lab path",
}


def _keyloss(doc: dict) -> str:
    return "; ".join(
        f"{r['config']}: {r['lost']} of {r['keys_sent']} keys lost, {r['reconnects']} "
        f"reconnects, {r['retransmits_per_migration']} retransmissions per migration"
        for r in doc["results"])


def _latency(doc: dict) -> str:
    return "; ".join(
        f"{r['rms']} via {'Domain R' if r['mode'] == 'keeper' else 'Dom0'}: median "
        f"{r['median_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms" for r in doc["rows"])


def _throughput(doc: dict) -> str:
    return "; ".join(
        f"VNC via {r['mode']}: {r['full_screens_per_s']:.1f} full screens/s"
        if r["what"] == "vnc" else f"SSH via {r['mode']}: {r['chars_per_s'] / 1e6:.2f} M chars/s"
        for r in doc["rows"])


def _migration_time(doc: dict) -> str:
    return "; ".join(f"{r['mem_mb']} MiB {r['kind']}: {r['median_ms'] / 1e3:.2f} s"
                     for r in doc["rows"])


def _downtime(doc: dict) -> str:
    return "; ".join(
        f"{r['mem_mb']} MiB {r['rms']}: U {statistics.median(r['downtime_u_ms']):.1f} ms, "
        f"R {statistics.median(r['downtime_r_ms']):.1f} ms, perceived max "
        f"{max(r['perceived_ms']):.0f} ms" for r in doc["rows"])


def _degradation(doc: dict) -> str:
    return "; ".join(
        (f"VNC frame rate {r['means_ms']['before']:.1f} fps before, "
         f"{r['means_ms']['during']:.1f} during, {r['means_ms']['after']:.1f} after")
        if r["rms"] == "vnc-fps" else
        (f"{r['rms']}: mean response {r['means_ms']['before']:.2f} ms before, "
         f"{r['means_ms']['during']:.2f} ms during, {r['means_ms']['after']:.2f} ms after")
        for r in doc["rows"])


SUMMARIES = {"keyloss": _keyloss, "keyloss-ssh": _keyloss, "latency": _latency,
             "throughput": _throughput, "migration_time": _migration_time,
             "downtime": _downtime, "degradation": _degradation}


def ours() -> dict[str, str]:
    """One line per bench from its JSON, for those that have run."""
    out = {}
    for name, summarise in SUMMARIES.items():
        path = OUT / f"{name}.json"
        if path.exists():
            out[name] = summarise(json.loads(path.read_text()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--only", help="comma-separated bench scripts to run (default: all)")
    p.add_argument("--no-run", action="store_true", help="only rewrite RESULTS.md")
    args = p.parse_args(argv)
    need_root("bench/report.py")
    started = time.time()
    if not args.no_run:
        for key, extra in SCALES[args.scale].items():
            script = key.split()[0]
            if args.only and script.removesuffix(".py") not in args.only.split(","):
                continue
            print(f"== {script} {' '.join(extra)}", file=sys.stderr)
            subprocess.run([sys.executable, str(HERE / script), *extra], check=False)
    results = ours()
    m = machine()
    lines = ["# Results: the paper's section 5, and ours", "",
             f"Scale `{args.scale}`, on {m['machine']} with {m['cpus']} CPUs, Linux "
             f"{m['kernel']}, Python {m['python']}; written by `bench/report.py` "
             f"({time.strftime('%Y-%m-%d', time.gmtime(started))}). The paper used two "
             "Xeon E3-1270 hosts on gigabit Ethernet with Xen 4.3.2; we use one machine "
             "with network namespaces and a simulated hypervisor (see the README).", ""]
    for name, text in PAPER.items():
        lines += [f"## {name}", "", f"- paper: {text}",
                  f"- keeper: {results.get(name, 'not run at this scale yet')}"]
        if name in NOTES:
            lines.append(f"- note: {NOTES[name]}")
        png = OUT / f"{name}.png"
        if png.exists():  # the plot goes into the repository beside RESULTS.md
            RESULTS_DIR.mkdir(exist_ok=True)
            shutil.copyfile(png, RESULTS_DIR / png.name)
            lines += ["", f"![{name}](results/{png.name})"]
        lines += ["", f"Raw samples: `bench/out/{name}.json` (written by the bench).", ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
