"""Serve a host agent: the control API on its root-only Unix socket, the peer API on
the management address (mutual TLS), /metrics over HTTP(S) on the management address
(keeper.hostd.metrics_http), until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from keeper import control
from keeper.hostd import metrics_http, tls
from keeper.hostd.agent import HostAgent
from keeper.hostd.api import local_app
from keeper.hostd.metrics import page as metrics_page
from keeper.hostd.metrics_http import MetricsConfig
from keeper.hostd.target import AgentTarget
from keeper.lab.topology import AGENT_PORT, PREFIXLEN, LabSpec
from keeper.migrate import peer as peer_protocol

log = logging.getLogger("keeper.hostd")


async def serve(spec: LabSpec, host: str, *, may_write: bool = True,
                metrics: MetricsConfig | None = None, spare: bool = True) -> int:
    """`metrics`: how /metrics is served (default: a lab's `metrics.json`, else plain
    HTTP on the management address, port 9464, the management subnet only). `spare`:
    keep a spare Domain R started ahead (keeper.hostd.spare)."""
    agent = HostAgent(spec, host, may_write=may_write, spare=spare)
    if metrics is None:
        metrics = MetricsConfig.for_lab(spec.rundir)
    peer_app = web.Application(client_max_size=1 << 30)  # checkpoints can be large
    peer_app.add_routes(peer_protocol.routes(AgentTarget(agent), control.guarded(log)))
    local = web.AppRunner(local_app(agent), access_log=None)
    peer = web.AppRunner(peer_app, access_log=None)
    await local.setup()
    await peer.setup()
    await web.TCPSite(peer, agent.host.mgmt_ip, AGENT_PORT,
                      ssl_context=tls.server_context(spec.pki, host)).start()
    served = await metrics_http.start(
        lambda: metrics_page(agent), metrics, mgmt_ip=agent.host.mgmt_ip,
        prefixlen=getattr(spec, "prefixlen", PREFIXLEN), pki=spec.pki, host=host)
    if served is not None:
        agent.metrics_url = served[1]
    # the control socket last: an agent that answers on it serves all the rest
    sock_path = spec.agent_socket(host)
    sock_path.unlink(missing_ok=True)
    old = os.umask(0o077)  # root's alone
    try:
        await web.UnixSite(local, str(sock_path)).start()
    finally:
        os.umask(old)
    agent.spare.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("host agent %s up on %s:%d and %s", host, agent.host.mgmt_ip, AGENT_PORT, sock_path)
    await stop.wait()
    await agent.close()
    await local.cleanup()
    await peer.cleanup()
    if served is not None:
        await served[0].cleanup()
    sock_path.unlink(missing_ok=True)
    return 0
