"""TCP repair across real namespaces: a connection dumped in one namespace carries on
from a socket restored in another that has the same IP and MAC (root)."""

from __future__ import annotations

import hashlib
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from keeper import serial
from keeper.errors import NotMovable
from keeper.net import netns, tcprepair
from keeper.net.tcpinfo import tcp_info
from tests.conftest import unique

pytestmark = pytest.mark.root

SERVER_IP, CLIENT_IP, PORT = "198.18.0.100", "198.18.0.10", 2323
MAC = "02:6b:70:aa:00:01"


@dataclass
class Pair:
    switch: str
    client: str
    old: str
    new: str

    def link(self, ns: str, up: bool) -> None:
        """The switch port of namespace `ns` (its `-old`/`-new`/`-cl` suffix names it)."""
        netns.set_up(self.switch, f"p-{ns.rsplit('-', 1)[1]}", up)


@pytest.fixture
def pair(namespaces: list[str]) -> Iterator[Pair]:
    """switch bridge; client; two server namespaces with the same IP/MAC, new one's link down."""
    p = unique()
    topo = Pair(f"{p}-sw", f"{p}-cl", f"{p}-old", f"{p}-new")
    namespaces.extend([topo.switch, topo.client, topo.old, topo.new])
    netns.ensure(topo.switch)
    netns.ensure_bridge(topo.switch, "sw0")
    for ns, port, mac in ((topo.client, "p-cl", None), (topo.old, "p-old", MAC),
                          (topo.new, "p-new", MAC)):
        netns.ensure(ns)
        netns.ensure_veth(topo.switch, port, ns, "eth0", mac_b=mac)
        netns.enslave(topo.switch, port, "sw0")
        netns.set_up(ns, "eth0")
    netns.ensure_addr(topo.client, "eth0", CLIENT_IP, 24)
    netns.ensure_addr(topo.old, "eth0", SERVER_IP, 24)
    netns.ensure_addr(topo.new, "eth0", SERVER_IP, 24)
    topo.link(topo.client, True)
    topo.link(topo.old, True)
    yield topo


def connect(pair: Pair) -> tuple[socket.socket, socket.socket, socket.socket]:
    with netns.entered(pair.old):
        ls = socket.socket()
        ls.bind((SERVER_IP, PORT))
        ls.listen()
    with netns.entered(pair.client):
        client = socket.create_connection((SERVER_IP, PORT), timeout=5)
    server, _ = ls.accept()
    server.settimeout(5)
    return ls, client, server


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def move(pair: Pair, server: socket.socket) -> tuple[socket.socket, tcprepair.TcpRepairRecord]:
    """The order Domain R uses: old link down, dump, restore, release, new link up."""
    pair.link(pair.old, False)
    rec = tcprepair.dump(server)
    rec = serial.loads("tcp", serial.dumps("tcp", rec), tcprepair.TcpRepairRecord)
    with netns.entered(pair.new):
        restored = tcprepair.restore(rec)
    tcprepair.release(server)
    pair.link(pair.new, True)
    tcprepair.leave_repair(restored.sock)
    sock = restored.sock
    sock.settimeout(5)
    if restored.resend:
        threading.Thread(target=sock.sendall, args=(restored.resend,), daemon=True).start()
    return sock, rec


def wait_inq(sock: socket.socket, n: int) -> None:
    for _ in range(200):
        if tcprepair._ioctl_int(sock, tcprepair.SIOCINQ, "SIOCINQ") >= n:
            return
        select.select([], [], [], 0.01)
    raise AssertionError(f"receive queue never reached {n} bytes")


