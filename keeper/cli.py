"""`keeper` command line: `main(argv) -> int`.

    keeper lab up|down|status [--lab NAME]      the lab (namespaces, switch, agents)
    keeper domr create NAME --host H            a Domain R on host H
    keeper domr delete NAME
    keeper migrate NAME --to HOST [--json]      move it (prints the trace)
    keeper demo [--moves N] [--json]            the whole story, then clean up
    keeper hostd / keeper domr run              daemons the lab starts itself
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.errors import KeeperError


def _need_root() -> None:
    if os.geteuid() != 0:
        raise KeeperError("keeper needs root (network namespaces, TCP_REPAIR)")


def _print(doc: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc))
    else:
        print(json.dumps(doc, indent=2))


def cmd_lab(args: argparse.Namespace) -> int:
    from keeper.lab import ops, topology

    _need_root()
    if args.action == "up":
        async def up() -> tuple[topology.LabSpec, dict[str, Any] | None]:
            spec = await ops.up(args.lab, tuple(args.hosts.split(",")),
                                ssh_authorized_keys=args.ssh_authorized_keys)
            guest = None
            if not args.empty:
                names = [d["name"] for d in (await ops.status(spec))["domains"]]
                if "guest1" not in names:
                    guest = await ops.create_guest(spec, "guest1", spec.hosts[0].name,
                                                   mem_mb=args.mem_mb,
                                                   dirty_rate=args.dirty_rate,
                                                   guest=args.guest)
            return spec, guest

        spec, guest = asyncio.run(up())
        print(f"lab {spec.name} up")
        for h in spec.hosts:
            print(f"  host {h.name}: netns {h.ns}, management {h.mgmt_ip}")
        print(f"  client: netns {spec.client_ns}, {spec.client_ip}")
        if guest is not None:
            print(f"  guest1 on host {guest['host']}: its console through Domain R at "
                  f"{guest['ip']}:{ports.CONSOLE} (raw) and :{ports.SSH} (ssh)")
            print(f"    ip netns exec {spec.client_ns} telnet {guest['ip']} {ports.CONSOLE}")
            key = spec.ssh_dir / "id_ed25519"
            print(f"    ip netns exec {spec.client_ns} ssh -i {key} admin@{guest['ip']}")
        return 0
    if args.action == "down":
        for line in topology.down(args.lab):
            print(f"removed {line}")
        return 0
    spec = topology.load(args.lab)
    doc = asyncio.run(ops.status(spec))
    if args.json:
        _print(doc, True)
        return 0
    print(f"lab {doc['lab']}  client {doc['client_netns']} {doc['client_ip']}")
    for h in doc["hosts"]:
        print(f"  host {h['host']}  {h['mgmt_ip']}  {h.get('error', '')}")
        for d in h["domrs"]:
            sessions = len(d.get("domr", {}).get("sessions", []))
            print(f"    Domain R {d['name']}  {d['ip']}  {d['mac']}  {d['state']}  "
                  f"link {'up' if d['link_up'] else 'down'}  sessions {sessions}")
    return 0


def cmd_domr(args: argparse.Namespace) -> int:
    from keeper.lab import ops, topology

    _need_root()
    spec = topology.load(args.lab)
    if args.action == "create":
        doc = asyncio.run(ops.create_domr(spec, args.name, args.host, index=args.index,
                                          announce_schedule=args.announce_schedule))
        print(f"Domain R {doc['name']} on host {doc['host']}: {doc['ip']} {doc['mac']}, "
              f"console on port {ports.CONSOLE}")
        return 0
    host = asyncio.run(ops.where(spec, args.name))
    asyncio.run(ops.call(spec, host, "DELETE", f"/domr/{args.name}"))
    print(f"removed Domain R {args.name} from host {host}")
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from keeper.lab import ops, topology

    _need_root()
    spec = topology.load(args.lab)
    if args.action == "create":
        doc = asyncio.run(ops.create_guest(spec, args.name, args.host, mem_mb=args.mem_mb,
                                           dirty_rate=args.dirty_rate,
                                           event_delay_ms=args.event_delay_ms,
                                           mode=args.mode, guest=args.guest))
        print(f"guest {doc['name']} on host {doc['host']}: console through Domain R at "
              f"{doc['ip']}:{ports.CONSOLE}")
        return 0
    doc = asyncio.run(ops.journal(spec, args.name))
    if args.json:
        _print({"name": doc["name"], "host": doc["host"], "count": doc["count"],
                "journal": doc["journal"].decode("latin-1")}, True)
    else:
        print(f"{doc['name']} on host {doc['host']}: {doc['count']} bytes received")
        print(repr(doc["journal"].decode("latin-1")))
    return 0


def _progress(line: dict[str, Any]) -> None:
    extra = " ".join(f"{k}={v}" for k, v in line.items() if k not in ("phase", "ms"))
    print(f"  {line['ms']:9.1f} ms  {line['phase']}  {extra}", file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    from keeper.lab import ops, topology

    _need_root()
    spec = topology.load(args.lab)
    trace = asyncio.run(ops.migrate(spec, args.name, args.to,
                                    progress=None if args.json else _progress))
    if args.json:
        _print(trace, True)
    elif trace.get("kind") == "co-migration":
        print(f"{args.name}: {trace['source']} -> {trace['target']} in "
              f"{trace['total_ms']:.0f} ms; downtime U {trace['downtime_ms']['U']:.1f} ms, "
              f"R {trace['downtime_ms']['R']:.1f} ms; {len(trace['rounds'])} rounds, "
              f"{trace['bytes_sent']} bytes; sync points {' '.join(trace['sync_points'])}"
              f" ({'in order' if trace['trace_ok'] else 'OUT OF ORDER'})")
        for m in trace["marks"]:
            print(f"  {m['ms']:9.2f} ms  {m['name']}")
    else:
        print(f"{args.name}: {trace['source']} -> {trace['target']}, pause "
              f"{trace['pause_ms']:.1f} ms, {trace['sessions']} sessions, "
              f"checkpoint {trace['checkpoint_bytes']} bytes")
        for m in trace["marks"]:
            print(f"  {m['ms']:9.2f} ms  {m['name']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from keeper import demo

    _need_root()
    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from keeper.domr import main as domr_main
    from keeper.domu import main as domu_main
    from keeper.hostd import main as hostd_main

    parser = argparse.ArgumentParser(prog="keeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lab", help="build, inspect or remove the lab")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--lab", default="keeper", help="lab name (prefix of its namespaces)")
    p.add_argument("--hosts", default="a,b", help="host names for `up` (default a,b)")
    p.add_argument("--empty", action="store_true", help="`up` without the guest pair guest1")
    p.add_argument("--ssh-authorized-keys", type=Path, default=None,
                   help="keys allowed to ssh into guest consoles (default: a key pair "
                   "made for the lab, see `lab status --json`)")
    p.add_argument("--mem-mb", type=int, default=256, help="guest1's memory (MiB)")
    p.add_argument("--guest", choices=["sim", "qemu"], default="sim",
                   help="sim: keeper's simulated guest; qemu: a real Linux VM under QEMU "
                        "(built by ./scripts/setup)")
    p.add_argument("--dirty-rate", type=float, default=0.0,
                   help="guest1's background workload: pages dirtied per second")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("guest", help="guests (Domain U + its Domain R)")
    gsub = p.add_subparsers(dest="action", required=True)
    c = gsub.add_parser("create", help="create a guest pair on a host")
    c.add_argument("name")
    c.add_argument("--host", default="a")
    c.add_argument("--mem-mb", type=int, default=256)
    c.add_argument("--dirty-rate", type=float, default=0.0)
    c.add_argument("--event-delay-ms", type=float, default=0.0)
    c.add_argument("--guest", choices=["sim", "qemu"], default="sim",
                   help="sim: keeper's simulated guest; qemu: a real Linux VM under QEMU "
                        "(built by ./scripts/setup)")
    c.add_argument("--mode", choices=["keeper", "baseline"], default="keeper",
                   help="baseline: the conventional set-up, servers in Dom0 (for benches)")
    c.add_argument("--lab", default="keeper")
    c.set_defaults(func=cmd_guest)
    j = gsub.add_parser("journal", help="what the guest's input journal holds")
    j.add_argument("name")
    j.add_argument("--lab", default="keeper")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_guest)
    domu_main.add_parser(sub)

    p = sub.add_parser("domr", help="Domain R: create, delete, or run the process")
    dsub = p.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("create", help="create a Domain R on a host")
    c.add_argument("name")
    c.add_argument("--host", default="a")
    c.add_argument("--index", type=int, default=None, help="address index (IP .100+N)")
    c.add_argument("--announce-schedule", default=DEFAULT_SCHEDULE,
                   help="gratuitous ARP offsets in ms after each move")
    c.add_argument("--lab", default="keeper")
    c.set_defaults(func=cmd_domr)
    d = dsub.add_parser("delete", help="stop and remove a Domain R")
    d.add_argument("name")
    d.add_argument("--lab", default="keeper")
    d.set_defaults(func=cmd_domr)
    domr_main.add_parser(dsub)

    p = sub.add_parser("migrate", help="move a Domain R to another host")
    p.add_argument("name")
    p.add_argument("--to", required=True)
    p.add_argument("--lab", default="keeper")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="lab up, a guest, typing while it migrates back and "
                       "forth, summary, clean up")
    p.add_argument("--migrations", type=int, default=10)
    p.add_argument("--rms", choices=["console", "ssh", "vnc"], default="console",
                   help="remote-management session to type through: raw console, SSH "
                   "or VNC")
    p.add_argument("--mem-mb", type=int, default=None,
                   help="the guest's memory (MiB; default 256, 128 for --guest qemu)")
    p.add_argument("--guest", choices=["auto", "sim", "qemu"], default="auto",
                   help="qemu: a real Linux VM under QEMU; sim: keeper's simulated guest; "
                        "auto (default): qemu where QEMU and the guest image are installed")
    p.add_argument("--dirty-rate", type=float, default=2000.0,
                   help="pages the guest's background workload dirties per second")
    p.add_argument("--lab", default="kdemo")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between migrations")
    p.add_argument("--json", action="store_true", help="last line: one JSON summary")
    p.set_defaults(func=cmd_demo)

    hostd_main.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except KeeperError as exc:
        print(f"keeper: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
