"""Domain R's network: its own namespace, plugged into a host's Dom0 bridge by a veth.

Domain R's IP and MAC travel with it; its "link" is the host end of the veth. Kept
down, nothing reaches or leaves Domain R's sockets (what TCP repair needs); the old
end goes down before the new one comes up (one MAC on two switch ports flaps the
forwarding table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from keeper.errors import LabError
from keeper.net import netns

DOM_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


def host_port(dom: str) -> str:
    return f"r-{dom}"  # ≤ 14 characters: fits IFNAMSIZ


def check_name(dom: str) -> None:
    if not DOM_RE.match(dom):
        raise LabError(f"domain name {dom!r}: 1-12 of [a-z0-9], starting with a letter")


@dataclass(frozen=True, slots=True)
class Host:
    """Where Domain Rs are placed on one host: its namespace and its Dom0 bridge."""

    name: str  # the host's name ("a")
    ns: str  # the namespace of its Dom0 (where the bridge is)
    prefix: str = "keeper"  # of every namespace this installation makes
    bridge: str = "br0"
    prefixlen: int = 24

    def domr_ns(self, dom: str) -> str:
        return f"{self.prefix}-r-{dom}-{self.name}"


IFACE = "eth0"  # Domain R's end of its veth, in its namespace


def place(host: Host, dom: str, ip: str, mac: str, *, link_up: bool) -> str:
    """Create Domain R `dom`'s namespace on `host` with `ip`/`mac` (idempotent)."""
    check_name(dom)
    ns = host.domr_ns(dom)
    netns.ensure(ns)
    port = host_port(dom)
    netns.ensure_veth(host.ns, port, ns, IFACE, mac_b=mac)
    netns.enslave(host.ns, port, host.bridge)
    netns.set_up(ns, IFACE)
    netns.ensure_addr(ns, IFACE, ip, host.prefixlen)
    set_link(host, dom, link_up)
    return ns


def set_link(host: Host, dom: str, up: bool) -> None:
    netns.set_up(host.ns, host_port(dom), up)


def link_is_up(host: Host, dom: str) -> bool:
    return netns.is_up(host.ns, host_port(dom))


def remove(host: Host, dom: str) -> None:
    netns.delete_link(host.ns, host_port(dom))
    netns.remove(host.domr_ns(dom))