def test_queues_in_both_directions_survive_a_move(pair: Pair) -> None:
    ls, client, server = connect(pair)
    ls.close()
    to_server = b"c2s-" * 15_000  # 60 kB, left unread in the server's receive queue
    client.sendall(to_server)
    wait_inq(server, len(to_server))
    server.setblocking(False)
    to_client = bytes(range(256)) * 16_000  # 4 MB: far more than the queues hold
    sent = 0
    while True:  # fill the client's receive queue and our send queue
        try:
            sent += server.send(to_client[sent:])
        except BlockingIOError:
            break

    new, rec = move(pair, server)
    assert len(rec.inq) == len(to_server)
    assert len(rec.outq) > 0 and rec.unsent_len > 0

    assert recv_exactly(client, sent) == to_client[:sent]
    assert recv_exactly(new, len(to_server)) == to_server
    client.sendall(b"ping")
    assert recv_exactly(new, 4) == b"ping"
    new.sendall(b"pong")
    assert recv_exactly(client, 4) == b"pong"
    assert tcp_info(client).state_name == "ESTABLISHED"
    new.close()
    client.close()


def test_large_stream_checksum_across_two_moves(pair: Pair) -> None:
    ls, client, server = connect(pair)
    ls.close()
    payload = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(4 << 20))  # 4 MB
    client.settimeout(30)
    writer = threading.Thread(target=client.sendall, args=(payload,))
    writer.start()  # the client keeps writing through both moves
    got = recv_exactly(server, 1 << 20)
    server, _ = move(pair, server)  # mid-stream: old -> new
    got += recv_exactly(server, (5 << 19) - len(got))
    back = Pair(pair.switch, pair.client, old=pair.new, new=pair.old)
    server, _ = move(back, server)  # and back: new -> old
    got += recv_exactly(server, len(payload) - len(got))
    writer.join()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    server.close()
    client.close()


def test_half_closed_connection_is_refused_and_left_working(pair: Pair) -> None:
    ls, client, server = connect(pair)
    ls.close()
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(server, 10) == b"last words"
    assert server.recv(10) == b""  # the FIN: server side is CLOSE_WAIT now
    with pytest.raises(NotMovable, match="CLOSE_WAIT"):
        tcprepair.dump(server)
    server.sendall(b"still here")  # not corrupted: it still works where it was
    assert recv_exactly(client, 10) == b"still here"
    server.close()
    client.close()


def test_release_in_repair_mode_sends_nothing(pair: Pair) -> None:
    ls, client, server = connect(pair)
    ls.close()
    tcprepair.dump(server)
    tcprepair.release(server)  # link still up: a FIN or RST would reach the client
    readable, _, _ = select.select([client], [], [], 0.5)
    assert not readable, "the client saw a FIN or RST from a socket released in repair mode"
    assert tcp_info(client).state_name == "ESTABLISHED"
    client.close()


def test_bytes_lost_in_the_blackout_go_again_at_once(pair: Pair) -> None:
    """A few bytes the old socket sent into the blackout (lost on the wire: its switch
    port is down) are handed back and sent again as new data once the new socket is
    live, not left to its first retransmission timeout (1 s: a restored socket has no
    RTT sample). The client has them and the new socket retransmitted nothing."""
    ls, client, server = connect(pair)
    ls.close()
    client.sendall(b"k")
    assert recv_exactly(server, 1) == b"k"
    pair.link(pair.old, False)
    server.sendall(b"echo")  # on the wire, and lost there
    server.setblocking(False)  # as Domain R's are (a timeout would poll before a peek)
    rec = tcprepair.dump(server)
    assert (rec.outq, rec.unsent_len) == (b"echo", 0)  # sent, never acknowledged
    with netns.entered(pair.new):
        restored = tcprepair.restore(rec)
    tcprepair.release(server)
    pair.link(pair.new, True)
    tcprepair.leave_repair(restored.sock)
    assert restored.resend == b"echo"
    restored.sock.sendall(restored.resend)
    assert recv_exactly(client, 4) == b"echo"
    client.sendall(b"more")
    restored.sock.settimeout(5)
    assert recv_exactly(restored.sock, 4) == b"more"
    assert tcp_info(restored.sock).total_retrans == 0
    restored.sock.close()
    client.close()
