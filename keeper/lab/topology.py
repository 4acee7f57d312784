"""The lab: one switch, hosts with a Dom0 bridge each, a client. All in namespaces.

    client ns ──veth── switch ns: bridge sw0 ──veth── host A ns: bridge br0 (mgmt IP)
                                            └─veth── host B ns: bridge br0 (mgmt IP)
    Domain R ns ──veth── a host's br0 (created by that host's agent)

Every name starts with the lab's name, so labs (and parallel tests) coexist; a lab's
addresses live only in its own namespaces, so labs may reuse them. What a lab made
is written to /run/keeper/<lab>/lab.json; `down` removes exactly that, plus any
Domain R namespace and process the agents recorded under the same directory.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keeper.errors import LabError
from keeper.hostd import procs
from keeper.net import netns, placement

RUN_ROOT = Path("/run/keeper")
NET = "198.18.0"  # 198.18.0.0/15 is the benchmarking range; a lab uses one /24 of it
PREFIXLEN = 24
AGENT_PORT = 7480
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


@dataclass(slots=True)
class HostSpec:
    name: str
    ns: str
    mgmt_ip: str
    uplink: str  # the host's port on the switch

    @property
    def agent_url(self) -> str:
        return f"https://{self.mgmt_ip}:{AGENT_PORT}"  # mutual TLS with the lab CA


@dataclass(slots=True)
class LabSpec:
    name: str
    switch_ns: str
    client_ns: str
    client_ip: str
    hosts: list[HostSpec] = field(default_factory=list)

    @property
    def rundir(self) -> Path:
        return RUN_ROOT / self.name

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"lab {self.name} has no host {name!r} "
                       f"(hosts: {', '.join(h.name for h in self.hosts)})")

    @property
    def pki(self) -> Path:
        return self.rundir / "pki"

    @property
    def ssh_dir(self) -> Path:
        return self.rundir / "ssh"

    def agent_socket(self, host: str) -> Path:
        return self.rundir / f"hostd-{host}.sock"

    def place_on(self, host: str) -> placement.Host:
        """Where this lab's Domain Rs are placed on `host`."""
        return placement.Host(name=host, ns=self.host(host).ns, prefix=self.name,
                              prefixlen=PREFIXLEN)

    def domr_ns(self, dom: str, host: str) -> str:
        return self.place_on(host).domr_ns(dom)

    def domr_control(self, dom: str, host: str) -> Path:
        return self.rundir / f"domr-{dom}-{host}.sock"

    def domr_ip(self, index: int) -> str:
        return f"{NET}.{100 + index}"

    @staticmethod
    def domr_mac(index: int) -> str:
        return f"02:6b:70:00:{index >> 8:02x}:{index & 0xFF:02x}"


def spec_for(name: str = "keeper", hosts: tuple[str, ...] = ("a", "b")) -> LabSpec:
    if not NAME_RE.match(name):
        raise LabError(f"lab name {name!r}: 1-10 of [a-z0-9], starting with a letter")
    return LabSpec(
        name=name,
        switch_ns=f"{name}-sw",
        client_ns=f"{name}-client",
        client_ip=f"{NET}.10",
        hosts=[
            HostSpec(name=h, ns=f"{name}-{h}", mgmt_ip=f"{NET}.{1 + i}", uplink=f"p-{h}")
            for i, h in enumerate(hosts)
        ],
    )


def save(spec: LabSpec) -> None:
    spec.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (spec.rundir / "lab.json").write_text(json.dumps(asdict(spec), indent=1))


def load(name: str) -> LabSpec:
    path = RUN_ROOT / name / "lab.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab {name!r} is up (no {path})") from None
    doc["hosts"] = [HostSpec(**h) for h in doc["hosts"]]
    return LabSpec(**doc)


def build_network(spec: LabSpec) -> None:
    """Create (or complete) the switch, hosts and client. Idempotent."""
    save(spec)
    netns.ensure(spec.switch_ns)
    netns.ensure_bridge(spec.switch_ns, "sw0")
    for i, h in enumerate(spec.hosts):
        netns.ensure(h.ns)
        netns.ensure_bridge(h.ns, "br0", mac=f"02:6b:68:00:00:{i + 1:02x}")
        netns.ensure_veth(spec.switch_ns, h.uplink, h.ns, "up0")
        netns.enslave(spec.switch_ns, h.uplink, "sw0")
        netns.enslave(h.ns, "up0", "br0")
        netns.set_up(spec.switch_ns, h.uplink)
        netns.set_up(h.ns, "up0")
        netns.ensure_addr(h.ns, "br0", h.mgmt_ip, PREFIXLEN)
    netns.ensure(spec.client_ns)
    netns.ensure_veth(spec.switch_ns, "p-client", spec.client_ns, "eth0")
    netns.enslave(spec.switch_ns, "p-client", "sw0")
    netns.set_up(spec.switch_ns, "p-client")
    netns.set_up(spec.client_ns, "eth0")
    netns.ensure_addr(spec.client_ns, "eth0", spec.client_ip, PREFIXLEN)


def lab_namespaces(spec: LabSpec) -> list[str]:
    """Every namespace of this lab that exists now, Domain Rs included."""
    prefix = f"{spec.name}-"
    fixed = {spec.switch_ns, spec.client_ns, *(h.ns for h in spec.hosts)}
    return sorted(
        ns for ns in netns.netns.listnetns()
        if ns in fixed or ns.startswith(f"{prefix}r-")
    )


def down(name: str) -> list[str]:
    """Stop the lab's processes, remove its namespaces and run directory. Idempotent."""
    try:
        spec = load(name)
    except LabError:
        spec = spec_for(name)
    removed = procs.stop_all(spec.rundir)
    for ns in lab_namespaces(spec):
        netns.remove(ns)
        removed.append(f"netns {ns}")
    shutil.rmtree(spec.rundir, ignore_errors=True)
    return removed
