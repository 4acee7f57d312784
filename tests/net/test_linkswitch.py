"""LinkSwitch: a namespace's links set up and down over one netlink socket kept open,
as an agent does at every stop and resume (root)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from keeper.errors import KernelError
from keeper.net import netns
from tests.conftest import unique

pytestmark = pytest.mark.root


async def test_up_down_and_a_link_made_anew(namespaces: list[str]) -> None:
    a, b = unique("kls"), unique("klp")
    namespaces.extend([a, b])
    # pyroute2's sync calls run a loop of their own: not on this test's loop
    await asyncio.to_thread(netns.ensure, a)
    await asyncio.to_thread(netns.ensure, b)
    await asyncio.to_thread(netns.ensure_veth, a, "port0", b, "eth0")
    await asyncio.to_thread(netns.set_up, b, "eth0")

    async def is_up() -> bool:
        return await asyncio.to_thread(netns.is_up, a, "port0")

    switch = netns.LinkSwitch(a)
    try:
        for up in (True, False, True):
            await switch.set("port0", up)
            assert await is_up() is up
        old = await asyncio.to_thread(netns.link_index, a, "port0")
        # the link goes and comes back under the same name, with another index
        await asyncio.to_thread(netns.delete_link, a, "port0")
        await asyncio.to_thread(netns.ensure_veth, a, "port0", b, "eth1")
        await asyncio.to_thread(netns.set_up, b, "eth1")
        assert await asyncio.to_thread(netns.link_index, a, "port0") != old
        await switch.set("port0", True)
        assert await is_up()
        await switch.set("port0", False)
        assert not await is_up()
        with pytest.raises(KernelError) as caught:
            await switch.set("no-such-port", True)
        assert caught.value.errno == errno.ENODEV
        await switch.set("port0", True)  # a failed call leaves the switch working
        assert await is_up()
        # up with the far end named: returns once that end is operationally up
        await switch.set("port0", False)
        assert await switch.set("port0", True, peer=(b, "eth1")) is True

        def far_state() -> str:
            with netns.ipr(b) as ip:
                (link,) = ip.get_links(ip.link_lookup(ifname="eth1")[0])
                return str(link.get_attr("IFLA_OPERSTATE"))

        assert await asyncio.to_thread(far_state) == "UP"
        assert await switch.set("port0", True, peer=(b, "no-such-end")) is False
    finally:
        switch.close()
        switch.close()  # idempotent
