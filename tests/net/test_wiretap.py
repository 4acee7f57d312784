"""Counting a client's TCP retransmissions on the wire: the rule (no root), and on a real
bridge against the client kernel's own count while the server's port is down (root)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from keeper.net import netns
from keeper.net.tcpinfo import tcp_info
from keeper.net.wiretap import TH_FIN, TH_SYN, RetransmitCounter, WireTap, parse, seq_before
from tests.conftest import unique

SERVER_IP, CLIENT_IP, PORT = "198.18.0.100", "198.18.0.10", 2323
C = "198.18.0.10"


def test_sequence_space_wraps() -> None:
    assert seq_before(1, 2) and not seq_before(2, 1) and not seq_before(5, 5)
    assert seq_before(0xFFFFFFF0, 0x10)  # across the wrap
    assert not seq_before(0x10, 0xFFFFFFF0)


def test_a_segment_below_what_the_client_sent_is_a_retransmission() -> None:
    c = RetransmitCounter()
    assert not c.segment(C, 5000, 1000, 1, 0, at=0.0)  # new data: high 1001
    assert not c.segment(C, 5000, 1001, 1, 0, at=0.1)
    assert c.segment(C, 5000, 1001, 1, 0, at=0.2)  # the same byte again
    assert c.segment(C, 5000, 1000, 2, 0, at=0.3)  # repacketised, overlapping
    assert not c.segment(C, 5000, 1002, 1, 0, at=0.4)
    assert c.retransmits == 2 and c.first_retransmit() == 0.2
    assert c.flows[f"{C}:5000"].segments == 5


def test_a_pure_ack_tells_what_the_client_sent_before() -> None:
    c = RetransmitCounter()  # the target: it saw nothing of the pause
    assert not c.segment(C, 1, 500, 0, 0, at=0.0)  # ACK: SND.NXT is 500
    assert c.segment(C, 1, 495, 3, 0, at=0.1)  # resent from before: below 500
    assert c.segment(C, 1, 498, 2, 0, at=0.2)
    assert not c.segment(C, 1, 500, 4, 0, at=0.3)  # new
    assert not c.segment(C, 1, 400, 0, 0, at=0.4)  # an old ACK does not lower it
    assert c.flows[f"{C}:1"].high == 504
    assert c.retransmits == 2


def test_the_target_judges_its_first_segments_with_what_the_source_saw() -> None:
    source = RetransmitCounter()  # every segment of the pause comes to the source
    source.segment(C, 1, 100, 5, 0, at=0.0)
    source.segment(C, 1, 105, 3, 0, at=0.1)  # typed into the pause: lost
    target = RetransmitCounter()
    target.seed(source.highs())
    assert target.segment(C, 1, 105, 3, 0, at=1.0)  # resent before any ACK reached us
    assert not target.segment(C, 1, 108, 0, 0, at=1.1)
    assert not target.segment(C, 1, 108, 2, 0, at=1.2)  # new
    unseeded = RetransmitCounter()
    assert not unseeded.segment(C, 1, 105, 3, 0, at=1.0)  # what the seed is for
    target.seed({f"{C}:1": 50})  # an older view does not lower what we know
    assert target.highs() == {f"{C}:1": 110}


def test_flows_are_apart_and_syn_and_fin_are_handled() -> None:
    c = RetransmitCounter()
    assert not c.segment(C, 1, 100, 0, TH_SYN, at=0.0)
    assert not c.segment(C, 1, 101, 5, 0, at=0.0)
    assert not c.segment(C, 2, 101, 5, 0, at=0.0)  # another port: its own flow
    assert not c.segment(C, 1, 106, 0, TH_FIN, at=0.0)
    assert c.segment(C, 2, 101, 5, 0, at=0.0)
    assert c.retransmits == 1 and len(c.flows) == 2


def test_parse_reads_ethernet_ipv4_tcp() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    frame = bytes(Ether() / IP(src=C, dst=SERVER_IP) / TCP(sport=40000, dport=PORT, seq=7,
                                                           flags="PA") / b"hello")
    assert parse(frame) == (C, 40000, 7, 5, 0x18)
    assert parse(frame[:20]) is None
    assert parse(bytes(Ether() / IP(src=C, dst=SERVER_IP, proto=17) / (b"x" * 30))) is None


@pytest.fixture
def wire(namespaces: list[str]) -> Iterator[tuple[str, str, str]]:
    """A switch (bridge) between a client and a server namespace."""
    p = unique()
    sw, cl, srv = f"{p}-sw", f"{p}-cl", f"{p}-srv"
    namespaces.extend([sw, cl, srv])
    netns.ensure(sw)
    netns.ensure_bridge(sw, "sw0")
    for ns, port in ((cl, "p-cl"), (srv, "p-srv")):
        netns.ensure(ns)
        netns.ensure_veth(sw, port, ns, "eth0")
        netns.enslave(sw, port, "sw0")
        netns.set_up(ns, "eth0")
        netns.set_up(sw, port)
    netns.ensure_addr(cl, "eth0", CLIENT_IP, 24)
    netns.ensure_addr(srv, "eth0", SERVER_IP, 24)
    yield sw, cl, srv


@pytest.mark.root
def test_the_count_on_the_wire_is_the_clients_own(wire: tuple[str, str, str]) -> None:
    sw, cl, srv = wire
    with netns.entered(srv):
        listener = socket.create_server((SERVER_IP, PORT))
    with netns.entered(cl):
        client = socket.create_connection((SERVER_IP, PORT), timeout=5)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server, _ = listener.accept()
    with netns.entered(sw):
        tap = WireTap(SERVER_IP, record=True)
    try:
        for _ in range(3):
            client.sendall(b"k")
            time.sleep(0.02)
        assert server.recv(10) == b"kkk"
        netns.set_up(sw, "p-srv", False)  # the server's port goes down: a migration's pause
        for _ in range(5):  # typed into the pause: lost, resent by the client's TCP
            client.sendall(b"p")
            time.sleep(0.03)
        time.sleep(0.7)  # the client's RTO fires (and is lost) at least once more
        netns.set_up(sw, "p-srv", True)
        got = b""
        server.settimeout(5)
        while len(got) < 5:
            got += server.recv(10)
        assert got == b"ppppp"
        time.sleep(0.3)
        tap.drain()
        mine = tcp_info(client).total_retrans
        assert mine >= 2  # the scenario did cost retransmissions
        assert tap.counter.retransmits == mine
        assert tap.replay({}).retransmits == mine  # the record judged again: the same
    finally:
        tap.close()
        for s in (client, server, listener):
            s.close()
