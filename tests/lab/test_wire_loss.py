"""Loss on the wire (root): co-migrations while the client's path drops 10 % of the
frames each way lose nothing and break no session, for the raw console, OpenSSH and
VNC; and the loss rules really drop (and only the client's frames)."""

from __future__ import annotations

import socket
import time

import pytest

from keeper.lab import wireloss
from keeper.lab.faults import wire
from keeper.lab.topology import LabSpec
from keeper.net import netns

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]


@pytest.mark.parametrize("rms", wire.RMS)
async def test_two_co_migrations_at_10pct_loss_lose_nothing(rms: str) -> None:
    row = await wire.run_wire(rms, 10, migrations=2, interval=1.0)
    doc = row.doc()
    assert "error" not in doc, doc
    assert row.case == f"wire/{rms}/loss-10pct"
    assert doc["migrations"] == 2 and doc["keys_sent"] > 0
    assert row.lost == 0 and doc["duplicated"] == doc["reordered"] == 0, doc
    assert row.reconnects == 0, doc["errors"]
    assert row.recovered, doc
    # the wire did drop the client's frames, both ways, while the session typed
    assert doc["dropped_total"]["to_client"] > 0 and doc["dropped_total"]["from_client"] > 0
    assert len(doc["retransmits_client_per_migration"]) == 2
    assert all(m["trace_ok"] for m in doc["per_migration"])


def _udp_through_switch(spec: LabSpec, count: int) -> int:
    """Datagrams from the client to host a's address that arrived, of `count`."""
    host = spec.hosts[0]
    with netns.entered(host.ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(spec.client_ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((host.mgmt_ip, 9999))
        rx.settimeout(0.5)
        for _ in range(count):
            tx.sendto(b"x", (host.mgmt_ip, 9999))
            time.sleep(0.001)  # well within the receiver's buffer
        got = 0
        while True:
            try:
                rx.recv(16)
            except TimeoutError:
                break
            got += 1
        return got


def test_loss_rules_drop_the_clients_frames_and_go_away(network: LabSpec) -> None:
    spec = network
    _udp_through_switch(spec, 3)  # ARP resolved before counting
    wireloss.install(spec.switch_ns, 50)
    try:
        got = _udp_through_switch(spec, 200)
        dropped = wireloss.dropped(spec.switch_ns)
        # 50 % each way: some frames pass, some do not, and the counters saw them
        assert 30 < got < 170, got
        assert dropped["from_client"] > 0
        assert got + dropped["from_client"] >= 200  # every datagram: through or dropped
    finally:
        wireloss.remove(spec.switch_ns)
    wireloss.remove(spec.switch_ns)  # idempotent
    assert _udp_through_switch(spec, 50) == 50  # nothing dropped any more
    with pytest.raises(ValueError):
        wireloss.rule("to_client", 101)
