"""`keeper pki`: the CA and host certificates of the agents' peer channel, for real hosts.

`keeper lab up` makes these for the lab by itself; on real machines an operator runs,
on one trusted machine (the CA key never goes to a host):

    keeper pki init  --dir /root/keeper-ca                         # ca.key (0600), ca.crt
    keeper pki issue --dir /root/keeper-ca --host a --ip 10.0.0.1  # a.key (0600), a.crt
    keeper pki issue --dir /root/keeper-ca --host b --ip 10.0.0.2
    keeper pki list  --dir /root/keeper-ca

then copies ca.crt, a.crt and a.key to host a's `pki.dir` (see deploy/hostd.toml), the
same for b. Both commands are idempotent: valid files are kept (`issue --force` issues
again); run `issue` again before a certificate expires (one year).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keeper.hostd import tls


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pki", help="make the CA and the host certificates of the agents' "
                       "peer channel (mutual TLS), for real hosts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="action", required=True)
    c = psub.add_parser("init", help="make a CA in a directory (kept if one is valid there)")
    c.add_argument("--dir", type=Path, required=True,
                   help="directory for ca.key (0600, keep it off the hosts) and ca.crt")
    c.set_defaults(func=run)
    c = psub.add_parser("issue", help="issue a host's key and certificate, signed by the CA")
    c.add_argument("--dir", type=Path, required=True, help="the CA's directory (`pki init`)")
    c.add_argument("--host", required=True,
                   help="the host's name, as in its config's `name` (a lowercase DNS label)")
    c.add_argument("--ip", required=True,
                   help="the host's management address (peers dial it and check it)")
    c.add_argument("--force", action="store_true",
                   help="issue again even if a valid certificate is there")
    c.set_defaults(func=run)
    c = psub.add_parser("list", help="the certificates in a directory, their addresses and "
                        "expiry")
    c.add_argument("--dir", type=Path, required=True, help="a CA's or a host's pki directory")
    c.add_argument("--json", action="store_true", help="one JSON document")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    d: Path = args.dir
    if args.action == "init":
        made = tls.make_ca(d)
        print(f"{'made a new' if made else 'kept the valid'} CA in {d}: "
              f"{d / tls.CA_CERT} (copy to every host), {d / tls.CA_KEY} (keep here)")
        if made and any(p.name != tls.CA_CERT for p in d.glob("*.crt")):
            print("  host certificates signed by an earlier CA here: issue them again")
        return 0
    if args.action == "issue":
        made = tls.issue_host(d, args.host, args.ip, force=args.force)
        key, crt = d / f"{args.host}.key", d / f"{args.host}.crt"
        print(f"{'issued' if made else 'kept the valid'} {crt} and {key} for host "
              f"{args.host} ({args.ip}, {tls.hostname(args.host)})")
        print(f"  copy {d / tls.CA_CERT}, {crt} and {key} (0600) to host {args.host}'s "
              "pki directory")
        return 0
    rows = tls.describe(d)
    if args.json:
        print(json.dumps({"dir": str(d), "certificates": rows}))
        return 0
    if not rows:
        print(f"no certificates in {d}")
    for r in rows:
        if "error" in r:
            print(f"{r['file']:16s} {r['error']}")
        else:
            print(f"{r['file']:16s} {r['subject']:40s} ip {r['ip'] or '-':16s} "
                  f"until {r['not_after']}  signed by ca.crt: {r['signed_by_ca']}")
    return 0
