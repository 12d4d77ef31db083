"""Redaction of anything key-shaped in text the gateway renders (log lines, error bodies).

A path may carry a gateway key in two shapes, whatever case, slashes and
prefixes surround it: an ``/ak/{key}`` segment (``//ak/``, ``/AK/``,
``/./ak/``, ``/v1/ak/``, a reverse proxy's ``/gw/ak/``) and a bare
``gwk_...`` token anywhere.  Both are replaced by ``***``; the rest of the
path stays readable.
"""

from __future__ import annotations

import re

REDACTED = "***"

# An /ak/ segment (any case, any run of slashes after it) and what follows up to the next separator.
_AK_SEGMENT = re.compile(r"(/ak/+)[^/?#]+", re.IGNORECASE)
# A gateway key anywhere (the key alphabet is url-safe base64; stop at separators).
_GWK_TOKEN = re.compile(r"(gwk_)[^/?#&;,\s\"']+", re.IGNORECASE)


def redact_path(path: str) -> str:
    """``/ak/gwk_secret/v1/messages`` -> ``/ak/***/v1/messages``; ``/x/gwk_abc`` -> ``/x/gwk_***``."""
    lowered = path.lower()
    if "/ak/" not in lowered and "gwk_" not in lowered:
        return path  # the common case: nothing to do, no regex run
    path = _AK_SEGMENT.sub(r"\g<1>" + REDACTED, path)
    return _GWK_TOKEN.sub(r"\g<1>" + REDACTED, path)


def redact_text(text: str) -> str:
    """Any rendered text that may quote a path or a header value."""
    return redact_path(text)
