"""The console's static files, read once from the package and served from memory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _walk(node: resources.abc.Traversable, prefix: str, out: dict[str, Asset]) -> None:
    for child in node.iterdir():
        name = f"{prefix}{child.name}"
        if child.is_dir():
            _walk(child, name + "/", out)
            continue
        ext = child.name[child.name.rfind("."):] if "." in child.name else ""
        ctype = _TYPES.get(ext)
        if ctype is None:
            continue  # only known kinds are served (no guessing, no sniffing)
        body = child.read_bytes()
        out[name] = Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def load() -> dict[str, Asset]:
    """Relative path (``app.js``, ``vendor/uPlot.esm.js``) -> asset."""
    out: dict[str, Asset] = {}
    _walk(resources.files("gateway.console") / "static", "", out)
    return out
