"""Random packet loss on the lab's wire, in both directions, between the client and
everything it talks to (nftables in the switch namespace, over pyroute2's netlink).

This kernel has no netem, so loss is an nftables rule on the switch's bridge: a
`bridge` family table whose forward chain drops a random share of the frames that
enter or leave the client's switch port. In nft's own words the two rules are

    table bridge <name> { chain fwd { type filter hook forward priority 0;
        iifname "p-client" numgen random mod 100 < N counter drop
        oifname "p-client" numgen random mod 100 < N counter drop } }

Frames between the host agents (the migration stream) and gratuitous ARPs to the
other host are not touched: only the client's path. The counters say how many frames
each direction lost. Everything lives in the lab's switch namespace; `remove` (and
the context manager) deletes the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nftsocket import NFPROTO_BRIDGE, Cmp, Meta, Regs
from pyroute2.nftables.main import NFTables

from keeper.errors import KernelError
from keeper.net import netns

TABLE = "keeper_wireloss"
CHAIN = "fwd"
CLIENT_PORT = "p-client"  # the client's port on the lab switch (topology.build_network)
IFNAMSIZ = 16
_NF_DROP = 0
_NFT_NG_RANDOM = 1
_NFT_BYTEORDER_HTON = 1
DIRECTIONS = {"to_client": Meta.NFT_META_OIFNAME, "from_client": Meta.NFT_META_IIFNAME}


def _expr(name: str, *attrs: tuple[str, Any]) -> list[dict[str, Any]]:
    # pyroute2's genex() derives attribute names from the expression's name, which
    # is wrong for numgen (NFTA_NG_*): spell the attributes out
    return [{"attrs": [("NFTA_EXPR_NAME", name),
                       ("NFTA_EXPR_DATA", {"attrs": list(attrs)})]}]


def _value(data: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", data)]}


def rule(direction: str, percent: int) -> list[list[dict[str, Any]]]:
    """The expressions of one rule: `<i|o>ifname "p-client" numgen random mod 100 < N
    counter drop`. numgen leaves a host-order u32 and cmp compares bytes, so the
    number is turned big-endian first (what nft itself emits for `<`)."""
    if not 0 <= percent <= 100:
        raise ValueError(f"loss {percent} %: a whole number from 0 to 100")
    port = CLIENT_PORT.encode().ljust(IFNAMSIZ, b"\0")
    return [
        _expr("meta", ("NFTA_META_DREG", Regs.NFT_REG_1),
              ("NFTA_META_KEY", DIRECTIONS[direction])),
        _expr("cmp", ("NFTA_CMP_SREG", Regs.NFT_REG_1), ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
              ("NFTA_CMP_DATA", _value(port))),
        _expr("numgen", ("NFTA_NG_DREG", Regs.NFT_REG_1), ("NFTA_NG_MODULUS", 100),
              ("NFTA_NG_TYPE", _NFT_NG_RANDOM), ("NFTA_NG_OFFSET", 0)),
        _expr("byteorder", ("NFTA_BYTEORDER_SREG", Regs.NFT_REG_1),
              ("NFTA_BYTEORDER_DREG", Regs.NFT_REG_1),
              ("NFTA_BYTEORDER_OP", _NFT_BYTEORDER_HTON), ("NFTA_BYTEORDER_LEN", 4),
              ("NFTA_BYTEORDER_SIZE", 4)),
        _expr("cmp", ("NFTA_CMP_SREG", Regs.NFT_REG_1), ("NFTA_CMP_OP", Cmp.NFT_CMP_LT),
              ("NFTA_CMP_DATA", _value(struct.pack(">I", percent)))),
        _expr("counter", ("NFTA_COUNTER_BYTES", 0), ("NFTA_COUNTER_PACKETS", 0)),
        _expr("immediate", ("NFTA_IMMEDIATE_DREG", Regs.NFT_REG_VERDICT),
              ("NFTA_IMMEDIATE_DATA", {"attrs": [("NFTA_DATA_VERDICT", {"attrs": [
                  ("NFTA_VERDICT_CODE", _NF_DROP)]})]})),
    ]


def _socket(ns: str) -> NFTables:
    with netns.entered(ns):  # a netlink socket stays in the namespace it was made in
        return NFTables(nfgen_family=NFPROTO_BRIDGE)


def install(ns: str, percent: int, table: str = TABLE) -> None:
    """Drop `percent` % of the client's frames, each way, in switch namespace `ns`.
    Replaces an earlier table of the same name."""
    remove(ns, table)
    rules = {d: rule(d, percent) for d in DIRECTIONS}
    nft = _socket(ns)
    try:
        nft.table("add", name=table)
        nft.chain("add", table=table, name=CHAIN, hook="forward", type="filter",
                  priority=0)
        for expressions in rules.values():
            nft.rule("add", table=table, chain=CHAIN, expressions=expressions)
    except NetlinkError as exc:
        raise KernelError(f"nftables loss rule in {ns}", exc.code) from exc
    finally:
        nft.close()


def remove(ns: str, table: str = TABLE) -> None:
    """Delete the loss table (idempotent)."""
    if not netns.exists(ns):
        return
    nft = _socket(ns)
    try:
        nft.table("del", name=table)
    except NetlinkError as exc:
        if exc.code != 2:  # ENOENT: nothing to remove
            raise KernelError(f"remove nftables table {table} in {ns}", exc.code) from exc
    finally:
        nft.close()


def dropped(ns: str, table: str = TABLE) -> dict[str, int]:
    """Frames the rules dropped so far, per direction ("to_client", "from_client")."""
    nft = _socket(ns)
    try:
        rules = nft.get_rules()
    finally:
        nft.close()
    keys = {v.name: k for k, v in DIRECTIONS.items()}
    out = dict.fromkeys(DIRECTIONS, 0)
    for r in rules:
        if r.get_attr("NFTA_RULE_TABLE") != table:
            continue
        direction, packets = None, 0
        for e in r.get_attr("NFTA_RULE_EXPRESSIONS") or []:
            data = e.get_attr("NFTA_EXPR_DATA")
            name = e.get_attr("NFTA_EXPR_NAME")
            if name == "meta" and direction is None:
                direction = keys.get(data.get_attr("NFTA_META_KEY"))
            elif name == "counter":
                packets = int(data.get_attr("NFTA_COUNTER_PACKETS") or 0)
        if direction is not None:
            out[direction] += packets
    return out


@contextlib.asynccontextmanager
async def loss(ns: str, percent: int, table: str = TABLE) -> AsyncIterator[None]:
    """`percent` % loss on the client's path while the block runs; removed after."""
    await asyncio.to_thread(install, ns, percent, table)
    try:
        yield
    finally:
        await asyncio.to_thread(remove, ns, table)
