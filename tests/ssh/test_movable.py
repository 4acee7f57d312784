"""Live SSH sessions move to another process on the same TCP connection, and the real
OpenSSH client never notices (no root: loopback, the socket handed over as an fd).

The client is /usr/bin/ssh in a pty, checked byte for byte; the servers are session
host processes (tests.ssh.helpers) or, for the in-place cases, this test's own loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from keeper import serial
from keeper.errors import NotMovable
from keeper.ssh import movable
from tests.ssh.helpers import (
    STATE_KIND,
    EchoServer,
    EchoShellSession,
    HostProc,
    Keys,
    ShellSessionState,
    SplitProxy,
    SshClient,
    bad_lines,
    flood_bytes,
    make_keys,
    restore_session,
    server_kw,
)

CIPHERS = ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"]
FLOOD = 8 * 1024 * 1024
PROMPT = b"\r\n$ "


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


@pytest.fixture
def owned() -> Iterator[list[Any]]:
    """Everything a test starts (ssh clients, host processes); all closed afterwards."""
    made: list[Any] = []
    try:
        yield made
    finally:
        for thing in reversed(made):
            thing.close()


def run(ssh: SshClient, line: str, timeout: float = 15.0) -> str:
    """Type a line and Enter; return what came back up to the next prompt."""
    ssh.send(line.encode() + b"\r")
    return ssh.expect(PROMPT, timeout).decode(errors="replace")


def info(ssh: SshClient) -> dict[str, str]:
    out = run(ssh, "info")
    return dict(re.findall(r"(\w+)=(\S+)", out.split("INFO", 1)[1]))


def newkeys(ssh: SshClient) -> int:
    return ssh.stderr().count("SSH2_MSG_NEWKEYS received")


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def move(src: HostProc, tmp: Path, owned: list[Any], name: str,
         before_release: Any = None) -> tuple[HostProc, dict[str, Any]]:
    """quiesce+export in `src`, exec a new host with the socket (pass_fds) and the
    state, adopt there, then release the old one. Hosts alternate between asyncio's
    loop and uvloop (which Domain R runs)."""
    config = {**src.config, "uvloop": not src.config.get("uvloop")}
    stats, blob, fds = src.call("export", timeout=10)
    (fd,) = fds
    (chan,) = serial.loads(STATE_KIND, blob, movable.SshSessionState).channels
    stats["app"] = dataclasses.asdict(serial.from_plain(ShellSessionState,
                                                           chan.app["shell"]))
    try:
        dst = HostProc(tmp, config, pass_fds=(fd,), name=name)
        owned.append(dst)
        stats.update(dst.call("adopt", blob, fd=fd)[0])
    finally:
        os.close(fd)  # the new host has its own; ours must not keep the session open
    if before_release is not None:
        before_release()
    src.call("release")
    src.close()
    return dst, stats


@pytest.mark.parametrize("cipher", CIPHERS)
def test_session_moves_between_processes(cipher: str, keys: Keys, tmp_path: Path,
                                         owned: list[Any]) -> None:
    # Keepalives both ways every second, and server-initiated rekeys every 2 MiB so
    # that moves during the flood meet key exchanges in flight.
    config = {"host_key": keys.host_key, "authorized_keys": keys.authorized_keys,
              "keepalive": 1, "rekey_bytes": 2 * 1024 * 1024}
    host = HostProc(tmp_path, config, name="h0")
    owned.append(host)
    port = host.call("listen")[0]["port"]
    ssh = SshClient(keys, port, cipher, tmp_path)
    owned.append(ssh)
    ssh.expect(b"READY" + PROMPT)
    host.call("wait_session")
    first = info(ssh)
    assert first == {"pid": str(host.proc.pid), "term": "vt220", "size": "100x30",
                     "env": "moved-env"}
    ssh.send(b"half-")  # in the application's line buffer across the first move
    ssh.expect(b"half-")
    moves = []

    # Several moves in a row, typing after each; window-change; idle keepalives; at
    # the third, ssh is stopped so our keepalive request is unanswered at the move and
    # its reply reaches the new process.
    for hop in range(1, 4):
        resume = None
        if hop == 3:
            os.kill(ssh.proc.pid, signal.SIGSTOP)
            time.sleep(1.5)

            def resume() -> None:
                os.kill(ssh.proc.pid, signal.SIGCONT)
        host, stats = move(host, tmp_path, owned, f"h{hop}", before_release=resume)
        moves.append(stats)
        if hop == 1:
            assert "[half-typed]" in run(ssh, "typed")
        if hop == 3:
            assert stats["pending_keepalives"] >= 1
        assert f"[typed at hop {hop}]" in run(ssh, f"typed at hop {hop}")
        now = info(ssh)
        assert now["pid"] == str(host.proc.pid) != first["pid"]
        assert now["env"] == "moved-env" and now["term"] == "vt220"
        assert host.call("info")[0]["loop"].startswith("uvloop" if hop % 2 else "asyncio")
        if hop == 2:
            ssh.set_size(132, 43)
            wait_for(lambda: info(ssh)["size"] == "132x43", 10, "window change")
            time.sleep(2.5)  # idle: keepalives from both sides, answered by this host
    assert info(ssh)["size"] == "132x43"

    # An 8 MiB flood crossing two moves arrives intact. ssh is held still for a moment
    # before each export, so our output backs up in every buffer, and from the
    # adoption until the next move, so the flood cannot run to its end meanwhile.
    ssh.send(f"flood {FLOOD}\r".encode())
    ssh.expect(b"FLOOD-BEGIN\r\n")
    wait_for(lambda: ssh.received() >= 1024 * 1024, 30, "flood output")
    for hop in (4, 5):
        ssh.hold(0.3)
        host, stats = move(host, tmp_path, owned, f"h{hop}", before_release=lambda: ssh.hold(30))
        moves.append(stats)
        assert 0 < stats["app"]["flood_sent"] < FLOOD, "the flood did not cross the move"
    ssh.hold(0)
    out = ssh.expect(b"FLOOD-END" + PROMPT, 60)
    data = out[:-len(b"FLOOD-END" + PROMPT)]
    assert len(data) == FLOOD and data == flood_bytes(0, FLOOD)

    # A client-initiated rekey after the moves, then one more move with the new keys.
    before, key_before = newkeys(ssh), host.call("info")[0]["recv_key"]
    ssh.send(b"\r~R")
    ssh.expect(PROMPT)
    wait_for(lambda: newkeys(ssh) > before, 15, "rekey after ~R")
    assert "[after rekey]" in run(ssh, "after rekey")
    assert host.call("info")[0]["recv_key"] != key_before
    host, stats = move(host, tmp_path, owned, "h6")
    moves.append(stats)
    assert "[after the last move]" in run(ssh, "after the last move")

    ssh.send(b"exit\r")
    assert ssh.wait(15) == 0
    host.call("wait_closed")
    assert bad_lines(ssh.stderr()) == []
    assert all(s["quiesce_ms"] < 5000 for s in moves)
    print(f"{cipher}: {len(moves)} moves, {newkeys(ssh)} key exchanges seen by ssh;",
          ", ".join(f"{s['bytes']}B q={s['quiesce_ms']:.1f}ms e={s['export_ms']:.2f}ms "
                    f"i={s['import_ms']:.1f}ms buf={s['send_buf']} in={s['inpbuf']} "
                    f"ka={s['pending_keepalives']}" for s in moves))


@pytest.mark.parametrize("cipher", CIPHERS)
def test_input_crosses_moves_even_mid_packet(cipher: str, keys: Keys, tmp_path: Path,
                                             owned: list[Any]) -> None:
    """Moves with a partial packet read (a part of its first block, or the header
    decrypted but the body incomplete), then a paste queued in the kernel: every
    typed byte arrives once, in order."""
    config = {"host_key": keys.host_key, "authorized_keys": keys.authorized_keys}
    host = HostProc(tmp_path, config, name="h0")
    owned.append(host)
    proxy = SplitProxy(host.call("listen")[0]["port"])
    owned.append(proxy)
    ssh = SshClient(keys, proxy.port, cipher, tmp_path)
    owned.append(ssh)
    ssh.expect(b"READY" + PROMPT)
    host.call("wait_session")
    for hop, forward in ((1, 3), (2, -7)):
        proxy.split_next(forward)
        ssh.send(f"cut {hop}\r".encode())
        assert proxy.cut.wait(10)
        time.sleep(0.2)  # the server reads the part it got
        host, stats = move(host, tmp_path, owned, f"h{hop}")
        assert stats["inpbuf"] > 0, "no partial packet at the move"
        proxy.release()
        assert f"[cut {hop}]" in ssh.expect(PROMPT).decode()

    lines = 2048
    paste = flood_bytes(0, lines * 64).replace(b"\r\n", b"\r")
    writer = threading.Thread(target=ssh.send, args=(paste,), daemon=True)
    writer.start()
    wait_for(lambda: ssh.seen(b"[%015d:" % 300), 30, "paste echoed")
    host, stats = move(host, tmp_path, owned, "h3")
    out = ssh.expect(b"[%015d:" % (lines - 1), 60) + ssh.expect(PROMPT)
    writer.join(10)
    assert [int(n) for n in re.findall(rb"\[(\d{15}):", out)] == list(range(lines))

    ssh.send(b"exit\r")
    assert ssh.wait(15) == 0
    assert bad_lines(ssh.stderr()) == []


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def start_server(keys: Keys, conns: list[Any], sessions: list[Any],
                       **kw: Any) -> Any:
    return await asyncssh.create_server(
        lambda: EchoServer(conns.append, sessions.append), "127.0.0.1", 0, **kw)


async def test_unmovable_cipher_stays_in_place(keys: Keys, tmp_path: Path,
                                               owned: list[Any]) -> None:
    conns: list[Any] = []
    kw = server_kw(keys, encryption_algs=["aes128-ctr", *movable.MOVABLE_CIPHERS],
                   compression_algs=["none"], line_editor=False)
    with pytest.raises(NotMovable, match="aes128-ctr"):
        movable.server_options(**kw)
    acceptor = await start_server(keys, conns, [], **kw)
    owned.append(acceptor)
    ssh = SshClient(keys, acceptor.get_port(), "aes128-ctr", tmp_path)
    owned.append(ssh)
    await in_thread(ssh.expect, b"READY" + PROMPT)
    (conn,) = conns
    with pytest.raises(NotMovable, match="aes128-ctr"):
        movable.check_movable(conn)
    with pytest.raises(NotMovable, match="aes128-ctr"):
        await movable.quiesce(conn, 1.0)
    assert movable.move_state(conn) is movable.MoveState.LIVE
    assert "[still here]" in await in_thread(run, ssh, "still here")
    ssh.send(b"exit\r")
    assert await in_thread(ssh.wait, 15) == 0
    assert bad_lines(ssh.stderr()) == []


async def test_quiesce_waits_out_a_key_exchange_then_moves_in_process(
        keys: Keys, tmp_path: Path, owned: list[Any]) -> None:
    conns: list[Any] = []
    sessions: list[EchoShellSession] = []
    opts = movable.server_options(**server_kw(keys, rekey_bytes=100_000, keepalive_interval=30))
    acceptor = await start_server(keys, conns, sessions, **opts)
    owned.append(acceptor)
    ssh = SshClient(keys, acceptor.get_port(), "chacha20-poly1305@openssh.com", tmp_path)
    owned.append(ssh)
    await in_thread(ssh.expect, b"READY" + PROMPT)
    (conn,), (session,) = conns, sessions
    movable.check_movable(conn)

    # Frozen: nothing is read; resume_in_place picks up where it stopped.
    await movable.quiesce(conn, 5)
    assert movable.move_state(conn) is movable.MoveState.FROZEN
    ssh.send(b"typed while frozen\r")
    await asyncio.sleep(0.3)
    assert not ssh.seen(b"[typed while frozen]")
    movable.resume_in_place(conn)
    await in_thread(ssh.expect, b"[typed while frozen]" + PROMPT)

    # The client is stopped while our output crosses rekey_bytes: our KEXINIT waits
    # for an answer. Not movable until the exchange is over; a short quiesce gives up
    # and leaves the session running.
    os.kill(ssh.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.1)
        session._run("flood 262144")
        with pytest.raises(NotMovable, match="key exchange"):
            movable.check_movable(conn)
        with pytest.raises(NotMovable, match="key exchange"):
            await movable.quiesce(conn, 0.3)
        assert movable.move_state(conn) is movable.MoveState.LIVE
        waiting = asyncio.create_task(movable.quiesce(conn, 10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
    finally:
        os.kill(ssh.proc.pid, signal.SIGCONT)
    await asyncio.wait_for(waiting, 15)

    # Move inside this process: export, serialise, a new connection object on a dup
    # of the socket, release the old one.
    state = movable.export(conn)
    blob = serial.dumps(STATE_KIND, state)
    assert serial.loads(STATE_KIND, blob, movable.SshSessionState) == state
    assert state.keepalive_ms_left is not None and 0 < state.keepalive_ms_left <= 30_000
    sock = movable.dup_socket(conn)
    new = await movable.import_(serial.loads(STATE_KIND, blob, movable.SshSessionState), sock,
                                server_factory=lambda: EchoServer(conns.append),
                                session_factory=restore_session, options=opts)
    movable.release(conn)
    assert movable.move_state(conn) is movable.MoveState.RELEASED
    with pytest.raises(NotMovable):
        movable.export(conn)
    assert new in conns and new is not conn

    out = await in_thread(ssh.expect, b"FLOOD-END" + PROMPT, 30)
    assert out.split(b"FLOOD-BEGIN\r\n")[1][:-len(b"FLOOD-END" + PROMPT)] == \
        flood_bytes(0, 262144)
    assert "[moved]" in await in_thread(run, ssh, "moved")
    ssh.send(b"exit\r")
    assert await in_thread(ssh.wait, 15) == 0
    await asyncio.wait_for(new.wait_closed(), 10)
    assert bad_lines(ssh.stderr()) == []


@pytest.mark.parametrize("alg", movable.MOVABLE_CIPHERS)
def test_cipher_state_continues_the_stream(alg: str) -> None:
    """Exported mid-stream, a copy of a packet cipher continues the same stream."""
    key = bytes(range(64 if "chacha" in alg else 32 if "256" in alg else 16))
    start = movable.CipherState(alg, key, bytes(range(12)) if "gcm" in alg else b"")
    sender, receiver = movable.import_cipher(start), movable.import_cipher(start)
    hdr, body = b"\0\0\0\x24", bytes(range(36))
    for seq in range(3):
        packet, mac = sender.encrypt_packet(seq, hdr, body)
        assert receiver.decrypt_packet(seq, packet[:4], packet[4:], 4, mac) == body
    sender2 = movable.import_cipher(movable.export_cipher(alg.encode(), sender))
    receiver2 = movable.import_cipher(movable.export_cipher(alg.encode(), receiver))
    for seq in (3, 4):
        packet, mac = sender.encrypt_packet(seq, hdr, body)
        assert sender2.encrypt_packet(seq, hdr, body) == (packet, mac)
        assert receiver2.decrypt_packet(seq, packet[:4], packet[4:], 4, mac) == body


def test_state_round_trips_through_serial() -> None:
    chan = movable.ChannelState(
        recv_chan=0, send_chan=7, send_state="open", recv_state="eof_pending",
        send_window=2**31, send_pktsize=32768, send_paused=True,
        send_buf=[movable.DataChunk(b"\0\xff" * 10), movable.DataChunk(b"err", 1)],
        send_high_water=65536, send_low_water=16384, init_recv_window=2097152,
        recv_window=12, recv_pktsize=32768, recv_paused=False, recv_starting=True,
        recv_buf=[movable.DataChunk(b"x")], encoding="utf-8", errors="strict",
        decoder_pending=b"\xe2\x82", decoder_flag=0, env={b"LANG": b"C.UTF-8"},
        command=None, subsystem=None, allow_pty=True, session_started=True,
        term_type="xterm", term_size=[80, 24, 0, 0], term_modes={53: 1, 128: 38400},
        extra={"note": "x"}, app={"line": b"ab", "n": 3, "nested": {"k": [1, None]}})
    state = movable.SshSessionState(
        asyncssh_version=movable.ASYNCSSH_VERSION, client_version=b"SSH-2.0-OpenSSH_9.2p1",
        server_version=b"SSH-2.0-AsyncSSH_2.24.1", client_kexinit=b"\x14" * 20,
        server_kexinit=b"\x14" * 9, session_id=os.urandom(32), strict_kex=True,
        enc_alg_cs="aes256-gcm@openssh.com", enc_alg_sc="aes256-gcm@openssh.com",
        mac_alg_cs="aes256-gcm@openssh.com", mac_alg_sc="aes256-gcm@openssh.com",
        cmp_alg_cs="none", cmp_alg_sc="none",
        send=movable.CipherState("aes256-gcm@openssh.com", os.urandom(32), os.urandom(12)),
        recv=movable.CipherState("aes256-gcm@openssh.com", os.urandom(32), os.urandom(12)),
        send_seq=2**32 - 1, recv_seq=0, send_enchdrlen=5, send_blocksize=16,
        recv_blocksize=16, recv_macsize=16, inpbuf=os.urandom(33), rekey_bytes_sent=5,
        rekey_ms_left=None, keepalive_count=1, keepalive_ms_left=250,
        keepalive_replies_pending=2, max_recv_pktlen=263168, next_recv_chan=1,
        username="admin", auth_was_trivial=False, can_recv_ext_info=True,
        extensions_to_send=[[b"server-sig-algs", b"ssh-ed25519"]],
        key_options={"no-pty": True, "permitopen": [["h", 22], ["*", -1]]},
        cert_options=None, peer_host="", extra={"username": "admin"}, channels=[chan])
    blob = serial.dumps(STATE_KIND, state)
    assert serial.loads(STATE_KIND, blob, movable.SshSessionState) == state


def test_server_options_keep_sessions_movable() -> None:
    opts = movable.server_options(keepalive_interval=5)
    assert opts["encryption_algs"] == list(movable.MOVABLE_CIPHERS)
    assert opts["compression_algs"] == ["none"] and not opts["rekey_seconds"]
    assert opts["keepalive_interval"] == 5 and opts["line_editor"] is False
    for bad in ({"compression_algs": ["zlib@openssh.com", "none"]}, {"rekey_seconds": 3600},
                {"line_editor": True}, {"process_factory": print}):
        with pytest.raises(NotMovable):
            movable.server_options(**bad)
