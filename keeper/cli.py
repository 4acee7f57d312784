"""keeper keeps a VM's remote-management sessions (VNC, SSH, a raw console) alive while
the VM live-migrates: the servers run in a small migratable domain, Domain R, that
moves with the VM. The client keeps its connection; nothing typed is lost.

Try it (as root; the lab is network namespaces on this machine, 198.18.0.0/24):

  keeper demo                              # the whole story: lab, guest, typing, 10 migrations
  keeper demo --rms ssh --migrations 4 --json
  keeper lab up                            # hosts a and b, their agents, guest1 on host a
  keeper lab status                        # where everything is, the addresses to connect to
  keeper migrate guest1 --to b             # co-migrate guest1 and its Domain R to host b
  keeper guest journal guest1              # every byte the guest received, in order
  keeper lab down                          # remove everything the lab made

On real hosts (see the README, "Running on two machines"):

  keeper pki init --dir /root/keeper-ca    # a CA, then a certificate per host
  keeper pki issue --dir /root/keeper-ca --host a --ip 10.0.0.1
  keeper hostd --config /etc/keeper/hostd.toml   # the host agent (deploy/keeper-hostd.service)
  keeper migrate guest1 --to b --config /etc/keeper/hostd.toml

`keeper COMMAND --help` tells more about each command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.errors import KeeperError


def _spec(args: argparse.Namespace) -> Any:
    """The installation a command acts on: a real host's (--config FILE, the agent on
    this machine) or a lab's (--lab NAME)."""
    from keeper.lab import topology

    if getattr(args, "config", None):
        from keeper.hostd import config

        cfg = config.load(args.config)
        return cfg.spec(cfg.netns or "")
    return topology.load(args.lab)


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
        print(f"  host {h['host']}  {h['mgmt_ip']}  metrics {h.get('metrics_url') or '-'}  "
              f"{h.get('error', '')}")
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
    from keeper.lab import ops

    _need_root()
    spec = _spec(args)
    if args.action == "create":
        host = args.host or (spec.hosts[0].name if args.config else "a")
        if args.config and not (args.ip and args.mac):
            raise KeeperError("with --config, give the guest's Domain R an address on the "
                              "management network: --ip ADDRESS --mac MAC")
        if args.ip or args.mac:
            if not (args.ip and args.mac):
                raise KeeperError("--ip and --mac go together")
            doc = asyncio.run(ops.call(spec, host, "POST", "/guest", timeout=180, json={
                "name": args.name, "ip": args.ip, "mac": args.mac, "mem_mb": args.mem_mb,
                "event_delay_ms": args.event_delay_ms, "dirty_rate": args.dirty_rate,
                "mode": args.mode, "guest": args.guest}))
        else:
            doc = asyncio.run(ops.create_guest(spec, args.name, host, mem_mb=args.mem_mb,
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


class MigrationProgress:
    """What a running co-migration has done: pre-copy rounds, bytes sent, the phase it is
    in. On a terminal a rich progress bar (bytes against the guest's memory, then the
    synchronisation points); elsewhere one plain line per event, on stderr."""

    def __init__(self, name: str, mem_bytes: int | None, *, live: bool) -> None:
        self.name, self.mem_bytes = name, mem_bytes or 0
        self.rounds = self.bytes = self.points = 0
        self.phase = "starting"
        self.t0 = time.monotonic()
        self._bar: Any = None
        if live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description:<24}"),
                                 BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._task = self._bar.add_task(f"{name}: {self.phase}", total=self.mem_bytes or None,
                                            info="")

    def __enter__(self) -> MigrationProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, line: dict[str, Any]) -> None:
        phase = str(line.get("phase", "?"))
        if phase == "pre-copy":
            if "pages" in line:  # the simulated guest: one line per pre-copy round
                self.rounds = max(self.rounds + 1, int(line.get("round") or 0))
                self.bytes += int(line["pages"]) * 4096
            else:  # QEMU: one line per poll of query-migrate (its passes are its own)
                self.rounds = -1
                self.bytes = int(line.get("transferred") or 0)
                remaining = line.get("remaining")
                if remaining is not None:
                    self.mem_bytes = max(self.mem_bytes, self.bytes + int(remaining))
        else:
            self.phase = phase
            if phase in {f"S{i}" for i in range(1, 8)}:
                self.points += 1
        ms = float(line.get("ms", (time.monotonic() - self.t0) * 1e3))
        if self._bar is None:
            extra = " ".join(f"{k}={v}" for k, v in line.items() if k not in ("phase", "ms"))
            print(f"  {ms:9.1f} ms  {phase}  {extra}".rstrip(), file=sys.stderr, flush=True)
            return
        where = "pre-copy" if phase == "pre-copy" else self.phase
        self._bar.update(self._task, description=f"{self.name}: {where}",
                         total=self.mem_bytes or None,
                         completed=min(self.bytes, self.mem_bytes) if self.mem_bytes else 0,
                         info=(f"pre-copy round {self.rounds}  " if self.rounds >= 0 else "")
                         + f"{self.bytes / 2**20:7.1f} MiB sent  sync {self.points}/7")


