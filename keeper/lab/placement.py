"""Domain R's network: its own namespace, plugged into a host's Dom0 bridge by a veth.

Domain R's IP and MAC travel with it; its "link" is the host end of the veth. Kept
down, nothing reaches or leaves Domain R's sockets (what TCP repair needs); the old
end goes down before the new one comes up (one MAC on two switch ports flaps the
forwarding table).
"""

from __future__ import annotations

import re

from keeper.errors import LabError
from keeper.lab import netns
from keeper.lab.topology import PREFIXLEN, LabSpec

DOM_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


def host_port(dom: str) -> str:
    return f"r-{dom}"  # ≤ 14 characters: fits IFNAMSIZ


def check_name(dom: str) -> None:
    if not DOM_RE.match(dom):
        raise LabError(f"domain name {dom!r}: 1-12 of [a-z0-9], starting with a letter")


def place(spec: LabSpec, host: str, dom: str, ip: str, mac: str, *, link_up: bool) -> str:
    """Create Domain R `dom`'s namespace on `host` with `ip`/`mac` (idempotent)."""
    check_name(dom)
    h = spec.host(host)
    ns = spec.domr_ns(dom, host)
    netns.ensure(ns)
    port = host_port(dom)
    netns.ensure_veth(h.ns, port, ns, "eth0", mac_b=mac)
    netns.enslave(h.ns, port, "br0")
    netns.set_up(ns, "eth0")
    netns.ensure_addr(ns, "eth0", ip, PREFIXLEN)
    set_link(spec, host, dom, link_up)
    return ns


def set_link(spec: LabSpec, host: str, dom: str, up: bool) -> None:
    netns.set_up(spec.host(host).ns, host_port(dom), up)


def link_is_up(spec: LabSpec, host: str, dom: str) -> bool:
    return netns.is_up(spec.host(host).ns, host_port(dom))


def remove(spec: LabSpec, host: str, dom: str) -> None:
    netns.delete_link(spec.host(host).ns, host_port(dom))
    netns.remove(spec.domr_ns(dom, host))
