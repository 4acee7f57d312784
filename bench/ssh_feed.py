#!/usr/bin/env python3
"""Domain R's SSH path alone, in a process of its own (bench/throughput.py starts it).

keeper's SSH service (keeper.ssh.host: asyncssh, our console sessions, the same
algorithms) on uvloop, as a Domain R runs it, bound in a lab host's namespace and fed
the way Domain R's console device feeds it: a broadcast whenever every session may
take output, more when one drained, from data made beforehand (the guest's `seq`
output, CR LF), so the source is never the limit. Its own process because Domain R
is one: in the bench's process, the server would share one thread with the bench's
reading of the client's terminal.

Protocol on stdio: prints `bound` once it listens, `ready` once a session is logged
in; on a line `go` it feeds `seq 1 LAST`'s output (`--last`) and then FEED_END; it
exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

FEED_END = b"\r\n-- end of feed --\r\n"
CHUNK = 16384  # what the console device hands out at once, at most


def seq_output(last: int) -> bytes:
    return b"".join(b"%d\r\n" % i for i in range(1, last + 1))


async def serve(args: argparse.Namespace) -> int:
    from keeper.net import netns
    from keeper.ssh.host import SshConfig, SshHost

    data = seq_output(args.last) + FEED_END
    cfg = SshConfig(host_key=Path(args.host_key).read_text(),
                    authorized_keys=Path(args.authorized_keys).read_text())
    drained = asyncio.Event()
    ssh = SshHost(cfg, args.ip, on_input=lambda session: None, on_drained=drained.set,
                  port=args.port)
    with netns.entered(args.netns):
        ssh.bind()
    ssh.start()
    print("bound", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while not ssh.sessions:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the login settles
        print("ready", flush=True)
        if (await stdin.readline()).strip() != b"go":
            return 1
        for at in range(0, len(data), CHUNK):
            while not ssh.may_output():
                drained.clear()
                await drained.wait()
            ssh.broadcast(data[at:at + CHUNK])
            await asyncio.sleep(0)
        await stdin.read()  # until the bench closes it
    finally:
        await ssh.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--netns", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--authorized-keys", required=True)
    p.add_argument("--last", type=int, required=True, help="feed `seq 1 LAST`'s output")
    args = p.parse_args()
    import uvloop

    return uvloop.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
