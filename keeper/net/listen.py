"""Listening sockets of Domain R's services (console, SSH, VNC)."""

from __future__ import annotations

import socket


def listener(ip: str, port: int, backlog: int = 128) -> socket.socket:
    """A non-blocking listening TCP socket on ip:port (address reuse on: a restarted
    service must not wait for TIME_WAIT, and restored sockets share the port)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((ip, port))
        ls.listen(backlog)
        ls.setblocking(False)
    except BaseException:
        ls.close()
        raise
    return ls
