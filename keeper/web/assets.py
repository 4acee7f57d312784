"""What the web console serves over HTTP: our page, and noVNC's own files.

noVNC (npm `@novnc/novnc`, installed by `scripts/setup` into `.web/node_modules/` of
the checkout; `KEEPER_NOVNC` points elsewhere) is served as its package ships it: ES
modules under `/novnc/core/` and `/novnc/vendor/`, imported by the page. The page is
ours, in the style of noVNC's vnc_lite.html: one screen, connected to the WebSocket of
the host it was loaded from, and a record of the RFB object's events
(`window.keeper.events`) for anyone who wants to check that it never disconnected.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

WS_PATH = "/websockify"
NOVNC_PREFIX = "/novnc/"
NOVNC_DIRS = ("core", "vendor")  # what the npm package serves (its "files")
NOVNC_ENV = "KEEPER_NOVNC"

TYPES = {".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
         ".json": "application/json", ".wasm": "application/wasm", ".txt": "text/plain"}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - keeper web console</title>
<style>
  body {{ margin: 0; background: #2b2b2b; color: #ddd; font: 14px sans-serif; }}
  #bar {{ padding: 6px 10px; background: #1d1d1d; }}
  #screen {{ display: inline-block; }}
</style>
<script type="module">
import RFB from "{prefix}core/rfb.js";

const status = document.getElementById("status");
const keeper = window.keeper = {{ events: [], rfb: null }};
const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "{ws}";
const rfb = new RFB(document.getElementById("screen"), url, {{ shared: true }});
rfb.scaleViewport = false;
rfb.resizeSession = false;
for (const type of ["connect", "disconnect", "credentialsrequired", "securityfailure",
                    "desktopname", "bell"]) {{
  rfb.addEventListener(type, (e) => {{
    keeper.events.push({{ type, time: Date.now(), detail: e.detail ?? null }});
  }});
}}
rfb.addEventListener("connect", () => {{ status.textContent = "connected"; rfb.focus(); }});
rfb.addEventListener("disconnect", (e) => {{
  status.textContent = e.detail.clean ? "disconnected" : "connection lost";
}});
rfb.addEventListener("desktopname", (e) => {{ document.title = e.detail.name; }});
keeper.rfb = rfb;
</script>
</head>
<body>
<div id="bar">{title}: <span id="status">connecting</span></div>
<div id="screen"></div>
</body>
</html>
"""


def novnc_root() -> Path:
    """Where noVNC's package is: $KEEPER_NOVNC, else the checkout's .web/node_modules."""
    env = os.environ.get(NOVNC_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".web/node_modules/@novnc/novnc"


@dataclass(frozen=True, slots=True)
class Asset:
    status: int
    content_type: str
    body: bytes


class Assets:
    """Maps request paths to what we answer. Files are read once and kept (noVNC is
    well under a megabyte); nothing outside noVNC's `core/` and `vendor/` is served."""

    def __init__(self, title: str, root: Path | None = None) -> None:
        self.root = (root if root is not None else novnc_root()).resolve()
        self.page = PAGE.format(title=html.escape(title), prefix=NOVNC_PREFIX,
                                ws=WS_PATH).encode()
        self._cache: dict[str, Asset] = {}

    @property
    def installed(self) -> bool:
        return (self.root / "core" / "rfb.js").is_file()

    def get(self, path: str) -> Asset:
        if path in ("/", "/index.html", "/vnc.html"):
            if not self.installed:
                return Asset(503, TYPES[".txt"], f"noVNC is not installed at {self.root}: "
                             "run scripts/setup (or set KEEPER_NOVNC)\n".encode())
            return Asset(200, TYPES[".html"], self.page)
        if not path.startswith(NOVNC_PREFIX):
            return _not_found(path)
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        rel = path[len(NOVNC_PREFIX):]
        parts = rel.split("/")
        if not parts or parts[0] not in NOVNC_DIRS or any(p in ("", ".", "..") for p in parts):
            return _not_found(path)
        file = (self.root / rel).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            return _not_found(path)
        asset = Asset(200, TYPES.get(file.suffix, "application/octet-stream"),
                      file.read_bytes())
        self._cache[path] = asset
        return asset


def _not_found(path: str) -> Asset:
    return Asset(404, TYPES[".txt"], f"404 no such file: {path}\n".encode())
