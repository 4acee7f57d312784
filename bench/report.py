#!/usr/bin/env python3
"""Run the paper's section-5 benches at a chosen scale and write bench/RESULTS.md:
each of the paper's findings beside ours, and the machine it ran on.

    python bench/report.py --scale quick     # minutes: small guests, few migrations
    python bench/report.py --scale paper     # the paper's sizes (256 MiB-2 GiB, 10 runs)

    python bench/report.py --only keyloss    # one bench; the other sections as committed
    python bench/report.py --no-run          # rewrite RESULTS.md from bench/results/*.json

Evidence that cannot go stale or silent: every bench it runs writes its JSON into
`--out` (bench/out; the benches honour KEEPER_BENCH_OUT); a section is written only
from a bench that exited 0 and whose JSON (and plot) is newer than that bench's run,
and that JSON is then committed beside the plot as bench/results/<section>.json,
stamped with the run (argv, exit status, date). A section whose bench failed, wrote
nothing, or left only an older file is not written: RESULTS.md says so, the stale
file is not copied, and report.py exits 1 naming each. Sections of benches not run
this time come from the committed, stamped JSON (with its run's date), or say "not run".

Needs root and matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
                  "Domain R (ours: the guest's screen uncapped, per encoding)",
    "migration_time": "grows with Domain U's memory; +1.6 s (VNC) / +0.4 s (SSH) over two "
                      "independent migrations; +4.2 s (VNC) / +3.2 s (SSH) while typing",
    "downtime": "Domain R's downtime above Domain U's; perceived downtime at most 827 ms "
                "(VNC) and 613 ms (SSH)",
    "degradation": "response time +5.4 ms (VNC) / +2.0 ms (SSH) during the co-migration "
                   "(2 GiB), for about 30 s; frame rate -0.4 fps",
}


NOTES = {
    "keyloss": "the baseline runs in Xen's order: the source's Dom0 servers keep "
               "reading keys into the stopped guest's devices until the source domain "
               "is destroyed, after the guest resumed on the target; what they read "
               "after the final copy is lost, and so are keys still unread in their "
               "sockets when they close (the paper's 1.4 keys per run); our client "
               "stops typing when its connection breaks, then reconnects to the new "
               "host",
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
    def fed(r: dict) -> str:  # the baseline: its servers' feeding after the final copy
        ms = [m["after_final_copy_ms"] for m in r.get("migrations", [])
              if m.get("after_final_copy_ms") is not None]
        return (f", its servers fed the guest {statistics.median(ms):.0f} ms (median) after "
                f"the final copy" if ms else "")

    def dup(r: dict) -> str:  # a reconnecting client restarts its script: lines repeat
        return (f" (and {r['duplicated']} typed again after reconnecting: the alignment "
                f"counts {r['lost']} out of place)" if r.get("duplicated") else "")

    return "; ".join(
        f"{r['config']}: {r['keys_sent'] - r['keys_received']} of {r['keys_sent']} keys "
        f"never reached the guest "
        f"({(r['keys_sent'] - r['keys_received']) / max(1, len(r.get('migrations', []))):.1f}"
        f" per migration){dup(r)}, {r['reconnects']} reconnects, "
        f"{r['retransmits_per_migration']} retransmissions per migration{fed(r)}"
        for r in doc["results"])


def _latency(doc: dict) -> str:
    return "; ".join(
        f"{r['rms']} via {'Domain R' if r['mode'] == 'keeper' else 'Dom0'}: median "
        f"{r['median_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms" for r in doc["rows"])


ENCODING_NAMES = {"raw": "Raw", "hextile": "Hextile", "zrle": "ZRLE"}


def _throughput(doc: dict) -> str:
    return "; ".join(
        f"VNC {ENCODING_NAMES.get(r.get('encoding', 'raw'), r.get('encoding'))} via {r['mode']}: "
        f"{r['full_screens_per_s']:.1f} full screens/s"
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


def section_of(key: str) -> str:
    """The RESULTS.md section (and JSON name) a SCALES entry writes: "keyloss.py ssh"
    -> keyloss-ssh, "latency.py" -> latency."""
    script, *variant = key.split()
    return "-".join([script.removesuffix(".py"), *variant])


# a file's mtime comes from the kernel's coarse clock, a few ms behind time.time()
CLOCK_SLACK_S = 0.05


@dataclass
class Run:
    """One bench run by this report: what it ran, when, and how it ended."""

    section: str
    argv: list[str]
    started: float
    returncode: int

    def stamp(self, scale: str) -> dict[str, Any]:
        return {"section": self.section, "argv": self.argv, "scale": scale,
                "started": self.started, "bench_exit": self.returncode,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started))}


def fresh(run: Run, out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON a run wrote, or why no section may be written from it: the bench
    failed, wrote nothing, or the file is older than the run (left by an earlier one)."""
    path = out / f"{run.section}.json"
    if run.returncode != 0:
        return None, f"{run.section}: `{' '.join(run.argv)}` exited {run.returncode}"
    if not path.exists():
        return None, f"{run.section}: `{' '.join(run.argv)}` wrote no {path}"
    mtime = path.stat().st_mtime
    if mtime + CLOCK_SLACK_S < run.started:
        return None, (f"{run.section}: {path} is older than this run (written "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(mtime))}, run "
                      f"started {time.strftime('%H:%M:%S', time.localtime(run.started))})")
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{run.section}: {path} is not JSON: {exc}"


