"""The ports Domain R serves on its own address (and the baseline on the host's)."""

CONSOLE = 2323  # the raw console (telnet, nc)
SSH = 22
VNC = 5900

# the web console (noVNC and RFB over WebSocket) on Domain R's address
WEB = 6080

GUEST_SERVICES = {"console": CONSOLE, "ssh": SSH, "vnc": VNC, "web": WEB}
ECHO_SERVICES = {"console": CONSOLE}  # a stand-alone Domain R: the echo service

# a host agent's Prometheus /metrics over HTTP, on its management address
METRICS = 9464
