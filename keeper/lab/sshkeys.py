"""SSH keys of a lab: the login key pair people and tests use, the authorized keys
every Domain R accepts, and one host key per guest (made once, then carried by its
Domain R wherever it goes). Private keys are written 0600."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from keeper.lab.topology import LabSpec


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_login_key(spec: LabSpec, authorized_keys: Path | None = None) -> Path:
    """The lab's authorized_keys file; without one given, a key pair made for the lab
    (private key at <rundir>/ssh/id_ed25519). Idempotent."""
    auth = spec.ssh_dir / "authorized_keys"
    if authorized_keys is not None:
        spec.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        auth.write_text(authorized_keys.read_text())
        return auth
    key = spec.ssh_dir / "id_ed25519"
    if not key.exists():
        pair = asyncssh.generate_private_key("ssh-ed25519", comment="keeper-lab")
        _write_private(key, pair.export_private_key())
        key.with_suffix(".pub").write_bytes(pair.export_public_key())
    if not auth.exists():
        auth.write_bytes(key.with_suffix(".pub").read_bytes())
    return auth


def login_key(spec: LabSpec) -> Path | None:
    key = spec.ssh_dir / "id_ed25519"
    return key if key.exists() else None


def host_key(spec: LabSpec, guest: str) -> Path:
    path = spec.ssh_dir / f"host-{guest}"
    if not path.exists():
        _write_private(path, asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    return path
