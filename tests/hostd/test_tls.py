"""Mutual TLS for the agents' peer channel, over real sockets on 127.0.0.1 (no root).

Who may talk (lab hosts only, both ways), and what happens to a stream someone alters on
the way (the connection fails; the handler never gets the altered bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keeper.errors import KeeperError
from keeper.hostd import tls

TIMEOUT = 10.0
LOCAL = "127.0.0.1"
# "a" is the server in these tests, so its certificate must name the address we dial.
HOSTS = {"a": LOCAL, "b": "198.18.0.2"}
BODY = bytes(range(256)) * 256  # 64 KiB: four full TLS records


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    tls.make_lab_pki(directory, HOSTS)
    return directory


@pytest.fixture
def other_pki(tmp_path: Path) -> Path:
    """Another lab: same host names, different CA."""
    directory = tmp_path / "other"
    tls.make_lab_pki(directory, HOSTS)
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- the files -----------------------------------------------------------------------


def test_make_lab_pki_is_idempotent_and_private(pki: Path) -> None:
    first = snapshot(pki)
    assert set(first) == {"ca.key", "ca.crt", "a.key", "a.crt", "b.key", "b.crt"}

    tls.make_lab_pki(pki, HOSTS)
    assert snapshot(pki) == first

    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    for name in ("ca.key", "a.key", "b.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name


def test_host_certificate_contents(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "b.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["b"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["b.keeper.lab"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.2"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 360 <= days <= 370


def test_make_lab_pki_fills_gaps_and_keeps_the_rest(pki: Path) -> None:
    before = snapshot(pki)
    (pki / "b.crt").unlink()
    tls.make_lab_pki(pki, {**HOSTS, "c": "198.18.0.3"})
    after = snapshot(pki)
    for name in ("ca.key", "ca.crt", "a.key", "a.crt"):
        assert after[name] == before[name], name
    assert after["b.crt"] and after["b.key"] != before["b.key"]  # a fresh pair for b
    assert {"c.key", "c.crt"} <= set(after)
    assert stat.S_IMODE((pki / "c.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    for host in ("b", "c"):
        x509.load_pem_x509_certificate(after[f"{host}.crt"]).verify_directly_issued_by(ca)


def test_a_new_ip_gets_a_new_certificate(pki: Path) -> None:
    before = snapshot(pki)
    tls.make_lab_pki(pki, {**HOSTS, "b": "198.18.0.42"})
    after = snapshot(pki)
    assert after["a.crt"] == before["a.crt"] and after["ca.crt"] == before["ca.crt"]
    san = x509.load_pem_x509_certificate(after["b.crt"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.42"]


def test_a_new_ca_reissues_every_host(pki: Path) -> None:
    before = snapshot(pki)
    (pki / "ca.key").unlink()
    tls.make_lab_pki(pki, HOSTS)
    after = snapshot(pki)
    assert all(after[name] != before[name] for name in before)
    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    for host in HOSTS:
        x509.load_pem_x509_certificate(after[f"{host}.crt"]).verify_directly_issued_by(ca)


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        tls.make_lab_pki(tmp_path / "p", HOSTS)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o700
    for name in ("ca.key", "a.key", "b.key"):
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "p" / "a.crt").stat().st_mode) == 0o644


def test_a_loose_key_mode_is_tightened(pki: Path) -> None:
    (pki / "a.key").chmod(0o644)
    pki.chmod(0o755)
    tls.make_lab_pki(pki, HOSTS)
    assert stat.S_IMODE((pki / "a.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700


def test_bad_host_names_are_refused(tmp_path: Path) -> None:
    for host, ip in [("ca", LOCAL), ("../x", LOCAL), ("A", LOCAL), ("a", "not-an-ip")]:
        with pytest.raises(KeeperError):
            tls.make_lab_pki(tmp_path / "p", {host: ip})


def test_missing_files_raise_keeper_error(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(KeeperError, match=r"ca\.crt"):
        tls.server_context(tmp_path / "nowhere", "a")
    with pytest.raises(KeeperError, match=r"c\.crt, c\.key"):
        tls.client_context(pki, "c")
    (pki / "a.key").unlink()
    with pytest.raises(KeeperError, match=r"a\.key"):
        tls.server_context(pki, "a")


def test_context_settings(pki: Path) -> None:
    server, client = tls.server_context(pki, "a"), tls.client_context(pki, "b")
    for ctx in (server, client):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


def test_peer_name_needs_a_certificate() -> None:
    class NoCert:
        def getpeercert(self) -> dict[str, object]:
            return {}

    with pytest.raises(KeeperError):
        tls.peer_name(NoCert())  # type: ignore[arg-type]


# -- a server and its callers --------------------------------------------------------


@dataclass
class Server:
    port: int
    calls: int = 0  # requests that reached any handler
    peers: list[str] = field(default_factory=list)  # peer_name of each call to /whoami
    started: int = 0  # calls to /echo that reached the handler
    bodies: list[bytes] = field(default_factory=list)  # bodies /echo read in full
    errors: list[BaseException] = field(default_factory=list)  # /echo reads that failed


@contextlib.asynccontextmanager
async def serve(ctx: ssl.SSLContext) -> AsyncIterator[Server]:
    """The agent's peer listener in miniature: aiohttp on 127.0.0.1 with `ctx`."""
    server = Server(port=0)

    async def whoami(request: web.Request) -> web.Response:
        server.calls += 1
        name = tls.peer_name(request.transport.get_extra_info("ssl_object"))
        server.peers.append(name)
        return web.json_response({"peer": name})

    async def echo(request: web.Request) -> web.Response:
        server.calls += 1
        server.started += 1
        try:
            body = await request.read()
        except BaseException as exc:  # a failed read, or cancelled when the peer went away
            server.errors.append(exc)
            raise
        server.bodies.append(body)
        return web.Response(body=hashlib.sha256(body).digest())

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await asyncio.wait_for(runner.setup(), TIMEOUT)
    try:
        site = web.TCPSite(runner, LOCAL, 0, ssl_context=ctx)
        await asyncio.wait_for(site.start(), TIMEOUT)
        server.port = runner.addresses[0][1]
        yield server
    finally:
        await asyncio.wait_for(runner.cleanup(), TIMEOUT)


