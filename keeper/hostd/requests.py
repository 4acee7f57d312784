"""The bodies of the host agent's control API, parsed once (keeper.control.body)."""

from __future__ import annotations

from dataclasses import dataclass

from keeper import control
from keeper.arp.garp import DEFAULT_SCHEDULE


@dataclass(frozen=True, slots=True)
class CreateDomr:
    name: str
    ip: str
    mac: str
    announce: bool = True
    announce_schedule: str = DEFAULT_SCHEDULE

    def __post_init__(self) -> None:
        control.ipv4("ip", self.ip)
        control.mac("mac", self.mac)


@dataclass(frozen=True, slots=True)
class CreateGuest:
    name: str
    ip: str
    mac: str
    mem_mb: int = 256
    event_delay_ms: float = 0.0
    dirty_rate: float = 0.0
    announce: bool = True
    announce_schedule: str = DEFAULT_SCHEDULE
    mode: str = "keeper"  # keeper | baseline (the servers in Dom0)
    guest: str = "sim"  # sim (keeper's simulated guest) | qemu (a real VM under QEMU)

    def __post_init__(self) -> None:
        control.ipv4("ip", self.ip)
        control.mac("mac", self.mac)


@dataclass(frozen=True, slots=True)
class MigrateTo:
    to: str


@dataclass(frozen=True, slots=True)
class SetLink:
    up: bool


@dataclass(frozen=True, slots=True)
class VmmConfig:
    may_write: bool | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    point: str
    action: str
