"""A host agent's configuration file, for real hosts (`keeper hostd --config FILE`).

TOML, read once with `tomllib` and checked before the agent starts; a mistake is a
`ConfigError` that names the field (`keeper hostd` exits 2). deploy/hostd.toml is a
commented example:

    name = "a"                              # this host (a DNS label; its certificate's CN)
    management_address = "10.0.0.1/24"      # peers, migrations and Domain Rs live here
    bridge = "br0"                          # Dom0's bridge on that network
    run_dir = "/run/keeper/hostd"
    metrics_listen = "10.0.0.1:9464"        # Prometheus /metrics (default: this address)
    [metrics]
    tls = true                              # HTTPS with a.crt; Prometheus trusts ca.crt
    htpasswd = "/etc/keeper/metrics.htpasswd"   # basic auth (`htpasswd -nB prometheus`)
    [pki]
    dir = "/etc/keeper/pki"                 # ca.crt, a.crt, a.key (`keeper pki issue`)
    [ssh]
    authorized_keys = "/etc/keeper/authorized_keys"
    [peers]
    b = "10.0.0.2"

The agent serves the same spec shape as a lab's (`SiteSpec` is a `LabSpec` whose run
directory, PKI, bridge and prefix come from the file), so nothing in it differs
between the lab and real hosts.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.errors import KeeperError
from keeper.hostd import tls
from keeper.lab.topology import NAME_RE, HostSpec, LabSpec
from keeper.net import netns, placement

DEFAULT_RUN_DIR = Path("/run/keeper/hostd")
DEFAULT_PREFIX = "keeper"


class ConfigError(KeeperError):
    """The configuration file is wrong; `field` names the culprit ("" for the whole file)."""

    def __init__(self, path: Path, field: str, message: str) -> None:
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")
        self.path = path
        self.field = field


@dataclass(frozen=True, slots=True)
class HostConfig:
    path: Path
    name: str
    address: str  # the management address
    prefixlen: int
    bridge: str
    run_dir: Path
    prefix: str  # of the namespaces this agent makes (Domain Rs)
    pki_dir: Path
    metrics_listen: tuple[str, int] | None  # None: "off"
    peers: dict[str, str] = field(default_factory=dict)
    netns: str | None = None  # a named namespace to run in; None: where it was started
    authorized_keys: Path | None = None
    may_write: bool = True
    spare_domr: bool = True  # keep a spare Domain R started ahead (keeper.hostd.spare)
    metrics_tls: bool = False
    metrics_htpasswd: Path | None = None
    metrics_allow: tuple[str, ...] = ()  # networks that may scrape; () the management one

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefixlen}").network

    def spec(self, ns: str) -> SiteSpec:
        """The agent's spec, given the name of the namespace it runs in (Dom0's)."""
        hosts = [HostSpec(name=self.name, ns=ns, mgmt_ip=self.address, uplink="")]
        hosts += [HostSpec(name=p, ns="", mgmt_ip=ip, uplink="") for p, ip in self.peers.items()]
        return SiteSpec(name=self.prefix, switch_ns="", client_ns="", client_ip="",
                        hosts=hosts, run_dir=self.run_dir, pki_dir=self.pki_dir,
                        bridge=self.bridge, prefixlen=self.prefixlen)


@dataclass(slots=True)
class SiteSpec(LabSpec):
    """An installation on real hosts, as one agent sees it: itself and its peers."""

    run_dir: Path = DEFAULT_RUN_DIR
    pki_dir: Path = Path("/etc/keeper/pki")
    bridge: str = "br0"
    prefixlen: int = 24

    @property
    def rundir(self) -> Path:
        return self.run_dir

    @property
    def pki(self) -> Path:
        return self.pki_dir

    def place_on(self, host: str) -> placement.Host:
        return placement.Host(name=host, ns=self.host(host).ns, prefix=self.name,
                              bridge=self.bridge, prefixlen=self.prefixlen)


# -- reading the file ----------------------------------------------------------------

_KEYS = {"name", "management_address", "bridge", "run_dir", "namespace_prefix", "netns",
         "metrics_listen", "may_write", "spare_domr", "pki", "ssh", "peers", "metrics"}
_TABLES = {"pki": {"dir"}, "ssh": {"authorized_keys"},
           "metrics": {"tls", "htpasswd", "allow"}}


def load(path: Path | str) -> HostConfig:
    """Read and check `path`. Raises ConfigError naming the first wrong field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    return parse(doc, path)


