"""Shared fixtures. Tests that need root (namespaces, TCP_REPAIR) are marked `root` and
skip elsewhere; every namespace and process they make is removed even when they fail."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from keeper.net import netns


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("KEEPER_REQUIRE_ROOT") == "1":  # CI: root tests must run, not skip
        raise pytest.UsageError("KEEPER_REQUIRE_ROOT=1 but not root: the namespace, "
                                "TCP repair and QEMU tests would be skipped")
    skip = pytest.mark.skip(reason="needs root: network namespaces and TCP_REPAIR")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def unique(prefix: str = "kt") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Collects namespace names a test creates; removes them all afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        for ns in made:
            netns.remove(ns)


@pytest.fixture
async def lab() -> AsyncIterator[object]:
    """A whole lab (switch, hosts a and b with agents, client), removed afterwards."""
    from keeper.lab import ops, topology

    name = unique()
    try:
        spec = await ops.up(name)
        yield spec
    finally:
        topology.down(name)
        leftovers = [ns for ns in netns.netns.listnetns() if ns.startswith(f"{name}-")]
        assert not leftovers, f"lab left namespaces behind: {leftovers}"
        assert not lab_processes(name), f"lab left processes behind: {lab_processes(name)}"


def lab_processes(name: str) -> list[int]:
    """PIDs of live processes whose command line names lab `name` (agents, Domain Rs)."""
    from pathlib import Path

    from keeper.hostd import procs

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"keeper" in b" ".join(cmd) and any(
            arg == name.encode() or arg.startswith(f"{name}-".encode())
            or f"/{name}/".encode() in arg or arg.endswith(f"/{name}".encode()) for arg in cmd
        ) and procs.alive(int(proc.name)):
            found.append(int(proc.name))
    return found


@pytest.fixture
def network() -> Iterator[object]:
    """The lab's network only (switch, hosts, client), no agents; removed afterwards."""
    from keeper.lab import topology

    spec = topology.spec_for(unique())
    try:
        topology.build_network(spec)
        yield spec
    finally:
        topology.down(spec.name)