async def whoami(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None) -> str:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
        f"https://{LOCAL}:{port}/whoami", ssl=ctx, server_hostname=server_hostname
    ) as response:
        response.raise_for_status()
        peer: str = (await response.json())["peer"]
        return peer


def bare_client(pki: Path) -> ssl.SSLContext:
    """Trusts the lab CA (so the server is fine) but has no certificate of its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki / "ca.crt")
    return ctx


async def test_mutual_tls_answers_and_names_the_caller(pki: Path) -> None:
    async with serve(tls.server_context(pki, "a")) as server:
        ctx = tls.client_context(pki, "b")
        assert await whoami(server.port, ctx) == "b"  # by IP: a's SAN has 127.0.0.1
        assert await whoami(server.port, ctx, server_hostname="a.keeper.lab") == "b"
    assert server.peers == ["b", "b"]


async def test_peer_name_on_both_sides(pki: Path) -> None:
    """The client learns the server's name too, from the same kind of certificate."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(tls.peer_name(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0, ssl=tls.server_context(pki, "a"))
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            LOCAL, port, ssl=tls.client_context(pki, "b"), server_hostname="a.keeper.lab"),
            TIMEOUT)
        assert tls.peer_name(writer.get_extra_info("ssl_object")) == "a"
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    assert seen == ["b"]


