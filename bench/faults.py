#!/usr/bin/env python3
"""Fault drills: runs every drill of keeper.lab.faults.{wire,window,hostile} (the
modules that exist), one after another, and prints a row per drill.

  wire      loss on the wire during co-migrations (console, SSH, VNC at 2 and 10 %)
  window    the window after Domain U resumed on the target (kill or fail each process)
  hostile   malformed and hostile input at every entry point

Each drill builds its own lab and removes it. A row says how many client sessions
ran through it, how many keys or bytes were lost, how many connections had to be
opened again, and whether it recovered (afterwards one Domain R serves the guest and
every session goes on), plus what the drill measured (pause, retransmissions, ...).
With `--json`, one JSON line last: every row. Exit status 1 if any row lost
anything or did not recover (or a module could not be loaded), 2 if no drill matched.
Needs root. Writes bench/out/faults.json.

    python bench/faults.py --json
    python bench/faults.py --only wire
    python bench/faults.py --only wire/ssh --list
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import OUT, interruptible, need_root, save

from keeper.lab.faults import Drill, Row

MODULES = ("wire", "window", "hostile")


def load(modules: tuple[str, ...] = MODULES) -> tuple[list[Drill], dict[str, str]]:
    """Every drill of the modules that exist; a module that exists but does not load
    (or has no CASES) is an error, said by name."""
    drills: list[Drill] = []
    errors: dict[str, str] = {}
    for name in modules:
        full = f"keeper.lab.faults.{name}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                continue  # not written (yet): nothing to run
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        cases = getattr(mod, "CASES", None)
        if not isinstance(cases, list) or not all(isinstance(c, Drill) for c in cases):
            errors[name] = f"{full} has no CASES list of Drill"
            continue
        drills += cases
    return drills, errors


def select(drills: list[Drill], only: str | None, skip: str | None) -> list[Drill]:
    """`--only a,b`: drills whose name is or starts with one of them (a module
    "wire", a group "wire/ssh", one drill); `--skip` likewise, removed."""
    def matches(name: str, patterns: str) -> bool:
        return any(name == p or name.startswith(p.rstrip("/") + "/")
                   for p in (x.strip() for x in patterns.split(",")) if p)

    out = [d for d in drills if only is None or matches(d.name, only)]
    return [d for d in out if skip is None or not matches(d.name, skip)]


async def run_all(drills: list[Drill], say: Any) -> list[dict[str, Any]]:
    rows = []
    for i, d in enumerate(drills, 1):
        say(f"[{i}/{len(drills)}] {d.name} ...")
        t0 = time.monotonic()
        try:
            row = await d.run()
        except Exception as exc:  # a drill that raises is a drill that failed
            row = Row(case=d.name, sessions=0, lost=0, reconnects=0, recovered=False,
                      extra={"error": f"{type(exc).__name__}: {exc}"})
        doc = row.doc()
        doc["seconds"] = round(time.monotonic() - t0, 1)
        say(f"    {line(doc)}")
        rows.append(doc)
    return rows


def failed(row: dict[str, Any]) -> bool:
    return row["lost"] > 0 or not row["recovered"]


def line(r: dict[str, Any]) -> str:
    notes = []
    if "pause_ms" in r and isinstance(r["pause_ms"], dict):
        notes.append(f"pause max {r['pause_ms']['max']:.0f} ms")
    if "retransmits_client_per_migration" in r:
        notes.append("retransmits/migration "
                     + ",".join(str(x) for x in r["retransmits_client_per_migration"]))
    if "error" in r:
        notes.append(f"error: {str(r['error'])[:80]}")
    return (f"{r['case']:32} {r['sessions']:8d} {r['lost']:5d} {r['reconnects']:10d} "
            f"{'yes' if r['recovered'] else 'NO':9} {'; '.join(notes)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated drills, groups or modules "
                   "(e.g. wire, wire/ssh, window)")
    p.add_argument("--skip", help="comma-separated drills, groups or modules to leave out")
    p.add_argument("--list", action="store_true", help="print the selected drills, run none")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    drills, errors = load()
    chosen = select(drills, args.only, args.skip)
    for name, err in errors.items():
        print(f"keeper.lab.faults.{name} did not load: {err}", file=sys.stderr)
    if args.list:
        for d in chosen:
            print(d.name)
        return 1 if errors else 0
    if not chosen:
        print(f"no drill matches --only {args.only!r} --skip {args.skip!r} (drills: "
              f"{', '.join(d.name for d in drills) or 'none'})", file=sys.stderr)
        return 2
    need_root("bench/faults.py")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (
        lambda *a: print(*a, flush=True))
    say(f"{'case':32} {'sessions':>8} {'lost':>5} {'reconnects':>10} recovered")
    started = time.monotonic()
    try:
        rows = asyncio.run(interruptible(run_all(chosen, say)))
    except asyncio.CancelledError:
        say("interrupted: the running drill's lab is removed")
        return 130
    bad = [r["case"] for r in rows if failed(r)]
    doc = {"rows": rows, "failed": bad, "load_errors": errors,
           "ok": not bad and not errors, "seconds": round(time.monotonic() - started, 1)}
    path = save("faults", doc, args.out)
    say(f"\n{len(rows)} drills, {len(bad)} failed{': ' + ', '.join(bad) if bad else ''}"
        f"{'; modules that did not load: ' + ', '.join(errors) if errors else ''}; "
        f"raw rows: {path}")
    if args.json:
        print(json.dumps(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
