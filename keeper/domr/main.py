"""`keeper domr`: the Domain R process. Runs in its own namespace, steered by its host agent.

The host agent talks to it over a Unix socket (a filesystem path, reachable across
network namespaces), the stand-in for Xen's inter-domain control channel:

    GET  /status                      sessions and counters
    POST /quiesce                     stop accepting, reading and writing
    POST /checkpoint                  dump sessions + sockets (link must be down)
    POST /abort                       roll back a quiesce or checkpoint, serve here
    POST /commit                      the move succeeded: drop everything silently, exit
    POST /restore   (checkpoint body) rebuild sessions, sockets in repair mode
    POST /resume                      leave repair, announce, serve
    POST /confirm                     the move is settled: outlive the agent from now on
    POST /hold      {on}              hold the guest's input here (QEMU migrations)
    POST /announce                    one gratuitous ARP now
"""

from __future__ import annotations

import argparse
import logging

from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.net import netns


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a Domain R process (its host agent starts it)")
    p.add_argument("--name", required=True, help="the Domain R's (its guest's) name")
    p.add_argument("--ip", required=True, help="its own IP address (travels with it)")
    p.add_argument("--mac", required=True, help="its own MAC address (travels with it)")
    p.add_argument("--netns", required=True, help="network namespace to run in")
    p.add_argument("--control", required=True, help="Unix socket path for the host agent")
    p.add_argument("--console-port", type=int, default=2323,
                   help="TCP port of the raw console (default %(default)s)")
    p.add_argument("--hypercall", help="hypercall socket: serve the guest's console "
                   "(without it: a stand-alone echo service)")
    p.add_argument("--devices", help="device channel: serve a QEMU guest's serial console "
                   "and screen (its agent hands over the sockets)")
    p.add_argument("--ssh-host-key", help="serve the console over SSH with this host key")
    p.add_argument("--ssh-authorized-keys", help="public keys allowed to log in over SSH")
    p.add_argument("--restore", action="store_true", help="start empty, await a checkpoint")
    p.add_argument("--parent", type=int, default=0, help="the agent's PID (with --restore)")
    p.add_argument("--announce-schedule", default=DEFAULT_SCHEDULE,
                   help="gratuitous ARP offsets in ms after resume (default %(default)s)")
    p.add_argument("--no-announce", action="store_true",
                   help="resume silently: no gratuitous ARP, no window probe (tests)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    netns.enter(args.netns)  # first, before any thread exists
    logging.getLogger().setLevel(logging.INFO)
    import uvloop

    from keeper.domr.service import serve

    return uvloop.run(serve(args))
