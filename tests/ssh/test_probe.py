"""A key the blackout lost, and the keepalive a restored SSH connection sends at once
(keeper.ssh.host resume, keeper.ssh.movable.probe).

A real OpenSSH client types one key while its path drops every frame (as a move's
blackout does) and then waits, as after an Enter: one segment in flight, nothing
after it. Its TCP would resend it at its loss-probe timer (200 ms and more for a lone
segment). With the probe, the client's answer follows the lost key, our ACK tells its
TCP of the gap (SACK), and the key is resent by fast recovery, not by a probe or a
timeout: the client namespace's own counters say which (no timing asserted)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import pytest

from keeper.console.raw import RawSession
from keeper.lab import sshkeys, wireloss
from keeper.lab.sshclient import SshLink
from keeper.net import netns
from keeper.net.tcpinfo import tcp_info
from keeper.ssh import movable
from keeper.ssh.host import SshConfig, SshHost

pytestmark = pytest.mark.root

COUNTERS = ("TCPLossProbes", "TCPTimeouts", "TCPSackRecovery")


def tcp_counters(ns: str) -> dict[str, int]:
    """TcpExt counters of namespace `ns` (its /proc/net/netstat)."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"],
                          check=True, capture_output=True, text=True).stdout
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    names, values = lines[0][1:], lines[1][1:]
    counts = dict(zip(names, map(int, values), strict=True))
    return {name: counts[name] for name in COUNTERS}


@pytest.mark.parametrize("probe", [True, False])
async def test_a_lost_lone_key_is_resent_by_fast_recovery_after_a_probe(
        network: object, tmp_path: Path, probe: bool) -> None:
    spec = network
    host = spec.hosts[0]  # type: ignore[attr-defined]
    auth = sshkeys.ensure_login_key(spec)  # type: ignore[arg-type]
    cfg = SshConfig(
        host_key=asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode(),
        authorized_keys=auth.read_text())
    typed: list[bytes] = []

    def on_input(session: RawSession) -> None:
        typed.append(session.pending_in)
        session.take_input(len(session.pending_in))

    ssh = SshHost(cfg, host.mgmt_ip, on_input=on_input, port=2224)
    with netns.entered(host.ns):
        ssh.bind()
    ssh.start()
    link = None
    try:
        link = await SshLink.start(spec.client_ns, host.mgmt_ip, port=2224,  # type: ignore[attr-defined]
                                   key=spec.ssh_dir / "id_ed25519",  # type: ignore[attr-defined]
                                   known_hosts=tmp_path / "known_hosts", workdir=tmp_path)
        await link.wait_connected()
        while not ssh.sessions:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the login settles; its packets all acknowledged
        (conn,) = ssh.conns
        before = tcp_counters(spec.client_ns)  # type: ignore[attr-defined]
        # (pyroute2's nftables runs a loop of its own: from a thread)
        await asyncio.to_thread(wireloss.install, spec.switch_ns, 100)  # type: ignore[attr-defined]
        try:
            await link.send(b"x")
            for _ in range(100):  # until the key is on the wire, unacknowledged
                if tcp_info(link._sock).unacked:  # type: ignore[arg-type]
                    break
                await asyncio.sleep(0.002)
            assert tcp_info(link._sock).unacked == 1  # type: ignore[arg-type]
            await asyncio.sleep(0.03)  # lost in the blackout
        finally:
            await asyncio.to_thread(wireloss.remove, spec.switch_ns)  # type: ignore[attr-defined]
        if probe:
            movable.probe(conn)
        for _ in range(300):
            if typed:
                break
            await asyncio.sleep(0.005)
        assert typed == [b"x"]
        after = tcp_counters(spec.client_ns)  # type: ignore[attr-defined]
        grew = {k: after[k] - before[k] for k in COUNTERS}
        if probe:
            assert grew == {"TCPLossProbes": 0, "TCPTimeouts": 0, "TCPSackRecovery": 1}, grew
        else:  # what the probe spares: the client's own timer resends it
            assert grew["TCPSackRecovery"] == 0 and \
                grew["TCPLossProbes"] + grew["TCPTimeouts"] >= 1, grew
    finally:
        if link is not None:
            link.close()
        await ssh.close()
