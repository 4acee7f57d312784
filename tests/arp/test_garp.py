"""The first gratuitous ARP moves Domain R's MAC to the new port in the switch (root)."""

from __future__ import annotations

import asyncio

import pytest

from keeper.arp import Announcer
from keeper.lab.topology import LabSpec
from keeper.net import netns, placement

DOM, IP, MAC = "r1", "198.18.0.101", "02:6b:70:00:00:01"


def announcer_in(ns: str) -> Announcer:
    with netns.entered(ns):
        return Announcer("eth0", IP, MAC)


@pytest.mark.root
def test_first_announcement_moves_the_mac(network: LabSpec) -> None:
    spec = network
    old = placement.place(spec.place_on("a"), DOM, IP, MAC, link_up=True)
    new = placement.place(spec.place_on("b"), DOM, IP, MAC, link_up=False)
    a, b = announcer_in(old), announcer_in(new)
    try:
        a.send_once()
        assert netns.fdb(spec.switch_ns, "sw0")[MAC] == "p-a"

        placement.set_link(spec.place_on("a"), DOM, False)
        placement.set_link(spec.place_on("b"), DOM, True)
        # Host A's bridge forgot the port that went down; the switch did not: its
        # uplink to host A is still up, so frames for the MAC still go there.
        assert netns.fdb(spec.switch_ns, "sw0")[MAC] == "p-a"

        b.send_once()
        assert netns.fdb(spec.switch_ns, "sw0")[MAC] == "p-b"
        assert netns.fdb(spec.host("a").ns, "br0")[MAC] == "up0"
        assert netns.fdb(spec.host("b").ns, "br0")[MAC] == placement.host_port(DOM)
    finally:
        a.close()
        b.close()


@pytest.mark.root
async def test_schedule_sends_every_round(network: LabSpec) -> None:
    ns = await asyncio.to_thread(placement.place, network.place_on("a"), DOM, IP, MAC, link_up=True)
    a = announcer_in(ns)
    try:
        await a.announce((0, 10, 30))
        assert a.sent == 3
    finally:
        a.close()


def test_schedule_parsing() -> None:
    from keeper.arp.garp import parse_schedule

    assert parse_schedule("0,20,100,300") == (0, 20, 100, 300)
    for bad in ("", "a,b", "100,20", "-5"):
        with pytest.raises(ValueError, match="announce schedule"):
            parse_schedule(bad)
