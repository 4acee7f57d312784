"""`keeper hostd`: run a host agent.

    keeper hostd --config /etc/keeper/hostd.toml   # a real host (deploy/keeper-hostd.service)
    keeper hostd --lab keeper --host a             # a lab host (`keeper lab up` starts it)

With --config, a mistake in the file is reported with the field it concerns, and the
agent exits 2 (systemd does not restart it: see RestartPreventExitStatus in the unit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from keeper.errors import KeeperError
from keeper.lab import topology
from keeper.lab.topology import LabSpec
from keeper.net import netns

CONFIG_ERROR = 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("hostd", help="run a host agent: on a real host from a config file "
                       "(--config), in the lab as `keeper lab up` starts it (--lab/--host)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="TOML configuration of a real host (example: deploy/hostd.toml)")
    p.add_argument("--lab", default="keeper", help="lab name, without --config "
                   "(default %(default)s)")
    p.add_argument("--host", help="the lab host to run, without --config")
    p.add_argument("--no-may-write", action="store_true",
                   help="turn off D-MORE's may-write extension to log-dirty (ablation)")
    p.add_argument("--no-spare", action="store_true",
                   help="keep no spare Domain R started ahead: each twin starts cold "
                   "(about a second more per migration; saves ~100 MiB)")
    p.add_argument("--check", action="store_true",
                   help="with --config: check the file and the host's network, print what "
                   "would run, and exit (0 if good, 2 if not)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from keeper.ssh import policy

    try:  # the SSH key exchange its Domain Rs will offer (see keeper.ssh.policy)
        policy.kex_mode()
    except KeeperError as exc:
        print(f"keeper hostd: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    if args.config is None:
        if args.host is None:
            print("keeper hostd: give --config FILE, or --host NAME for a lab host",
                  file=sys.stderr)
            return CONFIG_ERROR
        spec: LabSpec = topology.load(args.lab)
        netns.enter(spec.host(args.host).ns)  # first, before any thread exists
        return _serve(spec, args.host, may_write=not args.no_may_write,
                      spare=not args.no_spare)

    from keeper.hostd import config

    named = None
    try:
        cfg = config.load(args.config)
        ns, attached = config.enter(cfg)  # first, before any thread exists
        named = ns if attached and args.check else None  # --check leaves no trace
        config.check_network(cfg, ns)
    except config.ConfigError as exc:
        print(f"keeper hostd: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except KeeperError as exc:  # a kernel error entering or reading the namespace
        print(f"keeper hostd: {args.config}: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    finally:
        if named is not None:
            netns.remove(named)  # the name only: the namespace is the one we run in
    spec = cfg.spec(ns)
    if args.check:
        where = (f"{'https' if cfg.metrics_tls else 'http'}://{cfg.metrics_listen[0]}:"
                 f"{cfg.metrics_listen[1]}/metrics" if cfg.metrics_listen else "off")
        print(f"{cfg.path}: host {cfg.name} in netns {ns}, management {cfg.address}/"
              f"{cfg.prefixlen} on {cfg.bridge}, peers "
              f"{', '.join(f'{p}={ip}' for p, ip in cfg.peers.items()) or 'none'}, run dir "
              f"{cfg.run_dir}, metrics {where}")
        return 0
    from keeper.lab import sshkeys

    cfg.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sshkeys.ensure_login_key(spec, cfg.authorized_keys)
    from keeper.hostd.metrics_http import MetricsConfig

    listen = cfg.metrics_listen
    metrics = MetricsConfig(listen=f"{listen[0]}:{listen[1]}" if listen else "off",
                            tls=cfg.metrics_tls, htpasswd=cfg.metrics_htpasswd,
                            allow=cfg.metrics_allow)
    return _serve(spec, cfg.name, may_write=cfg.may_write and not args.no_may_write,
                  metrics=metrics, spare=cfg.spare_domr and not args.no_spare)


def _serve(spec: LabSpec, host: str, *, may_write: bool, metrics: Any = None,
           spare: bool = True) -> int:
    import uvloop

    from keeper import collector
    from keeper.hostd.serve import serve

    logging.getLogger().setLevel(logging.INFO)
    collector.freeze()  # the imports' objects: no collection in a move walks them again
    return uvloop.run(serve(spec, host, may_write=may_write, metrics=metrics, spare=spare))
