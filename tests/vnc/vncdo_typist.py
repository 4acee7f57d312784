"""Run by tests/vnc/test_vnc_lab.py inside the lab's client namespace: vncdotool (a
real third-party VNC client) types TEXT (every PERIOD seconds, or as fast as it can
with 0), then saves the screen it received. The screen request queues behind the
keys, so with a slow guest the capture waits for all of them (TIMEOUT)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vncdotool import api


def main(addr: str, text: str, out: str, period: float, timeout: float = 20,
         gate: str = "") -> int:
    """With `gate`, the screen is captured once that file exists (the caller says the
    guest has taken every key), on the same connection."""
    client = api.connect(addr, timeout=timeout)
    try:
        client.refreshScreen()
        for ch in text:
            client.keyPress("enter" if ch == "\r" else ch)
            if period:
                time.sleep(period)
        time.sleep(1.0)
        deadline = time.monotonic() + timeout
        while gate and not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        client.refreshScreen()
        client.captureScreen(out)
    finally:
        client.disconnect()
        api.shutdown()
    print("typed", len(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(float, sys.argv[4:6]),
                  *sys.argv[6:7]))
