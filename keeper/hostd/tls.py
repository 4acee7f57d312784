"""Mutual TLS for the peer channel between host agents.

Agents reach each other over TCP on the lab management network; a checkpoint sent
there carries a Domain R's whole state, so the channel is authenticated both ways
and encrypted. `keeper lab up` calls `make_lab_pki` once; each agent then builds
its contexts from the same directory:

    make_lab_pki(d, {"a": "198.18.0.1", "b": "198.18.0.2"})
    server_context(d, "a")   # the agent's TCPSite: only lab hosts may call
    client_context(d, "a")   # calls to peers: server_hostname="b.keeper.lab" or by IP
    peer_name(ssl_object)    # inside a handler: which host called

Only TLS 1.3 (AEAD records: a flipped bit fails the connection, it is never
delivered). Keys and certificates come from `cryptography`; `ssl` does the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keeper.errors import KeeperError

DOMAIN = "keeper.lab"
CA_KEY, CA_CERT = "ca.key", "ca.crt"
VALIDITY = datetime.timedelta(days=365)
# Reissue what expires within this margin rather than let a long lab run hit it.
RENEW_MARGIN = datetime.timedelta(days=7)
# Tolerate small clock differences between whoever made the files and the hosts.
BACKDATE = datetime.timedelta(minutes=5)

# A DNS label; also keeps the name safe as a file name and distinct from "ca".
_HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def valid_host_name(host: str) -> bool:
    """A host name the PKI accepts: a lowercase DNS label, not "ca"."""
    return bool(_HOST_RE.match(host)) and host != "ca"


def hostname(host: str) -> str:
    """The DNS name in `host`'s certificate, to pass as `server_hostname`."""
    return f"{host}.{DOMAIN}"


# -- making the files ----------------------------------------------------------------


def make_lab_pki(directory: Path, hosts: dict[str, str]) -> None:
    """Ensure a lab CA and one key and certificate per host in `directory` (0700).

    Idempotent: valid files are kept; what is missing, damaged, expiring, not signed by
    the current CA or names another IP is (re)issued. A new CA reissues every host.
    Private keys are created 0600 and replaced atomically.
    """
    wanted = {host: _check_host(host, ip) for host, ip in hosts.items()}
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # mkdir leaves an existing directory's mode alone
    with _locked(directory):
        now = _now()
        ca = _load_valid_ca(directory, now)
        if ca is None:
            ca = _issue_ca(directory, now)
        for host, ip in wanted.items():
            if not _host_valid(directory, host, ip, ca[1], now):
                _issue_host(directory, host, ip, ca, now)