def committed(results: Path, name: str) -> dict[str, Any] | None:
    """The evidence a previous report committed for `name`, if it came from a bench
    that succeeded (report.py stamps what it copies)."""
    path = results / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stamp = doc.get("report") if isinstance(doc, dict) else None
    if not isinstance(stamp, dict) or stamp.get("bench_exit") != 0:
        return None
    return doc


def run_benches(args: argparse.Namespace, out: Path) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    env = {**os.environ, "KEEPER_BENCH_OUT": str(out)}  # every bench writes there
    for key, extra in SCALES[args.scale].items():
        script = key.split()[0]
        if args.only and script.removesuffix(".py") not in args.only.split(","):
            continue
        argv = [sys.executable, str(args.bench_dir / script), *extra]
        print(f"== {script} {' '.join(extra)}", file=sys.stderr)
        started = time.time()
        done = subprocess.run(argv, check=False, env=env)
        runs[section_of(key)] = Run(section_of(key), [script, *extra], started,
                                    done.returncode)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--only", help="comma-separated bench scripts to run (default: all)")
    p.add_argument("--no-run", action="store_true",
                   help="only rewrite RESULTS.md from the committed bench/results/*.json")
    p.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=OUT,
                   help="where the benches write their JSON (default %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR,
                   help="the committed evidence: JSON and plots (default %(default)s)")
    p.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    started = time.time()
    runs: dict[str, Run] = {}
    if not args.no_run:
        need_root("bench/report.py")
        runs = run_benches(args, args.out)
    refused: list[str] = []
    m = machine()
    lines = ["# Results: the paper's section 5, and ours", "",
             f"Scale `{args.scale}`, on {m['machine']} with {m['cpus']} CPUs, Linux "
             f"{m['kernel']}, Python {m['python']}; written by `bench/report.py` "
             f"({time.strftime('%Y-%m-%d', time.gmtime(started))}). The paper used two "
             "Xeon E3-1270 hosts on gigabit Ethernet with Xen 4.3.2; we use one machine "
             "with network namespaces and a simulated hypervisor (see the README). Every "
             "line below comes from the JSON beside it in `bench/results/`, written by a "
             "bench that succeeded; the date is its run's.", ""]
    for name, text in PAPER.items():
        lines += [f"## {name}", "", f"- paper: {text}"]
        doc, why = None, None
        if name in runs:
            doc, why = fresh(runs[name], args.out)
            if doc is not None:
                try:
                    SUMMARIES[name](doc)  # a section can be written from it
                except (KeyError, TypeError, ValueError, statistics.StatisticsError) as exc:
                    doc, why = None, f"{name}: its JSON lacks what the section needs ({exc!r})"
            if doc is not None:  # fresh and whole: it becomes the committed evidence
                doc["report"] = runs[name].stamp(args.scale)
                args.results.mkdir(parents=True, exist_ok=True)
                (args.results / f"{name}.json").write_text(json.dumps(doc, indent=1))
                png = args.out / f"{name}.png"
                if png.exists() and png.stat().st_mtime + CLOCK_SLACK_S >= runs[name].started:
                    shutil.copyfile(png, args.results / png.name)
        else:
            doc = committed(args.results, name)
        if why is not None:
            refused.append(why)
            lines.append(f"- keeper: **not written**: {why}")
        elif doc is None:
            lines.append("- keeper: not run at this scale yet")
        else:
            lines.append(f"- keeper: {SUMMARIES[name](doc)} (run of {doc['report']['date']}, "
                         f"`{' '.join(doc['report']['argv'])}`)")
        if name in NOTES:
            lines.append(f"- note: {NOTES[name]}")
        if doc is not None and (args.results / f"{name}.png").exists():
            lines += ["", f"![{name}](results/{name}.png)"]
        if doc is not None:
            lines += ["", f"Raw samples: `bench/results/{name}.json`."]
        lines.append("")
    args.md.write_text("\n".join(lines))
    print(f"wrote {args.md}")
    for why in refused:
        print(f"refused: {why}", file=sys.stderr)
    if refused:
        print(f"{len(refused)} section(s) not written: "
              f"{', '.join(w.split(':')[0] for w in refused)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
