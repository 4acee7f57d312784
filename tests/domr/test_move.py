"""Domain R moves between hosts with live client connections (root, whole lab).

The client runs in the lab's client namespace and checks every byte it gets back
against what it sent: exactly once, in order, on the one connection it opened.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from keeper.errors import KeeperError
from keeper.hostd import procs
from keeper.lab import ops
from keeper.lab.client import EchoClient, pattern
from keeper.lab.topology import LabSpec
from keeper.net import netns

pytestmark = pytest.mark.root

DOM = "r1"


async def make_domr(spec: LabSpec, **kw: object) -> tuple[str, int]:
    doc = await ops.create_domr(spec, DOM, "a", **kw)  # type: ignore[arg-type]
    return doc["ip"], 2323


async def connect_all(spec: LabSpec, addr: tuple[str, int], n: int) -> list[EchoClient]:
    clients = [EchoClient(spec.client_ns, addr, i) for i in range(n)]
    await asyncio.gather(*(c.connect() for c in clients))
    return clients


def assert_intact(client: EchoClient) -> None:
    st = client.stats
    assert st.errors == [], f"connection {st.conn_id}: {st.errors}"
    assert st.corrupted == 0
    assert st.received == st.sent > 0


async def test_twenty_moves_lose_nothing_in_either_direction(lab: LabSpec) -> None:
    addr = await make_domr(lab)
    typists = await connect_all(lab, addr, 3)
    (bulk,) = [EchoClient(lab.client_ns, addr, 99)]
    await bulk.connect()
    # A client that writes 2 MB and reads nothing until the end: Domain R's output
    # backs up (its send queue and our pending output), then its input (the kernel's
    # receive queue), so every dump holds queued bytes in both directions.
    (stalled,) = [EchoClient(lab.client_ns, addr, 55)]
    await stalled.connect()
    stalled_total = 2 << 20
    stalled_writer = asyncio.create_task(stalled._write(pattern(55, 0, stalled_total)))
    await asyncio.sleep(0.5)
    stop = asyncio.Event()
    typing = [asyncio.create_task(c.run_typing(stop, chunk=5, period=0.02)) for c in typists]
    # ~1.6 MB/s both ways for the whole run, so every dump catches bytes in flight
    streaming = asyncio.create_task(bulk.run_typing(stop, chunk=16 << 10, period=0.01))
    hosts = ["b", "a"]
    for i in range(20):
        trace = await ops.migrate(lab, DOM, hosts[i % 2])
        assert trace["sessions"] == 5
        assert trace["queued_in"] > 0 and trace["queued_out"] > 0, trace
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*typing)
    bulk_stats = await streaming
    await stalled._reader(stalled_total, 30)  # now read it all: exactly once, in order
    await stalled_writer
    assert stalled.stats.received == stalled_total and stalled.stats.corrupted == 0
    for c in typists:
        assert_intact(c)
    assert bulk_stats.errors == [] and bulk_stats.corrupted == 0
    assert bulk_stats.received == bulk_stats.sent > 16 << 20
    status = await ops.status(lab)
    (dom,) = status["domains"]
    assert dom["host"] == "a"
    (host_a,) = [h for h in status["hosts"] if h["host"] == "a"]
    # the same five connections, never a new one: nobody reconnected
    assert {s["id"] for s in host_a["domrs"][0]["domr"]["sessions"]} == {1, 2, 3, 4, 5}
    for c in (*typists, bulk, stalled):
        c.close()


async def test_hundred_connections_move_at_once(lab: LabSpec) -> None:
    addr = await make_domr(lab)
    clients = await connect_all(lab, addr, 100)
    for c in clients:  # each has echoed data behind it and some queued at the move
        await c._write(pattern(c.conn_id, 0, 100))
    trace = await ops.migrate(lab, DOM, "b")
    assert trace["sessions"] == 100
    await asyncio.gather(*(c.echo(50) for c in clients))
    for c in clients:
        assert c.stats.corrupted == 0
        assert c.stats.received == c.stats.sent == 150
        c.close()


async def test_large_transfer_moved_mid_stream_arrives_intact(lab: LabSpec) -> None:
    addr = await make_domr(lab)
    client = EchoClient(lab.client_ns, addr, 7)
    await client.connect()
    total = 20 << 20
    sent_digest = hashlib.sha256(pattern(7, 0, total)).hexdigest()
    received = bytearray()
    original_reader = client._reader

    async def tee_reader(stop_at: int | None, timeout: float) -> None:
        # keep what arrives for an end-to-end checksum besides the running comparison
        loop = asyncio.get_running_loop()
        assert client.sock is not None
        real_recv = loop.sock_recv

        async def recv(sock, n):  # type: ignore[no-untyped-def]
            data = await real_recv(sock, n)
            received.extend(data)
            return data

        loop.sock_recv = recv  # type: ignore[method-assign]
        try:
            await original_reader(stop_at, timeout)
        finally:
            loop.sock_recv = real_recv  # type: ignore[method-assign]

    client._reader = tee_reader  # type: ignore[method-assign]
    # 64 KiB every 20 ms for about 6.5 s, so the move (its twin takes a second or
    # more to start on a loaded machine) lands in the middle, with bytes in flight
    transfer = asyncio.create_task(client.transfer(total, pace=0.02, timeout=60))
    while client.stats.received < total // 4:
        await asyncio.sleep(0.01)
    trace = await ops.migrate(lab, DOM, "b")
    assert client.stats.received < total, "the move did not happen mid-stream"
    st = await transfer
    assert st.errors == [] and st.corrupted == 0
    assert hashlib.sha256(bytes(received)).hexdigest() == sent_digest
    assert trace["queued_in"] + trace["queued_out"] > 0
    client.close()


async def fdb_port(lab: LabSpec, mac: str) -> str | None:
    return (await asyncio.to_thread(netns.fdb, lab.switch_ns, "sw0")).get(mac)


async def test_without_announcement_traffic_stalls_until_domain_r_speaks(lab: LabSpec) -> None:
    doc = await ops.create_domr(lab, DOM, "a", announce=False)
    client = EchoClient(lab.client_ns, (doc["ip"], 2323), 1)
    await client.connect()
    await client.echo(10)  # one round trip: the switch learns where the MAC is
    assert client.stats.received == 10
    assert await fdb_port(lab, doc["mac"]) == "p-a"

    await ops.migrate(lab, DOM, "b")  # silent resume: no ARP, no window probe
    assert await fdb_port(lab, doc["mac"]) == "p-a"  # the switch still points at host A
    await client._write(pattern(1, 10, 10))
    reader = asyncio.create_task(client._reader(20, 30))
    await asyncio.sleep(2.0)
    # The client's segments (and its retransmissions) all went to host A.
    assert client.stats.received == 10
    assert client.retransmits() >= 1

    await ops.call(lab, "b", "POST", f"/domr/{DOM}/announce")
    assert await fdb_port(lab, doc["mac"]) == "p-b"
    await reader  # the next retransmission gets through, and its echo comes back
    assert client.stats.received == 20 and client.stats.corrupted == 0
    client.close()


@pytest.mark.parametrize(
    ("point", "action"),
    [("prepare", "fail"), ("restore", "fail"), ("restored", "crash"), ("link_up", "crash")],
)
async def test_failed_move_leaves_sessions_on_the_source(
    lab: LabSpec, point: str, action: str
) -> None:
    addr = await make_domr(lab)
    clients = await connect_all(lab, addr, 2)
    stop = asyncio.Event()
    typing = [asyncio.create_task(c.run_typing(stop, chunk=4, period=0.02)) for c in clients]
    await asyncio.sleep(0.3)
    await ops.call(lab, "b", "POST", "/debug/fault", json={"point": point, "action": action})
    try:
        with pytest.raises(KeeperError, match="it stays on a"):
            await ops.migrate(lab, DOM, "b")
    finally:
        await asyncio.sleep(0.5)  # typing goes on, on host A
        stop.set()
        await asyncio.gather(*typing)
    assert await ops.where(lab, DOM) == "a"
    for c in clients:
        assert_intact(c)
        c.close()
    if action == "crash":  # the target's half-made Domain R died with its agent
        pid = int((lab.rundir / "pids" / f"domr-{DOM}-b.pid").read_text())
        for _ in range(100):
            if not procs.alive(pid):
                break
            await asyncio.sleep(0.02)
        assert not procs.alive(pid)
