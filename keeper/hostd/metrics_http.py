"""The host agent's /metrics over HTTP, for a Prometheus server to scrape.

One route, `GET /metrics` (Prometheus' text format, keeper.hostd.metrics), on the
agent's management address, port keeper.ports.METRICS (9464) unless configured. In
the order a request meets them:

  1. network  the caller's address must be in the allowed networks (default: the
              management subnet), else 403 — on top of listening only on the
              management address;
  2. auth     with a password file, HTTP basic auth (RFC 7617) against it, else 401
              with a `WWW-Authenticate` challenge; nothing, not even a 404, is told
              to a caller without credentials;
  3. route    anything but GET/HEAD /metrics is 404 (405 for other methods).

TLS (optional) uses the host's certificate from the agent PKI (`<pki>/<host>.crt`,
signed by `<pki>/ca.crt`: give Prometheus that CA as `tls_config.ca_file`); TLS 1.2
and 1.3, no client certificate asked for.

The password file is the one Apache's `htpasswd -B` writes and Prometheus' own
`web.yml` uses: `user:$2y$...` lines (bcrypt only; comments `#` and blank lines
allowed). bcrypt is checked (the `bcrypt` package) in a worker
thread; a credential that passed is remembered (its SHA-256, for 5 minutes) so a
scrape every 15 s does not cost a bcrypt each time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from aiohttp import web

from keeper import ports
from keeper.errors import KeeperError

log = logging.getLogger("keeper.hostd.metrics")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_USER = re.compile(r"^[^:\s]{1,64}$")
CACHE_SECONDS = 300.0
REALM = "keeper metrics"
LAB_FILE = "metrics.json"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """How an agent serves /metrics. `listen` "IP:PORT" (default: the management address,
    port 9464; "off" serves nothing); `tls`: HTTPS with the host's PKI certificate;
    `htpasswd`: basic auth against this file; `allow`: networks that may scrape
    (default: the management subnet)."""

    listen: str | None = None
    tls: bool = False
    htpasswd: Path | None = None
    allow: tuple[str, ...] = ()

    @classmethod
    def for_lab(cls, rundir: Path) -> MetricsConfig:
        """A lab's choice (`keeper lab up` with `ops.up(metrics=...)` writes
        `<rundir>/metrics.json`), else the default."""
        path = Path(rundir) / LAB_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise KeeperError(f"cannot read {path}: {exc}") from None
        try:
            return cls(listen=doc.get("listen"), tls=bool(doc.get("tls", False)),
                       htpasswd=Path(doc["htpasswd"]) if doc.get("htpasswd") else None,
                       allow=tuple(doc.get("allow", ())))
        except (AttributeError, TypeError) as exc:
            raise KeeperError(f"{path}: {exc}") from None

    def save_for_lab(self, rundir: Path) -> None:
        doc = {"listen": self.listen, "tls": self.tls, "allow": list(self.allow),
               "htpasswd": str(self.htpasswd) if self.htpasswd else None}
        (Path(rundir) / LAB_FILE).write_text(json.dumps(doc))

    def address(self, mgmt_ip: str) -> tuple[str, int] | None:
        if self.listen == "off":
            return None
        if not self.listen:
            return mgmt_ip, ports.METRICS
        host, sep, port = self.listen.rpartition(":")
        try:
            if not sep:
                raise ValueError("no port")
            ipaddress.ip_address(host.strip("[]"))
            number = int(port)
            if not 0 < number < 65536:
                raise ValueError("port out of range")
        except ValueError as exc:
            raise KeeperError(f"metrics listen address {self.listen!r} is not IP:PORT "
                              f"({exc})") from None
        return host.strip("[]"), number


def mgmt_network(mgmt_ip: str, prefixlen: int) -> Network:
    return ipaddress.ip_interface(f"{mgmt_ip}/{prefixlen}").network


def networks(allow: tuple[str, ...], default: Network) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in allow) or (default,)
    except ValueError as exc:
        raise KeeperError(f"bad network in the metrics allow list: {exc}") from None


# -- basic auth -------------------------------------------------------------------------


def load_htpasswd(path: Path) -> dict[str, str]:
    """`user:bcrypt-hash` lines; any other line is an error naming its number."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeeperError(f"cannot read the metrics password file {path}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, digest = line.partition(":")
        if not sep or not _USER.match(user) or not _BCRYPT.match(digest):
            raise KeeperError(f"{path} line {number}: want user:bcrypt-hash "
                              "(`htpasswd -nB user` makes one)")
        users[user] = digest
    if not users:
        raise KeeperError(f"the metrics password file {path} names no user")
    return users


