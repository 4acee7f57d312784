"""What Domain R's SSH server offers and how much it lets one client take.

Algorithms: only what ssh-audit (3.9) passes without a failure or a warning, within
what a move can carry (keeper.ssh.movable: AEAD ciphers only, no compression):

  key exchange   post-quantum hybrids first: mlkem768x25519-sha256 (OpenSSH >= 9.9),
                 sntrup761x25519-sha512 (OpenSSH >= 8.5) where asyncssh has it (it
                 needs liboqs). curve25519-sha256 only as long as asyncssh offers no
                 sntrup761: without it an OpenSSH older than 9.9 (Debian 12 ships 9.2)
                 could not log in at all. ssh-audit warns on curve25519 ("no
                 protection against post-quantum attacks"), and that is the one
                 warning it reports then; an operator whose clients are OpenSSH
                 >= 9.9 sets KEEPER_SSH_KEX=post-quantum in the agent's environment
                 and it is gone (no warning at all). No finite-field DH: the groups >= 3072 bits
                 draw the same warning and add nothing a client here lacks.
  ciphers        chacha20-poly1305, aes256-gcm, aes128-gcm (their state is keys and
                 counters, so sessions move)
  MACs           encrypt-then-MAC SHA-2 and UMAC-128 only (the AEAD ciphers bring
                 their own; the list is what is advertised)
  host keys      ssh-ed25519, or RSA of >= 3072 bits with rsa-sha2-512/256 only (never
                 ssh-rsa, a SHA-1 signature)

Limits (a hostile client costs its own session, never the others'):

  MAX_STARTUPS / PER_SOURCE_STARTUPS  connections not yet authenticated, in all and
                 from one address (OpenSSH's MaxStartups / PerSourceMaxStartups): more
                 are closed at once, before any key exchange (DHEat, CVE-2002-20001)
  MAX_SESSIONS   session channels per connection (OpenSSH's MaxSessions): more are
                 refused with "resource shortage"
  STALL_SECONDS  a client that leaves its output unread this long while it holds the
                 guest's console back is disconnected with the reason, so the other
                 terminals on the console go on
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import asyncssh
from asyncssh.kex import get_kex_algs

from keeper.errors import KeeperError

PQ_KEX = ("mlkem768x25519-sha256", "sntrup761x25519-sha512",
          "sntrup761x25519-sha512@openssh.com")
SNTRUP = "sntrup761x25519-sha512"
FALLBACK_KEX = ("curve25519-sha256",)
MACS = ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com",
        "umac-128-etm@openssh.com")
HOST_KEY_ALGS = {"ssh-ed25519": ("ssh-ed25519",), "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}
# what client keys may sign with (and the server-sig-algs we announce): no SHA-1
SIGNATURE_ALGS = ("ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ssh-ed448", "rsa-sha2-512",
                  "rsa-sha2-256", "ecdsa-sha2-nistp521", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp256", "sk-ecdsa-sha2-nistp256@openssh.com")

MIN_RSA_BITS = 3072  # below, ssh-audit warns: 112 bits of symmetric strength

MAX_STARTUPS = 30
PER_SOURCE_STARTUPS = 10
MAX_SESSIONS = 10
STALL_SECONDS = 10.0
LOGIN_TIMEOUT = 30.0  # to authenticate, from the TCP accept


KEX_ENV = "KEEPER_SSH_KEX"  # "post-quantum": never the curve25519 fallback
KEX_MODES = ("compatible", "post-quantum")


def kex_mode() -> str:
    """The operator's choice, from the environment the host agent (and so its Domain
    Rs) runs in: `compatible` (default) keeps curve25519 while sntrup761 is missing,
    so OpenSSH < 9.9 can log in; `post-quantum` offers the hybrids only (ssh-audit
    then reports no warning; clients need OpenSSH >= 9.9)."""
    mode = os.environ.get(KEX_ENV, "compatible") or "compatible"
    if mode not in KEX_MODES:
        raise KeeperError(f"{KEX_ENV}={mode!r}: want one of {', '.join(KEX_MODES)}")
    return mode


def kex_algs(available: Sequence[bytes] | None = None, mode: str | None = None) -> list[str]:
    """The key exchanges offered, best first (see the module's docstring)."""
    have = {a.decode("ascii") for a in (get_kex_algs() if available is None else available)}
    algs = [a for a in PQ_KEX if a in have]
    if SNTRUP not in have and (mode or kex_mode()) == "compatible":
        algs += [a for a in FALLBACK_KEX if a in have]
    if not algs:
        raise KeeperError("asyncssh offers none of the key exchanges keeper allows")
    return algs


def host_keys(private_keys: Sequence[str]) -> list[asyncssh.SSHKeyPair]:
    """Host key pairs that sign only with SHA-2 (or Ed25519): an RSA key would
    otherwise also offer ssh-rsa, a SHA-1 signature."""
    pairs = []
    for text in private_keys:
        key = asyncssh.import_private_key(text)
        kind = key.get_algorithm()
        allowed = HOST_KEY_ALGS.get(kind)
        if allowed is None:
            raise KeeperError(f"host key type {kind} is not allowed "
                              f"(only {', '.join(HOST_KEY_ALGS)})")
        pyca = getattr(key, "pyca_key", None)
        if kind == "ssh-rsa" and pyca is not None and pyca.key_size < MIN_RSA_BITS:
            raise KeeperError(f"an RSA host key needs at least {MIN_RSA_BITS} bits, "
                              f"this one has {pyca.key_size}")
        (pair,) = asyncssh.load_keypairs([key])
        pair.host_key_algorithms = [a.encode() for a in allowed]
        pairs.append(pair)
    return pairs


def options() -> dict[str, Any]:
    """Algorithm options for keeper.ssh.movable.server_options."""
    return {"kex_algs": kex_algs(), "mac_algs": list(MACS),
            "signature_algs": list(SIGNATURE_ALGS), "login_timeout": LOGIN_TIMEOUT}