async def refused(call: Callable[[], Awaitable[object]]) -> BaseException:
    """Runs `call()` (a coroutine function); returns the connection-level error it raised.

    An HTTP error answer does not count: it would mean the request got through.
    """
    try:
        result = await asyncio.wait_for(call(), TIMEOUT)
    except (aiohttp.ClientConnectionError, ssl.SSLError, ConnectionError) as exc:
        return exc
    raise AssertionError(f"expected the connection to be refused, got {result!r}")


async def test_client_without_certificate_is_refused(pki: Path) -> None:
    async with serve(tls.server_context(pki, "a")) as server:
        await refused(lambda: whoami(server.port, bare_client(pki)))
    assert server.calls == 0


async def test_client_from_another_ca_is_refused(pki: Path, other_pki: Path) -> None:
    """Its certificate says "b" and is well formed, but the lab CA did not sign it."""
    impostor = tls.client_context(other_pki, "b")
    impostor.load_verify_locations(cafile=pki / "ca.crt")  # it does trust our server
    async with serve(tls.server_context(pki, "a")) as server:
        await refused(lambda: whoami(server.port, impostor))
    assert server.calls == 0


async def test_server_from_another_ca_is_refused(pki: Path, other_pki: Path) -> None:
    async with serve(tls.server_context(other_pki, "a")) as server:
        exc = await refused(lambda: whoami(server.port, tls.client_context(pki, "b")))
    assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
    assert server.calls == 0


async def test_server_with_the_wrong_name_is_refused(pki: Path) -> None:
    """b's own certificate is lab-signed, but not for a.keeper.lab: check_hostname matters."""
    async with serve(tls.server_context(pki, "b")) as server:
        ctx = tls.client_context(pki, "a")
        await refused(lambda: whoami(server.port, ctx, server_hostname="a.keeper.lab"))
        await refused(lambda: whoami(server.port, ctx))  # b's SAN lacks 127.0.0.1
    assert server.calls == 0


async def test_tls12_client_is_refused(pki: Path) -> None:
    old = tls.client_context(pki, "b")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serve(tls.server_context(pki, "a")) as server:
        await refused(lambda: whoami(server.port, old))
    assert server.calls == 0


async def test_plain_tcp_client_is_refused(pki: Path) -> None:
    async with serve(tls.server_context(pki, "a")) as server:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOCAL, server.port), TIMEOUT)
        try:
            writer.write(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            await asyncio.wait_for(writer.drain(), TIMEOUT)
            with contextlib.suppress(ConnectionError):
                answer = await asyncio.wait_for(reader.read(), TIMEOUT)
                assert not answer.startswith(b"HTTP/")  # at most a TLS alert, then close
        finally:
            writer.close()
    assert server.calls == 0


# -- tampering -----------------------------------------------------------------------


class FlipProxy:
    """A TCP relay that flips one bit in the `nth` full-size TLS record from client to server.

    Handshake records are far smaller than 16000 bytes, so a full-size record is application
    data: the request written in one piece, cut by TLS into 16 KiB records.
    """

    FULL = 16000

    def __init__(self, upstream_port: int, nth: int | None) -> None:
        self.upstream_port, self.nth = upstream_port, nth
        self.flipped = 0
        self.server_bytes_after_flip = 0  # what the server sent back once it got the flip
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FlipProxy:
        self._server = await asyncio.start_server(self._relay, LOCAL, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.wait_for(
            asyncio.gather(*self._tasks, return_exceptions=True), TIMEOUT)
        await asyncio.wait_for(self._server.wait_closed(), TIMEOUT)

    async def idle(self) -> None:
        """Wait until every relayed connection has ended on both sides."""
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), TIMEOUT)

    async def _relay(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        swriter: asyncio.StreamWriter | None = None
        try:
            sreader, swriter = await asyncio.wait_for(
                asyncio.open_connection(LOCAL, self.upstream_port), TIMEOUT)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._client_to_server(creader, swriter))
                tg.create_task(self._server_to_client(sreader, cwriter))
        finally:
            cwriter.close()
            if swriter is not None:
                swriter.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        buf, full = bytearray(), 0
        while chunk := await self._read(reader):
            buf += chunk
            while len(buf) >= 5 and len(buf) >= 5 + (size := int.from_bytes(buf[3:5], "big")):
                record = buf[:5 + size]
                del buf[:5 + size]
                if record[0] == 23 and size >= self.FULL:  # application_data
                    full += 1
                    if full == self.nth:
                        record[5 + size - 20] ^= 0x01  # a ciphertext byte near the end
                        self.flipped += 1
                writer.write(record)
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while chunk := await self._read(reader):
            if self.flipped:
                self.server_bytes_after_flip += len(chunk)
            writer.write(chunk)
        with contextlib.suppress(OSError):
            writer.write_eof()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> bytes:
        """Next chunk; b"" once the side is gone, whichever way it went."""
        try:
            return await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
        except ConnectionError:
            return b""


