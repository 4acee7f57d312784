"""Gratuitous ARP: tell the switch where Domain R's MAC now lives."""

from keeper.arp.garp import DEFAULT_SCHEDULE_MS, Announcer

__all__ = ["DEFAULT_SCHEDULE_MS", "Announcer"]
