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
import json
import logging
import os
import resource
import sys

from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.net import netns


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a Domain R process (its host agent starts it)")
    _run_arguments(p)
    p.set_defaults(func=run)
    s = sub.add_parser("spare", help="a spare Domain R: import everything, then wait for "
                       "one line on stdin, {\"argv\": [run's arguments], \"log\": path}, "
                       "and run as `run` would (its host agent starts it; "
                       "keeper.hostd.spare)")
    s.add_argument("--parent", type=int, default=0, help="the agent's PID: die with it")
    s.add_argument("--nice", type=int, default=0, help="niceness while it waits")
    s.add_argument("--rundir", help="its agent's run directory (names it in `ps`)")
    s.set_defaults(func=spare)


def _run_arguments(p: argparse.ArgumentParser) -> None:
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


# Descriptor slots a Domain R's table has from the start (8 bytes each): every socket of
# a thousand sessions, and more, without the table growing in a move's pause.
FD_TABLE = 1 << 16


def grow_fd_table() -> None:
    """Size the descriptor table now, while the process has one thread. The kernel
    grows it by doubling, and in a process with threads each growth waits for an RCU
    grace period (several ms): a twin restoring 1,000 sockets paid five of them inside
    the pause, ~40 ms of its ~55 (measured). Up to the soft RLIMIT_NOFILE only."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(soft, FD_TABLE) - 1  # RLIM_INFINITY is a large int here
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        if top > fd:
            os.dup2(fd, top)
            os.close(top)
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    grow_fd_table()  # before any thread (a spare did it already: then nearly free)
    # First: setns moves only this thread, and every thread it starts from here on
    # (the loop's workers) is born in the namespace. A spare's idle numpy threads,
    # started by its imports, stay outside and never touch the network.
    netns.enter(args.netns)
    logging.getLogger().setLevel(logging.INFO)
    import uvloop

    from keeper import collector
    from keeper.domr.service import serve

    collector.freeze()  # a spare did it while it waited: then this is nearly free
    return uvloop.run(serve(args))


def spare(args: argparse.Namespace) -> int:
    """Pay for the imports now; become a Domain R when the agent says which. No socket
    is made and no thread enters a namespace before that: `run` enters its own."""
    grow_fd_table()  # first, while there is one thread
    if args.nice:
        os.nice(args.nice)
    from keeper.domr.service import die_with_parent

    die_with_parent(True)
    if args.parent and os.getppid() != args.parent:
        return 0  # the agent is already gone
    import uvloop  # noqa: F401 (warming: what `run` imports)
    from scapy.layers.l2 import ARP, Ether  # noqa: F401 (the announcer's, the slowest)

    from keeper import collector
    from keeper.domr import checkpoint

    checkpoint.prepare()
    collector.freeze()
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the agent closed the pipe: not needed
    order = json.loads(line)
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    p = argparse.ArgumentParser(prog="keeper domr run")
    _run_arguments(p)
    run_args = p.parse_args(order["argv"])
    if not run_args.restore:
        die_with_parent(False)  # a serving Domain R outlives an agent restart, like a VM
    return run(run_args)
