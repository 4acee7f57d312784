"""A Domain R process keeps two kernel and interpreter costs out of a move's pause:
the descriptor table's growth and the cyclic garbage collector."""

from __future__ import annotations

import gc
import resource
import subprocess
import sys

import pytest

from keeper import collector
from keeper.domr.main import FD_TABLE


def fd_table_size(code: str) -> int:
    """FDSize (the descriptor table's slots) of a fresh Python that ran `code`."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nprint(open('/proc/self/status').read())"],
        check=True, capture_output=True, text=True).stdout
    (line,) = [x for x in out.splitlines() if x.startswith("FDSize:")]
    return int(line.split()[1])


def test_the_descriptor_table_is_grown_up_front() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(soft, FD_TABLE)
    before = fd_table_size("pass")
    after = fd_table_size("from keeper.domr.main import grow_fd_table; grow_fd_table()")
    assert before < want <= after
    # and no descriptor is left behind: the next one opened is a low one
    assert fd_table_size("from keeper.domr.main import grow_fd_table; grow_fd_table()\n"
                         "import os; assert os.open(os.devnull, os.O_RDONLY) < 10") >= want


def test_collector_paused_restores_the_collector_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.collector_paused():
        assert not gc.isenabled()
        with collector.collector_paused():  # nested: the inner one leaves it off
            pass
        assert not gc.isenabled()
        raise RuntimeError("a failed dump")
    assert gc.isenabled()


def test_collector_paused_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with collector.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freeze_moves_what_is_alive_out_of_every_collection() -> None:
    code = ("import gc; from keeper import collector; collector.freeze(); "
            "n = gc.get_freeze_count(); collector.freeze(); "
            "assert n > 1000 and gc.get_freeze_count() >= n; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "ok"