def parse(doc: dict[str, Any], path: Path) -> HostConfig:
    def bad(name: str, message: str) -> ConfigError:
        return ConfigError(path, name, message)

    for key in doc:
        if key not in _KEYS:
            raise bad(key, f"unknown field (known: {', '.join(sorted(_KEYS))})")
    for table, keys in _TABLES.items():
        sub = doc.get(table, {})
        if not isinstance(sub, dict):
            raise bad(table, f"want a table [{table}]")
        for key in sub:
            if key not in keys:
                raise bad(f"{table}.{key}", f"unknown field (known: {', '.join(sorted(keys))})")

    def text(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise bad(name, f"want a non-empty string, got {value!r}")
        return value

    def get(name: str, default: Any = None) -> Any:
        table, _, key = name.rpartition(".")
        value = (doc.get(table, {}) if table else doc).get(key, default)
        if value is None:
            raise bad(name, "missing (required)")
        return value

    def abspath(name: str, default: str | None = None) -> Path:
        p = Path(text(name, get(name, default)))
        if not p.is_absolute():
            raise bad(name, f"want an absolute path, got {str(p)!r}")
        return p

    name = text("name", get("name"))
    if not tls.valid_host_name(name):
        raise bad("name", f"{name!r} is not a lowercase DNS label (a-z, 0-9, '-')")

    mgmt = text("management_address", get("management_address"))
    if "/" not in mgmt:
        raise bad("management_address", f"want ADDRESS/PREFIXLEN (e.g. 10.0.0.1/24), got "
                  f"{mgmt!r}: Domain Rs get addresses on this network")
    try:
        iface = ipaddress.ip_interface(mgmt)
    except ValueError as exc:
        raise bad("management_address", str(exc)) from None
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise bad("management_address", "IPv4 only (Domain R namespaces run without IPv6)")
    if iface.ip == iface.network.network_address or iface.network.prefixlen > 30:
        raise bad("management_address", f"{mgmt} is not a host address on a network")
    address, net = str(iface.ip), iface.network

    peers: dict[str, str] = {}
    raw_peers = doc.get("peers", {})
    if not isinstance(raw_peers, dict):
        raise bad("peers", "want a table [peers] of NAME = \"ADDRESS\"")
    for peer, value in raw_peers.items():
        where = f"peers.{peer}"
        if not tls.valid_host_name(peer):
            raise bad(where, f"{peer!r} is not a lowercase DNS label")
        if peer == name:
            raise bad(where, "a host is not its own peer")
        try:
            ip = ipaddress.IPv4Address(text(where, value))
        except ValueError as exc:
            raise bad(where, str(exc)) from None
        if ip not in net:
            raise bad(where, f"{ip} is not on the management network {net}: Domain R keeps "
                      "its address and MAC when it moves, so hosts share one L2 network")
        if str(ip) == address or str(ip) in peers.values():
            raise bad(where, f"{ip} is already another host's address")
        peers[peer] = str(ip)

    bridge = text("bridge", get("bridge", "br0"))
    if len(bridge) > 15 or "/" in bridge or bridge.strip() != bridge:
        raise bad("bridge", f"{bridge!r} is not an interface name")
    prefix = text("namespace_prefix", get("namespace_prefix", DEFAULT_PREFIX))
    if not NAME_RE.match(prefix):
        raise bad("namespace_prefix", f"{prefix!r}: 1-10 of [a-z0-9], starting with a letter")
    ns = doc.get("netns")
    if ns is not None:
        ns = text("netns", ns)
        if not netns.exists(ns):
            raise bad("netns", f"no network namespace {ns!r} (see `ip netns list`)")

    listen = text("metrics_listen", get("metrics_listen", f"{address}:{ports.METRICS}"))
    metrics = None if listen == "off" else _listen(listen, lambda m: bad("metrics_listen", m))
    m_tls = get("metrics.tls", False)
    if not isinstance(m_tls, bool):
        raise bad("metrics.tls", f"want true or false, got {m_tls!r}")
    htpasswd = None
    if "htpasswd" in doc.get("metrics", {}):
        htpasswd = abspath("metrics.htpasswd")
        if not os.access(htpasswd, os.R_OK) or not htpasswd.is_file():
            raise bad("metrics.htpasswd", f"cannot read {htpasswd}")
    allow = get("metrics.allow", [])
    if not isinstance(allow, list) or not all(isinstance(n, str) for n in allow):
        raise bad("metrics.allow", f"want a list of networks, got {allow!r}")
    for n in allow:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError as exc:
            raise bad("metrics.allow", str(exc)) from None
    may_write = get("may_write", True)
    if not isinstance(may_write, bool):
        raise bad("may_write", f"want true or false, got {may_write!r}")
    spare = get("spare_domr", True)
    if not isinstance(spare, bool):
        raise bad("spare_domr", f"want true or false, got {spare!r}")

    pki_dir = abspath("pki.dir", "/etc/keeper/pki")
    problem = tls.host_problem(pki_dir, name, address)
    if problem:
        raise bad("pki.dir", f"{problem} (make them with `keeper pki issue --host {name} "
                  f"--ip {address}`)")
    keys = None
    if "authorized_keys" in doc.get("ssh", {}):
        keys = abspath("ssh.authorized_keys")
        if not os.access(keys, os.R_OK) or not keys.is_file():
            raise bad("ssh.authorized_keys", f"cannot read {keys}")

    return HostConfig(path=path, name=name, address=address, prefixlen=net.prefixlen,
                      bridge=bridge, run_dir=abspath("run_dir", str(DEFAULT_RUN_DIR)),
                      prefix=prefix, pki_dir=pki_dir, metrics_listen=metrics, peers=peers,
                      netns=ns, authorized_keys=keys, may_write=may_write, spare_domr=spare,
                      metrics_tls=m_tls, metrics_htpasswd=htpasswd, metrics_allow=tuple(allow))


def _listen(value: str, bad: Any) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise bad(f"want ADDRESS:PORT, got {value!r}")
    try:
        ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise bad(f"want ADDRESS:PORT with an IPv4 address, got {value!r}") from None
    if not 0 < number < 65536:
        raise bad(f"port {number} out of range")
    return host, number


# -- where it runs ---------------------------------------------------------------------


def enter(cfg: HostConfig) -> tuple[str, bool]:
    """Move this thread into the agent's namespace; returns its name and whether this
    call gave it that name: `netns` if set, else the one the agent was started in
    (named `<prefix>-dom0` if it has no name yet, as `ip netns attach` would). Call
    first, before any thread exists."""
    if cfg.netns is not None:
        netns.enter(cfg.netns)
        return cfg.netns, False
    found = netns.current_name()
    if found is not None:
        return found, False
    name = f"{cfg.prefix}-dom0"
    if netns.exists(name):
        raise ConfigError(cfg.path, "netns", f"/run/netns/{name} names another namespace "
                          "than the one the agent runs in: set `netns`, or remove it")
    netns.attach(name)
    return name, True


def check_network(cfg: HostConfig, ns: str) -> None:
    """The bridge exists and the management address is on this host (where the agent
    listens for peers and Prometheus)."""
    if netns.link_index(ns, cfg.bridge) is None:
        raise ConfigError(cfg.path, "bridge", f"no interface {cfg.bridge!r} in this host's "
                          "network namespace (Domain Rs plug into it)")
    with netns.ipr(ns) as ip:
        kinds = {link.get_attr("IFLA_IFNAME"): (link.get_attr("IFLA_LINKINFO") or {})
                 for link in ip.get_links()}
        have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(family=2)}
    info = kinds.get(cfg.bridge)
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind != "bridge":
        raise ConfigError(cfg.path, "bridge", f"{cfg.bridge!r} is a {kind or 'plain'} "
                          "interface, not a bridge")
    if cfg.address not in have:
        raise ConfigError(cfg.path, "management_address", f"{cfg.address} is not an address "
                          "of this host")
