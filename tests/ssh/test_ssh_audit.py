"""ssh-audit (PyPI ssh-audit) against Domain R's SSH server in the lab (root): no
failure anywhere; no warning but the one keeper.ssh.policy accepts on purpose, and
only while asyncssh lacks sntrup761 (curve25519, which OpenSSH < 9.9 needs, draws
"does not provide protection against post-quantum attacks"). The same server
without that fallback audits clean; an OpenSSH client still logs in (the other tests
in tests/ssh, through co-migrations)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.net import netns
from keeper.ssh import policy

pytestmark = pytest.mark.root

AUDIT = shutil.which("ssh-audit", path=str(Path(sys.executable).parent)) or "ssh-audit"
PQ_WARNING = "does not provide protection against post-quantum attacks"
SECTIONS = ("kex", "key", "enc", "mac")


async def audit(ns: str | None, host: str, port: int = 22) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        AUDIT, "-j", "-p", str(port), "-t", "10", host, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: netns.enter(ns)) if ns is not None else None)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert out, err.decode()[-2000:]
    return proc.returncode or 0, json.loads(out)


def findings(report: dict[str, Any], level: str) -> list[tuple[str, str, str]]:
    """(section, algorithm, note) for every note of `level` ("fail" or "warn")."""
    return [(section, alg["algorithm"], note) for section in SECTIONS
            for alg in report.get(section, []) for note in alg.get("notes", {}).get(level, [])]


def expected_warnings() -> list[tuple[str, str, str]]:
    return [("kex", alg, PQ_WARNING) for alg in policy.kex_algs()
            if alg in policy.FALLBACK_KEX]


async def test_domain_r_ssh_server_audits_clean(lab: LabSpec) -> None:
    doc = await ops.create_guest(lab, "guest1", "a", mem_mb=16)
    code, report = await audit(lab.client_ns, doc["ip"])
    assert report["banner"]["software"].startswith("AsyncSSH")
    assert findings(report, "fail") == [], findings(report, "fail")
    assert findings(report, "warn") == expected_warnings(), findings(report, "warn")
    assert report["recommendations"] == {} or not any(
        report["recommendations"].get(k) for k in ("critical", "warning")), report
    assert report["cves"] == []
    # exactly what keeper.ssh.policy offers, nothing asyncssh would add by default
    assert [a["algorithm"] for a in report["kex"] if "@openssh.com" not in a["algorithm"]
            and not a["algorithm"].startswith("ext-info")] == policy.kex_algs()
    assert [a["algorithm"] for a in report["key"]] == ["ssh-ed25519"]
    assert [a["algorithm"] for a in report["enc"]] == [
        "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]
    assert not any("sha1" in a["algorithm"] for s in SECTIONS for a in report[s])
    assert report["compression"] == ["none"]
    # the exit status agrees: 0 clean, 2 warnings only (ssh-audit's exitcodes)
    assert code == (2 if expected_warnings() else 0)


async def test_without_the_fallback_the_policy_audits_with_no_warning(tmp_path: Path) -> None:
    """The rest of the policy, on loopback: with only the post-quantum key exchange,
    ssh-audit finds no failure and no warning at all (exit status 0)."""
    import asyncssh

    from keeper.ssh import movable

    key = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
    opts = movable.server_options(server_host_keys=policy.host_keys([key]),
                                  authorized_client_keys=None, encoding=None,
                                  **policy.options())
    opts["kex_algs"] = [a for a in opts["kex_algs"] if a not in policy.FALLBACK_KEX]
    server = await asyncssh.create_server(asyncssh.SSHServer, "127.0.0.1", 0, **opts)
    port = server.sockets[0].getsockname()[1]
    try:
        code, report = await audit(None, "127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()
    assert findings(report, "fail") == [] and findings(report, "warn") == [], report
    assert code == 0


def test_rsa_host_keys_sign_with_sha2_only_and_need_3072_bits() -> None:
    import asyncssh

    from keeper.errors import KeeperError

    small = asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_private_key()
    with pytest.raises(KeeperError, match="at least 3072 bits"):
        policy.host_keys([small.decode()])
    big = asyncssh.generate_private_key("ssh-rsa", key_size=3072).export_private_key()
    (pair,) = policy.host_keys([big.decode()])
    assert list(pair.host_key_algorithms) == [b"rsa-sha2-512", b"rsa-sha2-256"]
    ecdsa = asyncssh.generate_private_key("ecdsa-sha2-nistp256").export_private_key()
    with pytest.raises(KeeperError, match="not allowed"):
        policy.host_keys([ecdsa.decode()])


def test_kex_falls_back_to_curve25519_only_without_sntrup761() -> None:
    have = [b"mlkem768x25519-sha256", b"curve25519-sha256", b"diffie-hellman-group16-sha512"]
    assert policy.kex_algs(have) == ["mlkem768x25519-sha256", "curve25519-sha256"]
    have.append(b"sntrup761x25519-sha512")
    assert policy.kex_algs(have) == ["mlkem768x25519-sha256", "sntrup761x25519-sha512"]


async def test_post_quantum_only_domain_r_audits_with_no_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's switch (KEEPER_SSH_KEX=post-quantum in the agents' environment):
    the Domain R of a lab started so offers no curve25519, and ssh-audit reports no
    failure and no warning at all (exit status 0)."""
    from keeper.lab import topology
    from tests.conftest import unique

    monkeypatch.setenv(policy.KEX_ENV, "post-quantum")
    name = unique()
    try:
        spec = await ops.up(name)
        doc = await ops.create_guest(spec, "guest1", "a", mem_mb=16)
        code, report = await audit(spec.client_ns, doc["ip"])
    finally:
        topology.down(name)
    assert findings(report, "fail") == [] and findings(report, "warn") == [], report
    assert not any(a["algorithm"] in policy.FALLBACK_KEX for a in report["kex"])
    assert code == 0


def test_a_kex_mode_not_known_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from keeper.errors import KeeperError

    monkeypatch.setenv(policy.KEX_ENV, "fast")
    with pytest.raises(KeeperError, match="KEEPER_SSH_KEX='fast'"):
        policy.kex_algs()
    assert "curve25519-sha256" not in policy.kex_algs(mode="post-quantum")
