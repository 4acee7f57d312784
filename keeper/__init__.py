"""keeper: out-of-band remote-management sessions that survive VM live migration (D-MORE)."""

__version__ = "0.1.0"
