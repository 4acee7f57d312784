"""What the benches share: labs that clean up after themselves, output files, plots."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from keeper.lab import ops, topology
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Link

# bench/report.py points every bench it runs at one directory through the environment
OUT = Path(os.environ.get("KEEPER_BENCH_OUT") or Path(__file__).parent / "out")


def need_root(name: str) -> None:
    if os.geteuid() != 0:
        print(f"{name} needs root (it builds its own lab in network namespaces)",
              file=sys.stderr)
        raise SystemExit(2)


@contextlib.asynccontextmanager
async def lab(prefix: str) -> AsyncIterator[LabSpec]:
    """A fresh lab with a unique name, removed afterwards whatever happens."""
    name = f"{prefix}{secrets.token_hex(3)}"
    try:
        yield await ops.up(name)
    finally:
        topology.down(name)


async def quiet(link: Link, for_s: float = 0.7, limit_s: float = 10.0) -> bytes:
    """Read a console until it has said nothing for `for_s` s (at most `limit_s`);
    returns what it said. A reconnecting client of a QEMU guest's console first gets
    what the guest still echoes of the previous connection's keys."""
    said = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(link.recv(), for_s)
        except TimeoutError:
            break
        if not data:
            raise ConnectionError("the console closed the connection")
        said += data
    return said


def machine() -> dict[str, Any]:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine()}


def save(name: str, doc: dict[str, Any], out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": machine(), **doc}, indent=1))
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig: Any, json_path: Path) -> None:
    """Save the plot beside the raw samples and say where both are."""
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=110)
    print(f"\nraw samples: {json_path}, plot: {json_path.with_suffix('.png')}")


async def interruptible(coro: Any) -> Any:
    """Run `coro`; SIGTERM or SIGINT cancels it, so what it runs cleans up (its lab)."""
    import signal

    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await task
