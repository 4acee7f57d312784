"""Client TCP retransmissions toward one address, counted on the wire of a host.

A migration costs clients retransmissions: what they send while Domain R is stopped
is lost on the wire and resent by their TCP. Domain R's sockets cannot count that
(a retransmission that arrives is, to the receiver, just the data); the host can, by
watching the client's segments as they enter its bridge — the passive rule
Wireshark's `tcp.analysis.retransmission` applies:

  per flow, `high` is the sequence number just after the highest byte the client is
  known to have sent: the end of its data segments, and the sequence number of its
  pure ACKs (which carry SND.NXT, RFC 793). A data segment that starts below `high`
  is a retransmission.

The source host watches from before Domain R stops until it runs on the target (every
client segment of the pause comes to the source: the switch learns the new port only
from the target's gratuitous ARP); the target records from its link up for a short
window and judges what it recorded seeded with the source's `high` per flow (without
the seed, a retransmission that arrives before the client's first pure ACK — the
answer to Domain R's window probe — would pass for new data).

`RetransmitCounter` is the rule (sans-I/O: segments in, counts out, plain data);
`WireTap` is an AF_PACKET socket on every interface of the calling thread's network
namespace, incoming frames only, with a classic BPF filter (IPv4, TCP, destination
address) so the kernel copies nothing else (the migration stream shares the wire).
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from keeper.errors import KernelError

SEQ_MOD = 1 << 32
TH_FIN, TH_SYN, TH_RST = 0x01, 0x02, 0x04


def seq_before(a: int, b: int) -> bool:
    """a < b in TCP sequence space (RFC 1982 serial arithmetic)."""
    return 0 < (b - a) % SEQ_MOD < SEQ_MOD // 2


@dataclass(slots=True)
class Flow:
    high: int | None = None  # just after the highest sequence number known sent
    segments: int = 0  # data segments seen
    retransmits: int = 0
    first_retransmit: float | None = None  # monotonic time of the first one seen


@dataclass(slots=True)
class RetransmitCounter:
    """Judges a client's segments, in the order they arrived on the wire."""

    flows: dict[str, Flow] = field(default_factory=dict)  # "ip:port" -> flow

    def segment(self, src: str, sport: int, seq: int, length: int, flags: int,
                at: float) -> bool:
        """One segment from a client; True if it is a retransmission."""
        if flags & (TH_SYN | TH_RST):
            return False  # a new or reset connection: not data of a known flow
        flow = self.flows.setdefault(f"{src}:{sport}", Flow())
        if length == 0:
            if flow.high is None or seq_before(flow.high, seq):
                flow.high = seq
            return False
        flow.segments += 1
        again = flow.high is not None and seq_before(seq, flow.high)
        end = (seq + length + (1 if flags & TH_FIN else 0)) % SEQ_MOD
        if flow.high is None or seq_before(flow.high, end):
            flow.high = end
        if again:
            flow.retransmits += 1
            if flow.first_retransmit is None:
                flow.first_retransmit = at
        return again

    def seed(self, highs: dict[str, int]) -> None:
        """What another vantage point saw first: per flow, the `high` it ended with."""
        for key, high in highs.items():
            flow = self.flows.setdefault(key, Flow())
            if flow.high is None or seq_before(flow.high, high % SEQ_MOD):
                flow.high = high % SEQ_MOD

    def highs(self) -> dict[str, int]:
        return {k: f.high for k, f in self.flows.items() if f.high is not None}

    @property
    def retransmits(self) -> int:
        return sum(f.retransmits for f in self.flows.values())

    def first_retransmit(self) -> float | None:
        times = [f.first_retransmit for f in self.flows.values()
                 if f.first_retransmit is not None]
        return min(times) if times else None


# -- the socket -------------------------------------------------------------------------

SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20: a frame leaving a bridge port is not seen twice
SO_ATTACH_FILTER = 26
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
MAX_LOG = 200_000  # segments recorded at most (a window of a few seconds)
SNAPLEN = 160  # Ethernet + IP + TCP headers with options; the payload is not needed
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBB")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def bpf_program(dst: str) -> list[tuple[int, int, int, int]]:
    """IPv4, TCP, to `dst`, not a fragment's tail: keep SNAPLEN bytes; else nothing."""
    ip = int(ipaddress.IPv4Address(dst))
    ld_h, ld_w, ld_b, jeq, jset, ret = 0x28, 0x20, 0x30, 0x15, 0x45, 0x06
    return [
        (ld_h, 0, 0, 12), (jeq, 0, 7, ETH_P_IP),  # ethertype
        (ld_b, 0, 0, 23), (jeq, 0, 5, socket.IPPROTO_TCP),  # protocol
        (ld_w, 0, 0, 30), (jeq, 0, 3, ip),  # destination address
        (ld_h, 0, 0, 20), (jset, 1, 0, 0x1FFF),  # fragment offset 0
        (ret, 0, 0, SNAPLEN),
        (ret, 0, 0, 0),
    ]


class _SockaddrLl(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint16), ("protocol", ctypes.c_uint16),
                ("ifindex", ctypes.c_int), ("hatype", ctypes.c_uint16),
                ("pkttype", ctypes.c_uint8), ("halen", ctypes.c_uint8),
                ("addr", ctypes.c_uint8 * 8)]


_libc = ctypes.CDLL(None, use_errno=True)


def _bind_all(sock: socket.socket, proto: int) -> None:
    """bind(2) to ifindex 0, every interface (Python's bind wants an interface name)."""
    addr = _SockaddrLl(family=socket.AF_PACKET, protocol=socket.htons(proto), ifindex=0)
    if _libc.bind(sock.fileno(), ctypes.byref(addr), ctypes.sizeof(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parse(frame: bytes) -> tuple[str, int, int, int, int] | None:
    """(source IP, source port, seq, payload length, flags) of an Ethernet/IPv4/TCP
    frame, or None if it is not one (or too short)."""
    if len(frame) < 14 + 20:
        return None
    vihl, _, total, _, _, _, proto, _, src, _ = _IP.unpack_from(frame, 14)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or proto != socket.IPPROTO_TCP or ihl < 20 or len(frame) < 14 + ihl + 14:
        return None
    sport, _, seq, _, off, flags = _TCP.unpack_from(frame, 14 + ihl)
    length = total - ihl - (off >> 4) * 4
    if length < 0:
        return None
    return socket.inet_ntoa(src), sport, seq, length, flags


class WireTap:
    """Counts client retransmissions toward `dst` seen by this namespace's interfaces.
    Open it in the namespace to watch (a socket stays in the namespace it was made in);
    `close()` is idempotent."""

    def __init__(self, dst: str, *, record: bool = False) -> None:
        self.dst = dst
        self.counter = RetransmitCounter()
        # with `record`: every segment, to be judged again later (`replay`)
        self.log: list[tuple[str, int, int, int, int, float]] | None = [] if record else None
        self.opened = time.monotonic()
        prog = bpf_program(dst)
        insns = (_SockFilter * len(prog))(*(_SockFilter(*i) for i in prog))
        fprog = _SockFprog(len(prog), insns)
        try:
            # protocol 0: nothing is received until the filter is on and we bind
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise KernelError.wrap("open packet socket", exc) from exc
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                                 bytes(ctypes.string_at(ctypes.addressof(fprog),
                                                        ctypes.sizeof(fprog))))
            self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            # ETH_P_ALL: a bridge port's frames reach only the taps for every protocol
            # (the bridge consumes them before protocol handlers); the filter keeps IPv4
            _bind_all(self.sock, ETH_P_ALL)
            self.sock.setblocking(False)
        except OSError as exc:
            self.sock.close()
            raise KernelError.wrap(f"packet socket for {dst}", exc) from exc
        self._keep = insns  # the kernel copied the program; keep ours alive until then
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Read as frames come, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self.drain)

    def drain(self) -> None:
        """Judge every frame queued on the socket now."""
        now = time.monotonic()
        while True:
            try:
                frame = self.sock.recv(SNAPLEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            seg = parse(frame)
            if seg is not None:
                self.counter.segment(*seg, at=now)
                if self.log is not None and len(self.log) < MAX_LOG:
                    self.log.append((*seg, now))

    def replay(self, highs: dict[str, int]) -> RetransmitCounter:
        """The recorded segments judged again, seeded with `highs`."""
        counter = RetransmitCounter()
        counter.seed(highs)
        for src, sport, seq, length, flags, at in self.log or ():
            counter.segment(src, sport, seq, length, flags, at=at)
        return counter

    def close(self) -> RetransmitCounter:
        if self.sock.fileno() >= 0:
            self.drain()
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        return self.counter