def hash_password(password: str, rounds: int = 10) -> str:
    """A bcrypt hash for the password file (what `htpasswd -nbB` prints after `user:`)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode("ascii")


def _bcrypt_ok(password: str, digest: str) -> bool:
    """Whether `password` matches a bcrypt hash ($2a$, $2b$ or htpasswd's $2y$)."""
    try:
        return bcrypt.checkpw(password.encode(), digest.encode("ascii"))
    except ValueError:
        return False


class BasicAuth:
    """Checks `Authorization: Basic` against a password file's users."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self._ok: dict[tuple[str, bytes], float] = {}  # (user, sha256(password)) -> until
        # for unknown users: the same work as a known one, so timing tells nothing
        self._dummy = next(iter(users.values()))

    async def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        now = time.monotonic()
        if self._ok.get(key, 0.0) > now:
            return True
        digest = self.users.get(user)
        ok = await asyncio.to_thread(_bcrypt_ok, password, digest or self._dummy)
        if digest is None or not ok:
            return False
        if len(self._ok) > 64:
            self._ok.clear()
        self._ok[key] = now + CACHE_SECONDS
        return True


# -- the server ------------------------------------------------------------------------


def server_context(pki: Path, host: str) -> ssl.SSLContext:
    """HTTPS with `host`'s certificate from the agent PKI; no client certificate."""
    cert, key = Path(pki) / f"{host}.crt", Path(pki) / f"{host}.key"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise KeeperError(f"cannot load the metrics TLS certificate of host {host!r} "
                          f"from {pki}: {exc}") from None
    return ctx


Render = Callable[[], Awaitable[tuple[bytes, str]]]


@dataclass(slots=True)
class MetricsApp:
    """The aiohttp application: `render` makes the page (body, content type)."""

    render: Render
    allow: tuple[Network, ...]
    auth: BasicAuth | None = None
    refused: dict[int, int] = field(default_factory=dict)  # status -> count, for tests/logs

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/metrics", self._metrics)  # HEAD too
        return app

    @web.middleware
    async def _gate(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        peer = request.remote or ""
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            addr = None
        if addr is None or not any(addr in net for net in self.allow):
            return self._refuse(403, f"{peer} is outside the allowed networks")
        if self.auth is not None and not await self.auth.check(
                request.headers.get("Authorization")):
            return self._refuse(401, "authentication required",
                                {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        return await handler(request)

    def _refuse(self, status: int, text: str,
                headers: dict[str, str] | None = None) -> web.Response:
        self.refused[status] = self.refused.get(status, 0) + 1
        return web.Response(status=status, text=text + "\n", headers=headers)

    async def _metrics(self, _: web.Request) -> web.StreamResponse:
        body, ctype = await self.render()
        return web.Response(body=body, headers={"Content-Type": ctype})


async def start(render: Render, cfg: MetricsConfig, *, mgmt_ip: str, prefixlen: int,
                pki: Path, host: str) -> tuple[web.AppRunner, str] | None:
    """Listen per `cfg`; returns the runner (to clean up) and the URL, or None if off."""
    where = cfg.address(mgmt_ip)
    if where is None:
        return None
    gate = MetricsApp(render, networks(cfg.allow, mgmt_network(mgmt_ip, prefixlen)),
                      BasicAuth(load_htpasswd(cfg.htpasswd)) if cfg.htpasswd else None)
    ctx = server_context(pki, host) if cfg.tls else None
    runner = web.AppRunner(gate.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, where[0], where[1], ssl_context=ctx).start()
    except OSError as exc:
        await runner.cleanup()
        raise KeeperError(f"cannot serve metrics on {where[0]}:{where[1]}: {exc}") from None
    return runner, url(where, tls=cfg.tls)


def url(where: tuple[str, int], *, tls: bool) -> str:
    host = f"[{where[0]}]" if ":" in where[0] else where[0]
    return f"{'https' if tls else 'http'}://{host}:{where[1]}/metrics"