async def post_echo(port: int, ctx: ssl.SSLContext) -> bytes:
    """The whole request in one write, so TLS cuts it into records deterministically."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        LOCAL, port, ssl=ctx, server_hostname="a.keeper.lab"), TIMEOUT)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
        await asyncio.wait_for(writer.drain(), TIMEOUT)
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


async def test_the_proxy_alone_changes_nothing(pki: Path) -> None:
    """Control: without the flip, the same request through the same relay succeeds."""
    async with serve(tls.server_context(pki, "a")) as server, FlipProxy(
        server.port, nth=None
    ) as proxy:
        answer = await post_echo(proxy.port, tls.client_context(pki, "b"))
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(hashlib.sha256(BODY).digest())
    assert server.bodies == [BODY]
    assert proxy.flipped == 0


@pytest.mark.parametrize("nth", [1, 4], ids=["first-record", "last-full-record"])
async def test_tampered_request_is_never_applied(pki: Path, nth: int) -> None:
    """One flipped bit in the request: the server drops the connection without answering.

    Flipped in the first record, the handler never runs; flipped in the last, the headers
    got through and the handler may start, but its read of the body fails. Either way no
    body reaches it.
    """
    async with serve(tls.server_context(pki, "a")) as server, FlipProxy(
        server.port, nth=nth
    ) as proxy:
        try:
            answer = await post_echo(proxy.port, tls.client_context(pki, "b"))
        except (ssl.SSLError, ConnectionError):
            answer = b""
        await proxy.idle()  # both sides closed: the server is done with the connection
        for _ in range(100):  # and a handler it started has seen its read fail
            if server.started == len(server.errors):
                break
            await asyncio.sleep(0.02)
    assert proxy.flipped == 1
    assert answer == b""
    assert proxy.server_bytes_after_flip == 0
    assert server.bodies == []
    assert server.started == len(server.errors)
    if nth == 1:
        assert server.started == 0


async def test_tampered_record_is_an_ssl_error_at_the_server(pki: Path) -> None:
    """Under the HTTP layer: the server's TLS stream raises a bad-record-MAC error and
    yields not one byte of the altered record."""
    got: list[bytes] = []
    failures: list[BaseException] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await asyncio.wait_for(reader.read(1 << 16), TIMEOUT):
                got.append(data)
        except Exception as exc:
            failures.append(exc)
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(handle, LOCAL, 0, ssl=tls.server_context(pki, "a"))
    try:
        port = server.sockets[0].getsockname()[1]
        async with FlipProxy(port, nth=1) as proxy:
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await post_echo(proxy.port, tls.client_context(pki, "b"))
            await asyncio.wait_for(done.wait(), TIMEOUT)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    assert proxy.flipped == 1
    assert got == []
    assert len(failures) == 1 and isinstance(failures[0], ssl.SSLError)
    assert "BAD_RECORD_MAC" in str(failures[0]) or "DECRYPTION_FAILED" in str(failures[0])
