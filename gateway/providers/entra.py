"""Microsoft Entra ID access tokens for Azure OpenAI, from a command or a file.

``token_command`` is run without a shell (split like a shell would) and
prints either the token or a JSON object with ``accessToken`` /
``access_token`` and ``expires_on`` (unix seconds) or ``expiresOn`` /
``expires_in`` -- e.g. ``az account get-access-token --resource
https://cognitiveservices.azure.com -o json``.  ``token_file`` holds the same,
kept fresh by something else (a sidecar, a workload-identity agent).

The expiry is the JSON's, else the JWT's ``exp`` claim (read, not verified:
Azure verifies it); the token is renewed 5 minutes before.  A token whose
expiry cannot be read is renewed every ``token_refresh_seconds``.  Failures
report the exit status only: a command's output could hold a token.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt

from gateway.providers.credentials import CredentialCache, CredentialError, Fetched

REFRESH_MARGIN_S = 300.0
COMMAND_TIMEOUT_S = 30.0


def _expiry_of(doc: dict[str, Any]) -> float | None:
    for key in ("expires_on", "expiresOn"):
        v = doc.get(key)
        if isinstance(v, int | float) or (isinstance(v, str) and v.isdigit()):
            return float(v)
        if isinstance(v, str):
            try:  # az's local-time "2026-12-01 10:00:00.000000"
                return datetime.fromisoformat(v).timestamp()
            except ValueError:
                pass
    v = doc.get("expires_in")
    if isinstance(v, int | float) or (isinstance(v, str) and v.isdigit()):
        return time.time() + float(v)
    return None


def parse_token(text: str, refresh_every: float) -> Fetched[str]:
    """A token (raw or in JSON) and when to consider it expired."""
    text = text.strip()
    expires_at: float | None = None
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise CredentialError("the token output is neither a token nor valid JSON") from None
        token = doc.get("accessToken") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise CredentialError("the token JSON has no accessToken / access_token")
        expires_at = _expiry_of(doc)
        text = token
    if not text or any(c.isspace() for c in text):
        raise CredentialError("the token output is empty or not a single token")
    if expires_at is None:
        try:
            exp = jwt.decode(text, options={"verify_signature": False}).get("exp")
            if isinstance(exp, int | float):
                expires_at = float(exp)
        except jwt.PyJWTError:
            pass
    if expires_at is None:
        # Unknown lifetime: treat it as good until the next scheduled re-read.
        expires_at = time.time() + refresh_every + REFRESH_MARGIN_S
    return Fetched(text, expires_at)


class TokenCommand:
    def __init__(self, command: str, refresh_every: float) -> None:
        self._argv = shlex.split(command)
        self._refresh_every = refresh_every

    def fetch(self) -> Fetched[str]:
        try:
            done = subprocess.run(self._argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise CredentialError(f"token_command not found: {self._argv[0]!r}") from None
        except subprocess.TimeoutExpired:
            raise CredentialError(f"token_command did not finish within {COMMAND_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise CredentialError(f"token_command could not run: {exc.strerror or type(exc).__name__}") from None
        if done.returncode != 0:
            raise CredentialError(f"token_command exited with status {done.returncode}")
        return parse_token(done.stdout.decode(errors="replace"), self._refresh_every)


class TokenFile:
    def __init__(self, path: str, refresh_every: float) -> None:
        self._path = Path(path)
        self._refresh_every = refresh_every

    def fetch(self) -> Fetched[str]:
        try:
            text = self._path.read_text()
        except OSError as exc:
            raise CredentialError(f"cannot read token_file: {exc.strerror or type(exc).__name__}") from None
        return parse_token(text, self._refresh_every)


def entra_token(command: str, path: str, refresh_every: float) -> CredentialCache[str]:
    source = TokenCommand(command, refresh_every) if command else TokenFile(path, refresh_every)
    return CredentialCache("Entra ID token", source.fetch, margin=REFRESH_MARGIN_S)
