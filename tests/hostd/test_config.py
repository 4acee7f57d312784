"""Host agents an operator deploys: `keeper pki`, `keeper hostd --config FILE`.

Without root: the PKI commands and every config mistake (exit 2, the field named).
With root: two agents started from config files, each in its own namespace as two
machines would be (no `keeper lab up`), co-migrate a guest back and forth while a
client types into its console.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keeper.errors import KeeperError
from keeper.hostd import config, procs, tls
from keeper.http import Http
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.net import netns
from tests.conftest import lab_processes

GUEST = "guest1"
PROMPT = b"guest1:~$ "
GUEST_IP, GUEST_MAC = "198.18.0.77", "02:6b:70:00:00:4d"


def keeper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keeper", *args], capture_output=True,
                          text=True, timeout=timeout)


async def keeper_async(*args: str) -> str:
    """`keeper ARGS` without blocking the event loop (a client types meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeper", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


def make_pki(tmp: Path, hosts: dict[str, str]) -> dict[str, Path]:
    """What an operator does: a CA on one machine, each host's files copied to it."""
    ca = tmp / "ca"
    done = keeper("pki", "init", "--dir", str(ca))
    assert done.returncode == 0, done.stderr
    out = {}
    for host, ip in hosts.items():
        done = keeper("pki", "issue", "--dir", str(ca), "--host", host, "--ip", ip)
        assert done.returncode == 0, done.stderr
        d = tmp / f"pki-{host}"
        d.mkdir(mode=0o700)
        for name in ("ca.crt", f"{host}.crt", f"{host}.key"):
            shutil.copy2(ca / name, d / name)
        out[host] = d
    return out


def write_config(path: Path, **fields: Any) -> Path:
    lines, tables = [], []
    for key, value in fields.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path


# -- no root: the PKI and the file's checks ---------------------------------------------


def test_pki_init_issue_list_and_a_config_that_uses_them(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, {"a": "198.18.0.1"})["a"]
    ca = tmp_path / "ca"
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (ca / "a.key").stat().st_mode & 0o777 == 0o600
    again = keeper("pki", "issue", "--dir", str(ca), "--host", "a", "--ip", "198.18.0.1")
    assert again.returncode == 0 and "kept the valid" in again.stdout  # idempotent
    listed = json.loads(keeper("pki", "list", "--dir", str(ca), "--json").stdout)
    rows = {r["file"]: r for r in listed["certificates"]}
    assert rows["a.crt"]["ip"] == "198.18.0.1" and rows["a.crt"]["signed_by_ca"] == "yes"
    # the host's directory has no CA key and is enough to serve and to call peers
    assert not (pki / "ca.key").exists()
    tls.server_context(pki, "a")
    tls.client_context(pki, "a")
    cfg = config.load(write_config(tmp_path / "a.toml", name="a",
                                   management_address="198.18.0.1/24",
                                   run_dir=str(tmp_path / "run"), pki={"dir": str(pki)},
                                   peers={"b": "198.18.0.2"}))
    assert (cfg.name, cfg.address, cfg.prefixlen, cfg.peers) == (
        "a", "198.18.0.1", 24, {"b": "198.18.0.2"})
    assert cfg.metrics_listen == ("198.18.0.1", 9464)  # keeper.ports.METRICS by default
    off = config.load(write_config(tmp_path / "off.toml", name="a", metrics_listen="off",
                                   management_address="198.18.0.1/24", pki={"dir": str(pki)},
                                   metrics={"tls": True, "allow": ["198.18.0.0/15"]}))
    assert (off.metrics_listen, off.metrics_tls, off.metrics_allow) == (
        None, True, ("198.18.0.0/15",))
    spec = cfg.spec("dom0")
    assert spec.rundir == tmp_path / "run" and spec.pki == pki
    assert spec.host("b").agent_url == "https://198.18.0.2:7480"
    assert spec.place_on("a").bridge == "br0" and spec.agent_socket("a").parent == spec.rundir

    no_ca = keeper("pki", "issue", "--dir", str(tmp_path / "empty"), "--host", "c",
                   "--ip", "198.18.0.3")
    assert no_ca.returncode == 1 and "keeper pki init" in no_ca.stderr
    bad = keeper("pki", "issue", "--dir", str(ca), "--host", "Bad_Name", "--ip", "198.18.0.3")
    assert bad.returncode == 1 and "DNS label" in bad.stderr


@pytest.fixture(scope="module")
def host_a_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    tls.make_ca(d)
    tls.issue_host(d, "a", "198.18.0.1")
    return d


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"management_address": "198.18.0.1/24"}, "name", "missing"),
    ({"name": "a"}, "management_address", "missing"),
    ({"name": "a", "management_address": "198.18.0.1"}, "management_address", "PREFIXLEN"),
    ({"name": "a", "management_address": "198.18.0.300/24"}, "management_address", "198.18"),
    ({"name": "A!", "management_address": "198.18.0.1/24"}, "name", "DNS label"),
    ({"name": "a", "management_address": "198.18.0.1/24", "peers": {"b": "10.9.0.2"}},
     "peers.b", "not on the management network"),
    ({"name": "a", "management_address": "198.18.0.1/24", "peers": {"a": "198.18.0.2"}},
     "peers.a", "own peer"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics_listen": "nowhere"},
     "metrics_listen", "ADDRESS:PORT"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics_listen": "198.18.0.1:0"},
     "metrics_listen", "out of range"),
    ({"name": "a", "management_address": "198.18.0.1/24", "run_dir": "relative/dir"},
     "run_dir", "absolute"),
    ({"name": "a", "management_address": "198.18.0.1/24", "brige": "br0"},
     "brige", "unknown field"),
    ({"name": "a", "management_address": "198.18.0.1/24", "may_write": "yes"},
     "may_write", "true or false"),
    ({"name": "a", "management_address": "198.18.0.1/24", "spare_domr": 1},
     "spare_domr", "true or false"),
    ({"name": "a", "management_address": "198.18.0.1/24", "netns": "keeper-no-such-ns"},
     "netns", "no network namespace"),
    ({"name": "a", "management_address": "198.18.0.1/24",
      "ssh": {"authorized_keys": "/nonexistent/keys"}}, "ssh.authorized_keys", "cannot read"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics": {"tls": 1}},
     "metrics.tls", "true or false"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics": {"allow": ["x/8"]}},
     "metrics.allow", "does not appear to be"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics": {"htpasswd": "/no/f"}},
     "metrics.htpasswd", "cannot read"),
    ({"name": "a", "management_address": "198.18.0.1/24", "metrics": {"port": 1}},
     "metrics.port", "unknown field"),
    ({"name": "a", "management_address": "198.18.0.5/24"}, "pki.dir", "not 198.18.0.5"),
    ({"name": "b", "management_address": "198.18.0.1/24"}, "pki.dir", "b.key or b.crt missing"),
])
def test_a_config_mistake_names_the_field_and_exits_2(
        tmp_path: Path, host_a_pki: Path, fields: dict[str, Any], field: str, says: str) -> None:
    fields.setdefault("pki", {"dir": str(host_a_pki)})
    path = write_config(tmp_path / "hostd.toml", **fields)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert caught.value.field == field and says in str(caught.value), str(caught.value)
    done = keeper("hostd", "--config", str(path))  # the agent itself: exit 2, field named
    assert done.returncode == 2, done.stderr
    assert f"{path}: {field}: " in done.stderr and says in done.stderr