def cmd_migrate(args: argparse.Namespace) -> int:
    from keeper.lab import ops

    _need_root()
    spec = _spec(args)

    async def run() -> dict[str, Any]:
        if args.json:
            return await ops.migrate(spec, args.name, args.to)
        mem = next((d.get("mem_bytes") for d in (await ops.status(spec))["domains"]
                    if d["name"] == args.name), None)
        live = sys.stderr.isatty() and not args.plain
        with MigrationProgress(args.name, mem, live=live) as progress:
            return await ops.migrate(spec, args.name, args.to, progress=progress)

    trace = asyncio.run(run())
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

    if args.json and os.geteuid() != 0:  # the one JSON line even when it cannot start
        print(json.dumps({"ok": False, "error": "keeper needs root (network namespaces, "
                                                 "TCP_REPAIR)"}))
        return 2
    _need_root()
    return demo.run(args)


LAB_HELP = "the lab's name, the prefix of its namespaces (default %(default)s)"
CONFIG_HELP = ("a real host: act through this machine's agent, as configured in FILE "
               "(the file `keeper hostd --config` runs with) instead of a lab")
GUEST_KIND_HELP = ("sim: keeper's simulated guest; qemu: a real Linux VM under QEMU (built "
                   "by ./scripts/setup)")


def build_parser() -> argparse.ArgumentParser:
    from keeper.domr import main as domr_main
    from keeper.domu import main as domu_main
    from keeper.hostd import main as hostd_main
    from keeper.hostd import pki

    parser = argparse.ArgumentParser(prog="keeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what keeper does (INFO) on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lab", help="build, inspect or remove the lab (namespaces, switch, "
                       "two host agents, a client) on this machine",
                       description="The lab: hosts a and b (network namespaces with a host "
                       "agent each), a switch and a client namespace, 198.18.0.0/24.")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: build it and start guest1 (idempotent); status: hosts, domains "
                   "and addresses; down: stop and remove everything it made")
    p.add_argument("--lab", default="keeper", help=LAB_HELP)
    p.add_argument("--hosts", default="a,b", help="host names for `up` (default %(default)s)")
    p.add_argument("--empty", action="store_true", help="`up` without the guest pair guest1")
    p.add_argument("--ssh-authorized-keys", type=Path, default=None, metavar="FILE",
                   help="keys allowed to ssh into guest consoles (default: a key pair "
                   "made for the lab, see `lab status --json`)")
    p.add_argument("--mem-mb", type=int, default=256,
                   help="guest1's memory in MiB (default %(default)s)")
    p.add_argument("--guest", choices=["sim", "qemu"], default="sim",
                   help=f"guest1's kind. {GUEST_KIND_HELP}")
    p.add_argument("--dirty-rate", type=float, default=0.0,
                   help="guest1's background workload: pages dirtied per second")
    p.add_argument("--json", action="store_true", help="`status` as one JSON document")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("guest", help="guests (a Domain U and its Domain R): create one, "
                       "read its input journal")
    gsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = gsub.add_parser("create", help="create a guest pair on a host")
    c.add_argument("name", help="the guest's name (1-12 of a-z, 0-9)")
    c.add_argument("--host", default=None,
                   help="the host to start it on (default: a; with --config: this host)")
    c.add_argument("--mem-mb", type=int, default=256,
                   help="the guest's memory in MiB (default %(default)s)")
    c.add_argument("--dirty-rate", type=float, default=0.0,
                   help="a simulated guest's background workload: pages dirtied per second")
    c.add_argument("--event-delay-ms", type=float, default=0.0,
                   help="a simulated guest handles each event this much later (the paper's "
                   "200 ms ablation)")
    c.add_argument("--guest", choices=["sim", "qemu"], default="sim", help=GUEST_KIND_HELP)
    c.add_argument("--mode", choices=["keeper", "baseline"], default="keeper",
                   help="keeper: its servers in a Domain R that moves with it; baseline: the "
                   "conventional set-up, servers in Dom0 on the host's address (for benches)")
    c.add_argument("--ip", default=None,
                   help="its Domain R's address (default in a lab: the next free one; "
                   "required with --config: an address on the management network)")
    c.add_argument("--mac", default=None, help="its Domain R's MAC address (with --ip)")
    c.add_argument("--lab", default="keeper", help=LAB_HELP)
    c.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    c.set_defaults(func=cmd_guest)
    j = gsub.add_parser("journal", help="what the guest's input journal holds: every byte "
                        "it received, in order")
    j.add_argument("name", help="the guest's name")
    j.add_argument("--lab", default="keeper", help=LAB_HELP)
    j.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    j.add_argument("--json", action="store_true", help="one JSON document")
    j.set_defaults(func=cmd_guest)
    domu_main.add_parser(sub)

    p = sub.add_parser("domr", help="a stand-alone Domain R (an echo service, no guest): "
                       "create, delete, or run the process")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = dsub.add_parser("create", help="create a Domain R on a host")
    c.add_argument("name", help="its name (1-12 of a-z, 0-9)")
    c.add_argument("--host", default="a", help="the host to start it on (default %(default)s)")
    c.add_argument("--index", type=int, default=None,
                   help="address index: IP 198.18.0.(100+N) (default: the next free one)")
    c.add_argument("--announce-schedule", default=DEFAULT_SCHEDULE,
                   help="gratuitous ARP offsets in ms after each move (default %(default)s)")
    c.add_argument("--lab", default="keeper", help=LAB_HELP)
    c.set_defaults(func=cmd_domr)
    d = dsub.add_parser("delete", help="stop and remove a Domain R")
    d.add_argument("name", help="the Domain R to remove")
    d.add_argument("--lab", default="keeper", help=LAB_HELP)
    d.set_defaults(func=cmd_domr)
    domr_main.add_parser(dsub)

    p = sub.add_parser("migrate", help="live-migrate a guest with its Domain R (or a "
                       "stand-alone Domain R) to another host",
                       description="Co-migrate a guest and its Domain R to another host: "
                       "its sessions stay connected. Shows a progress bar on a terminal "
                       "(pre-copy rounds, bytes sent, phase), plain lines otherwise, then "
                       "the trace.")
    p.add_argument("name", help="the guest (or stand-alone Domain R) to move")
    p.add_argument("--to", required=True, metavar="HOST",
                   help="the host to move it to (a lab host, or a peer in the config)")
    p.add_argument("--lab", default="keeper", help=LAB_HELP)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP + "; the guest must be on "
                   "this host")
    p.add_argument("--plain", action="store_true",
                   help="plain progress lines even on a terminal")
    p.add_argument("--json", action="store_true",
                   help="no progress; the whole trace as one JSON line")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="the whole story: lab up, a guest, typing while it "
                       "migrates back and forth, summary, clean up",
                       description="Builds a lab, starts guest1 on host a, types one key "
                       "every 50 ms into its console through Domain R while it migrates "
                       "a->b->a..., then compares what was typed with what the guest "
                       "received and removes the lab (also on Ctrl-C). Exit status 0 only "
                       "if nothing was lost.")
    p.add_argument("--migrations", type=int, default=10,
                   help="how many migrations (default %(default)s)")
    p.add_argument("--rms", choices=["console", "ssh", "vnc"], default="console",
                   help="remote-management session to type through: raw console, SSH "
                   "(OpenSSH) or VNC (default %(default)s)")
    p.add_argument("--mem-mb", type=int, default=None,
                   help="the guest's memory (MiB; default 256, 128 for --guest qemu)")
    p.add_argument("--guest", choices=["auto", "sim", "qemu"], default="auto",
                   help="qemu: a real Linux VM under QEMU; sim: keeper's simulated guest; "
                        "auto (default): qemu where QEMU and the guest image are installed")
    p.add_argument("--dirty-rate", type=float, default=2000.0,
                   help="pages the simulated guest's background workload dirties per second "
                   "(default %(default)s)")
    p.add_argument("--lab", default="kdemo", help=LAB_HELP)
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between migrations (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="progress on stderr; the last line on stdout is one JSON summary")
    p.set_defaults(func=cmd_demo)

    hostd_main.add_parser(sub)
    pki.add_parser(sub)
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
        from keeper.hostd.config import ConfigError

        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
