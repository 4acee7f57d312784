"""Announce an IP/MAC from a new port with gratuitous ARP (scapy), off the event loop.

Schedule. QEMU's announce-self sends 5 rounds at 0, 50, 200, 450 and 800 ms. Ours is
0, 20, 100 and 300 ms: the first frame is what moves the switch's forwarding entry
(tests/arp shows the MAC on the new port right after it), so it goes out at once;
the repeats only cover a lost frame, and they must land before the client's first
TCP retransmission timeout (200 ms minimum on Linux) plus one backoff, because a
client whose frames still go to the old port is what turns a short pause into
several RTOs. Past a few hundred milliseconds Domain R's own traffic (the window
probe at restore, echoes) keeps the entry fresh anyway.

Frame: an ARP request with sender = target = Domain R's IP, from its MAC to
broadcast (the form `arping -U` and Linux use), so every bridge on the path learns
the MAC on the port it arrived from and every neighbour refreshes its cache.

scapy builds the frame once; a plain AF_PACKET socket bound to the interface sends
it. The socket belongs to the network namespace of the thread that creates the
Announcer, so create it there, before it is needed: importing scapy takes far longer
than the pause we allow.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence

from keeper.errors import KernelError

DEFAULT_SCHEDULE_MS: tuple[int, ...] = (0, 20, 100, 300)
DEFAULT_SCHEDULE = ",".join(map(str, DEFAULT_SCHEDULE_MS))  # as the APIs and CLI spell it


class Announcer:
    def __init__(self, iface: str, ip: str, mac: str) -> None:
        from scapy.layers.l2 import ARP, Ether  # heavy import: at setup, not at resume

        self.iface, self.ip, self.mac = iface, ip, mac
        self._frame = bytes(
            Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip)
        )
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            self._sock.bind((iface, 0))
        except OSError as exc:
            self._sock.close()
            raise KernelError.wrap(f"bind packet socket to {iface}", exc) from exc
        self._lock = threading.Lock()
        self.sent = 0

    def send_once(self) -> None:
        with self._lock:
            self._sock.send(self._frame)
            self.sent += 1

    async def announce(self, schedule_ms: Sequence[int] = DEFAULT_SCHEDULE_MS) -> None:
        """Send on the schedule; the loop keeps time, a worker thread does the sending."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for offset in schedule_ms:
            delay = start + offset / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.to_thread(self.send_once)

    def close(self) -> None:
        with self._lock:
            self._sock.close()


def parse_schedule(text: str) -> tuple[int, ...]:
    try:
        offsets = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"announce schedule {text!r}: comma-separated milliseconds") from None
    if not offsets or list(offsets) != sorted(offsets) or offsets[0] < 0:
        raise ValueError(f"announce schedule {text!r}: at least one offset, ascending, >= 0")
    return offsets