def test_a_file_that_is_not_toml_or_not_there_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "a"\nmanagement_address = \n')
    done = keeper("hostd", "--config", str(bad))
    assert done.returncode == 2 and "not valid TOML" in done.stderr and "line 2" in done.stderr
    done = keeper("hostd", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2 and "cannot read it" in done.stderr


def test_the_shipped_example_is_valid_but_for_its_credentials() -> None:
    example = Path(__file__).parents[2] / "deploy" / "hostd.toml"
    with pytest.raises(config.ConfigError) as caught:
        config.load(example)
    assert caught.value.field == "pki.dir"  # everything before it parsed
    unit = (example.parent / "keeper-hostd.service").read_text()
    assert "keeper hostd --config /etc/keeper/hostd.toml" in unit
    assert "RestartPreventExitStatus=2" in unit


# -- root: two agents from config files, no `keeper lab up` ------------------------------


@pytest.mark.root
def test_an_agent_in_a_namespace_without_a_name_names_it(tmp_path: Path, host_a_pki: Path) -> None:
    """As on a real host (the agent runs in the host's own namespace, which has no name
    under /run/netns): here a fresh namespace from `unshare --net` with its bridge."""
    prefix = f"kn{os.getpid() % 100000}"
    cfg = write_config(tmp_path / "a.toml", name="a", management_address="198.18.0.1/24",
                       namespace_prefix=prefix, run_dir=str(tmp_path / "run"),
                       pki={"dir": str(host_a_pki)})
    machine = (  # the host's network, made with pyroute2 inside the new namespace
        "from pyroute2 import IPRoute\n"
        "import subprocess, sys\n"
        "ip = IPRoute()\n"
        "ip.link('add', ifname='br0', kind='bridge')\n"
        "i = ip.link_lookup(ifname='br0')[0]\n"
        "ip.addr('add', index=i, address='198.18.0.1', prefixlen=24)\n"
        "ip.link('set', index=i, state='up')\n"
        "for _ in range(2):\n"
        "    done = subprocess.run([sys.executable, '-m', 'keeper', 'hostd', '--config',"
        f" {str(cfg)!r}, '--check'], capture_output=True, text=True)\n"
        "    print(done.returncode, done.stdout.strip(), done.stderr.strip())\n")
    try:
        done = subprocess.run(["unshare", "--net", sys.executable, "-c", machine],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        runs = done.stdout.splitlines()
        assert len(runs) == 2 and all(r.startswith("0 ") for r in runs), runs
        assert all(f"in netns {prefix}-dom0, management 198.18.0.1/24 on br0" in r
                   for r in runs)
        assert f"{prefix}-dom0" not in netns.netns.listnetns()  # --check leaves no name
    finally:
        netns.remove(f"{prefix}-dom0")


def scrape(ns: str, addr: tuple[str, int]) -> bytes:
    """GET /metrics from a socket made in namespace `ns` (a machine on the network)."""
    with netns.entered(ns):
        sock = socket.create_connection(addr, timeout=10)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


class Agent:
    """One `keeper hostd --config` process, as systemd would run it."""

    def __init__(self, cfg_path: Path, ns: str, log: Path, *, via_nsenter: bool) -> None:
        argv = [sys.executable, "-m", "keeper", "hostd", "--config", str(cfg_path)]
        if via_nsenter:  # started inside its "machine", the config names no namespace
            argv = ["nsenter", f"--net=/run/netns/{ns}", *argv]
        self.cfg = config.load(cfg_path)
        self.spec = self.cfg.spec(ns)
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    async def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        http = Http(unix=str(self.spec.agent_socket(self.cfg.name)), timeout=2)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"agent exited {self.proc.returncode}: "
                                         f"{self.log.read_text()[-2000:]}")
                with contextlib.suppress(KeeperError):
                    status = dict(await http.call("GET", "/status"))
                    # the control socket answers first; /metrics listens a moment later
                    if status.get("metrics_url") or self.cfg.metrics_listen is None:
                        return status
                await asyncio.sleep(0.1)
        finally:
            await http.close()
        raise AssertionError(f"agent not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM by PID, then what it started (recorded in its run directory)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        procs.stop_all(self.cfg.run_dir)


@pytest.mark.root
async def test_two_agents_from_config_files_co_migrate_a_guest(
        network: LabSpec, tmp_path: Path) -> None:
    a_ns, b_ns = network.host("a").ns, network.host("b").ns
    pki = make_pki(tmp_path, {"a": "198.18.0.1", "b": "198.18.0.2"})
    run = network.rundir  # removed with the network; each "machine" has its own run_dir
    common = {"namespace_prefix": network.name, "bridge": "br0"}
    a_cfg = write_config(tmp_path / "a.toml", name="a", management_address="198.18.0.1/24",
                         run_dir=str(run / "hostd-a"), netns=a_ns, **common,
                         metrics_listen="198.18.0.1:9469",
                         pki={"dir": str(pki["a"])}, peers={"b": "198.18.0.2"})
    b_cfg = write_config(tmp_path / "b.toml", name="b", management_address="198.18.0.2/24",
                         run_dir=str(run / "hostd-b"), **common,
                         pki={"dir": str(pki["b"])}, peers={"a": "198.18.0.1"})
    check = keeper("hostd", "--config", str(a_cfg), "--check")
    assert check.returncode == 0 and f"netns {a_ns}" in check.stdout, check.stderr
    wrong = write_config(tmp_path / "wrong.toml", name="a", management_address="198.18.0.1/24",
                         netns=a_ns, bridge="up0", pki={"dir": str(pki["a"])})
    done = keeper("hostd", "--config", str(wrong))  # up0 is the uplink veth, not a bridge
    assert done.returncode == 2 and "bridge: 'up0' is a veth interface" in done.stderr

    agents = [Agent(a_cfg, a_ns, tmp_path / "a.log", via_nsenter=False),
              Agent(b_cfg, b_ns, tmp_path / "b.log", via_nsenter=True)]
    typist: Typist | None = None
    try:
        status = [await agent.ready() for agent in agents]
        assert [(s["host"], s["netns"], s["mgmt_ip"]) for s in status] == [
            ("a", a_ns, "198.18.0.1"), ("b", b_ns, "198.18.0.2")]
        # the config's metrics_listen reached the agent (b: the default port)
        assert [s.get("metrics_url") for s in status] == [
            "http://198.18.0.1:9469/metrics", "http://198.18.0.2:9464/metrics"]
        page = await asyncio.to_thread(scrape, network.client_ns, ("198.18.0.1", 9469))
        assert page.startswith(b"HTTP/1.1 200") and b"keeper_hostd_" in page
        spec_a, spec_b = agents[0].spec, agents[1].spec
        # the operator's commands on machine a, through its config (README)
        made = await keeper_async("guest", "create", GUEST, "--ip", GUEST_IP, "--mac",
                                  GUEST_MAC, "--mem-mb", "16", "--dirty-rate", "200",
                                  "--config", str(a_cfg))
        assert f"guest {GUEST} on host a" in made
        assert f"{network.name}-r-{GUEST}-a" in os.listdir("/run/netns")
        before = (await ops.journal(spec_a, GUEST))["count"]
        typist = await Typist.over_tcp(network.client_ns, (GUEST_IP, 2323), PROMPT,
                                       period=0.02)
        stop = asyncio.Event()
        task = asyncio.create_task(typist.run(stop))
        await asyncio.sleep(0.5)
        # each "machine" only reaches its own agent: a migrates to b, b back to a
        traces = [json.loads(await keeper_async("migrate", GUEST, "--to", "b", "--json",
                                                "--config", str(a_cfg)))]
        await asyncio.sleep(0.3)
        traces.append(await ops.migrate(spec_b, GUEST, "a"))
        await asyncio.sleep(0.3)
        stop.set()
        stats = await task
        journal = (await ops.journal(spec_a, GUEST))["journal"][before:]
        assert compare(bytes(stats.sent), journal) == {
            "lost": 0, "duplicated": 0, "reordered": 0}, stats.errors
        assert not stats.errors and len(stats.sent) > 20
        assert [(t["source"], t["target"]) for t in traces] == [("a", "b"), ("b", "a")]
        assert all(t["trace_ok"] and t["sync_points"] == [f"S{i}" for i in range(1, 8)]
                   for t in traces)
    finally:
        if typist is not None:
            typist.close()
        for agent in agents:
            agent.stop()
    for agent in agents:
        assert agent.proc.returncode == 0, agent.log.read_text()[-2000:]
    assert not lab_processes(network.name)  # agents, Domain Rs and guests all ended
