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
from typing import Any

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
        spec = asyncio.run(ops.up(args.lab, tuple(args.hosts.split(","))))
        print(f"lab {spec.name} up")
        for h in spec.hosts:
            print(f"  host {h.name}: netns {h.ns}, management {h.mgmt_ip}")
        print(f"  client: netns {spec.client_ns}, {spec.client_ip}")
        print(f"  run a client:  ip netns exec {spec.client_ns} nc <domain R ip> 2323")
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
              f"console on port 2323")
        return 0
    host = asyncio.run(ops.where(spec, args.name))
    asyncio.run(ops.call(spec, host, "DELETE", f"/domr/{args.name}"))
    print(f"removed Domain R {args.name} from host {host}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from keeper.lab import ops, topology

    _need_root()
    spec = topology.load(args.lab)
    trace = asyncio.run(ops.migrate(spec, args.name, args.to))
    if args.json:
        _print(trace, True)
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
    from keeper.hostd import main as hostd_main

    parser = argparse.ArgumentParser(prog="keeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lab", help="build, inspect or remove the lab")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--lab", default="keeper", help="lab name (prefix of its namespaces)")
    p.add_argument("--hosts", default="a,b", help="host names for `up` (default a,b)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("domr", help="Domain R: create, delete, or run the process")
    dsub = p.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("create", help="create a Domain R on a host")
    c.add_argument("name")
    c.add_argument("--host", default="a")
    c.add_argument("--index", type=int, default=None, help="address index (IP .100+N)")
    c.add_argument("--announce-schedule", default="0,20,100,300",
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

    p = sub.add_parser("demo", help="lab up, sessions, moves back and forth, summary, clean up")
    p.add_argument("--moves", "--migrations", dest="moves", type=int, default=10)
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--lab", default="kdemo")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between moves")
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