def make_ca(directory: Path) -> bool:
    """Ensure a CA in `directory` (0700), for `keeper pki init`. True if a new one was made:
    every host certificate the old CA signed must then be issued again."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with _locked(directory):
        now = _now()
        if _load_valid_ca(directory, now) is not None:
            return False
        _issue_ca(directory, now)
        return True


def issue_host(directory: Path, host: str, ip: str, *, force: bool = False) -> bool:
    """Ensure `host`'s key and certificate (for `ip`) signed by the CA in `directory`, for
    `keeper pki issue`. A valid pair is kept unless `force`; True if one was issued."""
    addr = _check_host(host, ip)
    directory = Path(directory)
    if not (directory / CA_KEY).is_file():
        raise KeeperError(f"no CA key in {directory} (make one with "
                          f"`keeper pki init --dir {directory}`)")
    with _locked(directory):
        now = _now()
        ca = _load_valid_ca(directory, now)
        if ca is None:
            raise KeeperError(f"the CA in {directory} is damaged or expires within "
                              f"{RENEW_MARGIN.days} days: `keeper pki init --dir {directory}` "
                              "makes a new one (then issue every host again)")
        if not force and _host_valid(directory, host, addr, ca[1], now):
            return False
        _issue_host(directory, host, addr, ca, now)
        return True


def host_problem(directory: Path, host: str, ip: str) -> str | None:
    """Why `host` could not use the credentials in `directory` on address `ip` (None if it
    can). Needs only ca.crt and the host's pair: the CA key stays off the hosts."""
    directory = Path(directory)
    try:
        addr = _check_host(host, ip)
    except KeeperError as exc:
        return str(exc)
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except (OSError, ValueError) as exc:
        return f"cannot read the CA certificate {directory / CA_CERT}: {exc}"
    key_path, cert_path = directory / f"{host}.key", directory / f"{host}.crt"
    if not key_path.is_file() or not cert_path.is_file():
        return f"{key_path.name} or {cert_path.name} missing in {directory}"
    loaded = _load_pair(key_path, cert_path)
    if loaded is None:
        return f"{key_path.name} and {cert_path.name} in {directory} do not parse or do not match"
    cert = loaded[1]
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return f"{cert_path.name} is not signed by {directory / CA_CERT}"
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [host]:
        return f"{cert_path.name} is for {names!r}, not host {host!r}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{cert_path.name} names no address"
    ips = san.get_values_for_type(x509.IPAddress)
    if addr not in ips:
        return (f"{cert_path.name} is for {', '.join(map(str, ips)) or 'no IP'}, not {ip}: "
                "peers dial the management address and check it")
    now = _now()
    if now < cert.not_valid_before_utc:
        return f"{cert_path.name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
    if now >= cert.not_valid_after_utc:
        return f"{cert_path.name} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def describe(directory: Path) -> list[dict[str, str]]:
    """Every certificate in `directory`: name, addresses, expiry, and whether the CA
    there signed it (for `keeper pki list`)."""
    directory = Path(directory)
    try:
        ca_cert: x509.Certificate | None = x509.load_pem_x509_certificate(
            (directory / CA_CERT).read_bytes())
    except (OSError, ValueError):
        ca_cert = None
    out = []
    for path in sorted(directory.glob("*.crt")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            out.append({"file": path.name, "error": "does not parse"})
            continue
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            ips = ",".join(str(a) for a in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            ips = ""
        signed = "no CA"
        if ca_cert is not None:
            try:
                cert.verify_directly_issued_by(ca_cert)
                signed = "yes"
            except (InvalidSignature, ValueError, TypeError):
                signed = "no"
        out.append({"file": path.name, "subject": cert.subject.rfc4514_string(), "ip": ips,
                    "not_after": f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                    "signed_by_ca": signed})
    return out


def _check_host(host: str, ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not _HOST_RE.match(host) or host == "ca":
        raise KeeperError(f"bad host name for TLS: {host!r} (want a lowercase DNS label)")
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise KeeperError(f"bad management IP for host {host!r}: {ip!r}") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise concurrent `make_lab_pki` calls on one directory (flock on the dir)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _load_valid_ca(
    directory: Path, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    loaded = _load_pair(directory / CA_KEY, directory / CA_CERT)
    if loaded is None:
        return None
    key, cert = loaded
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.verify_directly_issued_by(cert)  # self-signed by this very key
    except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return None
    if not basic.ca or not _current(cert, now):
        return None
    return key, cert


def _host_valid(
    directory: Path,
    host: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
) -> bool:
    loaded = _load_pair(directory / f"{host}.key", directory / f"{host}.crt")
    if loaded is None:
        return False
    _, cert = loaded
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return False
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return (
        _current(cert, now)
        and common_names == [host]
        and san.get_values_for_type(x509.DNSName) == [hostname(host)]
        and san.get_values_for_type(x509.IPAddress) == [ip]
    )


def _load_pair(
    key_path: Path, cert_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The key and certificate if both parse and belong together, else None."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if key_path.stat().st_mode & 0o077:
        os.chmod(key_path, 0o600)  # keep it, but no longer readable by others
    return key, cert


def _current(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and now + RENEW_MARGIN < cert.not_valid_after_utc


def _issue_ca(
    directory: Path, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A distinct name per CA, so a certificate from another lab is reported as such.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keeper"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"keeper lab CA {secrets.token_hex(4)}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(directory, "ca", key, cert)
    return key, cert


def _issue_host(
    directory: Path,
    host: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    now: datetime.datetime,
) -> None:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keeper"),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname(host)),
                                                    x509.IPAddress(ip)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(directory, host, key, cert)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _write_pair(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> None:
    """Key first, then certificate: a crash in between leaves a mismatch, reissued next time."""
    _write_atomic(directory / f"{stem}.key", 0o600, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_atomic(directory / f"{stem}.crt", 0o644,
                  cert.public_bytes(serialization.Encoding.PEM))


def _write_atomic(path: Path, mode: int, data: bytes) -> None:
    """Write a fresh file created with `mode` (never wider, whatever the umask) and rename it
    over `path`, so readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- using them ----------------------------------------------------------------------


def server_context(directory: Path, host: str) -> ssl.SSLContext:
    """For the agent's peer listener: TLS 1.3, presents `host`'s certificate and requires a
    client certificate signed by the lab CA."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, Path(directory), host)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption: every connection proves its certificate afresh
    return ctx


def client_context(directory: Path, host: str) -> ssl.SSLContext:
    """For calls to peer agents: TLS 1.3, presents `host`'s certificate and accepts only a
    server with a lab-CA certificate for the name or IP it dialled."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, Path(directory), host)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _context(protocol: int, directory: Path, host: str) -> ssl.SSLContext:
    paths = [directory / CA_CERT, directory / f"{host}.crt", directory / f"{host}.key"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise KeeperError(
            f"TLS credentials for host {host!r} missing in {directory}: {', '.join(missing)}"
            " (made by `keeper lab up`, or `keeper pki issue` for a real host)")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=paths[0])  # the lab CA only, never the system store
        ctx.load_cert_chain(certfile=paths[1], keyfile=paths[2])
    except (OSError, ssl.SSLError) as exc:
        raise KeeperError(f"cannot load TLS credentials for host {host!r} "
                          f"from {directory}: {exc}") from exc
    return ctx


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The calling (or called) host's name: the CN of its verified lab certificate."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise KeeperError("peer presented no verified certificate")
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    if len(names) != 1 or not _HOST_RE.match(names[0]):
        raise KeeperError(f"peer certificate has no usable host name: {names!r}")
    return names[0]
