"""`keeper hostd`: run the host agent of one lab host inside that host's namespace."""

from __future__ import annotations

import argparse
import logging

from keeper.lab import topology
from keeper.net import netns


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("hostd", help="run a host agent (started by `keeper lab up`)")
    p.add_argument("--lab", default="keeper")
    p.add_argument("--host", required=True)
    p.add_argument("--no-may-write", action="store_true",
                   help="turn off D-MORE's may-write extension to log-dirty (ablation)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = topology.load(args.lab)
    netns.enter(spec.host(args.host).ns)  # first, before any thread exists
    import uvloop

    from keeper.hostd.serve import serve

    logging.getLogger().setLevel(logging.INFO)
    return uvloop.run(serve(spec, args.host, may_write=not args.no_may_write))
