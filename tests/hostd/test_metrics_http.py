"""The agents' /metrics over HTTP(S) on 127.0.0.1 (no root): who may scrape (network,
basic auth against an htpasswd file of bcrypt hashes), what else is refused, and the
page itself in Prometheus' text format."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keeper.errors import KeeperError
from keeper.hostd import metrics, metrics_http, tls
from keeper.hostd.metrics_http import MetricsConfig

LOCAL = "127.0.0.1"
USER, PASSWORD = "prometheus", "s3cret pass:word"


def auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class _Agent:
    """What the page reads of an agent: nothing running here."""

    def __init__(self) -> None:
        from keeper.vmm.hypervisor import Hypervisor

        self.hv = Hypervisor("t")
        self.guests = type("G", (), {"entries": {}})()
        self.domrs: dict[str, object] = {}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(f"# scrapers\n{USER}:{metrics_http.hash_password(PASSWORD, rounds=4)}\n")
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    tls.make_lab_pki(d, {"a": LOCAL})
    return d


async def serve(cfg: MetricsConfig, pki: Path, *, prefixlen: int = 8
                ) -> AsyncIterator[str]:
    agent = _Agent()
    served = await metrics_http.start(lambda: metrics.page(agent), cfg, mgmt_ip=LOCAL,
                                      prefixlen=prefixlen, pki=pki, host="a")
    assert served is not None
    try:
        yield served[1]
    finally:
        await served[0].cleanup()


@pytest.fixture
async def plain(pki: Path, unused_tcp_port: int) -> AsyncIterator[str]:
    async for u in serve(MetricsConfig(listen=f"{LOCAL}:{unused_tcp_port}"), pki):
        yield u


@pytest.fixture
async def locked(pki: Path, htpasswd: Path, unused_tcp_port: int) -> AsyncIterator[str]:
    cfg = MetricsConfig(listen=f"{LOCAL}:{unused_tcp_port}", tls=True, htpasswd=htpasswd)
    async for u in serve(cfg, pki):
        yield u


def ca_context(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / tls.CA_CERT))


async def get(url: str, **kw: object) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.text(), dict(r.headers)


async def test_the_page_is_prometheus_text_with_the_metrics_an_operator_needs(
        plain: str) -> None:
    status, text, headers = await get(plain)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("keeper_hostd_migrations", "keeper_hostd_migration_duration_seconds",
                 "keeper_hostd_downtime_seconds", "keeper_hostd_client_retransmits",
                 "keeper_hostd_migration_client_retransmits",
                 "keeper_hostd_client_pause_seconds", "keeper_hostd_sessions_moved",
                 "keeper_hostd_sessions_left_behind", "keeper_hostd_keys_held",
                 "keeper_domr_sessions", "keeper_domr_up"):
        assert name in names, name
    assert 'keeper_hostd_sessions_moved_total{rms="vnc"}' in text


async def test_a_wrong_path_is_404_and_a_wrong_method_405(plain: str) -> None:
    base = plain.removesuffix("/metrics")
    assert (await get(base + "/"))[0] == 404
    assert (await get(base + "/metrics/x"))[0] == 404
    async with aiohttp.ClientSession() as s, s.post(plain) as r:
        assert r.status == 405


async def test_tls_and_basic_auth(locked: str, pki: Path) -> None:
    ctx = ca_context(pki)
    status, text, _ = await get(locked, ssl=ctx, headers=auth(USER, PASSWORD))
    assert status == 200 and "keeper_hostd_migrations_total" in text
    # again: the cached credential
    assert (await get(locked, ssl=ctx, headers=auth(USER, PASSWORD)))[0] == 200


@pytest.mark.parametrize("headers", [
    {}, auth(USER, "wrong"), auth("nobody", PASSWORD), auth(USER, PASSWORD + "x"),
    {"Authorization": "Basic !!!not-base64"}, {"Authorization": "Bearer abc"},
    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
])
async def test_bad_credentials_are_401_with_a_challenge(locked: str, pki: Path,
                                                        headers: dict[str, str]) -> None:
    status, text, got = await get(locked, ssl=ca_context(pki), headers=headers)
    assert status == 401
    assert got["WWW-Authenticate"].startswith('Basic realm="keeper metrics"')
    assert "keeper_" not in text


async def test_without_credentials_even_a_wrong_path_says_only_401(locked: str,
                                                                  pki: Path) -> None:
    base = locked.removesuffix("/metrics")
    assert (await get(base + "/nothing", ssl=ca_context(pki)))[0] == 401
    assert (await get(base + "/nothing", ssl=ca_context(pki),
                      headers=auth(USER, PASSWORD)))[0] == 404


async def test_plain_http_to_the_tls_port_gets_nothing(locked: str) -> None:
    with pytest.raises(aiohttp.ClientError):
        await get(locked.replace("https://", "http://"), headers=auth(USER, PASSWORD))


async def test_a_caller_outside_the_allowed_networks_is_403(pki: Path,
                                                           unused_tcp_port: int) -> None:
    cfg = MetricsConfig(listen=f"{LOCAL}:{unused_tcp_port}", allow=("198.18.0.0/24",))
    async for u in serve(cfg, pki):
        status, text, _ = await get(u)
        assert status == 403 and "outside the allowed networks" in text


async def test_by_default_only_the_management_subnet_may_scrape(pki: Path,
                                                               unused_tcp_port: int) -> None:
    # the management address 127.0.0.1/32: the subnet is that one address, we are it
    cfg = MetricsConfig(listen=f"{LOCAL}:{unused_tcp_port}")
    async for u in serve(cfg, pki, prefixlen=32):
        assert (await get(u))[0] == 200
    gate = metrics_http.MetricsApp(lambda: metrics.page(_Agent()),  # type: ignore[arg-type]
                                   metrics_http.networks((), metrics_http.mgmt_network(
                                       "198.18.0.1", 24)))
    assert [str(n) for n in gate.allow] == ["198.18.0.0/24"]


def test_the_password_file_accepts_bcrypt_only(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    for bad in ("prometheus:plain", "prometheus:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
                "no-colon", "user:$apr1$abc$defghijklmnopqrstuvwx", ""):
        path.write_text(bad + "\n")
        with pytest.raises(KeeperError, match=r"line 1|names no user"):
            metrics_http.load_htpasswd(path)
    h = metrics_http.hash_password("x", rounds=4)
    path.write_text(f"\n# comment\nu:{h}\nv:{h.replace('$2b$', '$2y$')}\n")
    assert set(metrics_http.load_htpasswd(path)) == {"u", "v"}


def test_listen_addresses() -> None:
    assert MetricsConfig().address("198.18.0.1") == ("198.18.0.1", 9464)
    assert MetricsConfig(listen="10.0.0.1:9100").address("x") == ("10.0.0.1", 9100)
    assert MetricsConfig(listen="off").address("x") is None
    for bad in ("10.0.0.1", "host:9464", "10.0.0.1:0", "10.0.0.1:http"):
        with pytest.raises(KeeperError, match="not IP:PORT"):
            MetricsConfig(listen=bad).address("x")


def test_the_lab_file_round_trips(tmp_path: Path) -> None:
    assert MetricsConfig.for_lab(tmp_path) == MetricsConfig()
    cfg = MetricsConfig(tls=True, htpasswd=tmp_path / "h", allow=("198.18.0.0/24",))
    cfg.save_for_lab(tmp_path)
    assert MetricsConfig.for_lab(tmp_path) == cfg
