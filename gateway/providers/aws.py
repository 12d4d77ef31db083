"""AWS credentials from the standard chain, and SigV4 signing, both by botocore.

The chain is botocore's own (what the AWS CLI and SDKs use): environment
variables, the shared credentials and config files (profiles, assume-role,
SSO), the container role, the instance role through IMDSv2.  It is resolved
once; botocore's refreshable credentials then renew themselves when asked
inside their advisory window (15 minutes before expiry), which the
background loop of ``CredentialCache`` does just after that window opens.
"""

from __future__ import annotations

import threading
from typing import Any

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError

from gateway.providers.credentials import CredentialCache, CredentialError, Fetched

# Just inside botocore's advisory refresh window (15 min before expiry), well before its
# mandatory one (10 min): asked then, botocore renews them.  (Instance-role credentials
# get an expiry botocore itself may extend; it then renews when that comes near.)
REFRESH_MARGIN_S = 15 * 60 - 5


class AwsChain:
    """Resolves the chain once, then hands out frozen (consistent) credentials."""

    def __init__(self, profile: str = "") -> None:
        self._profile = profile
        self._creds: Any = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Resolve the chain again on the next fetch (AWS refused the credentials: rotated, revoked?)."""
        self._creds = None  # fetch() reads it once under its lock: a fetch in flight keeps its own

    def fetch(self) -> Fetched[ReadOnlyCredentials]:
        with self._lock:
            try:
                creds = self._creds
                if creds is None:
                    session = botocore.session.Session(profile=self._profile or None)
                    creds = session.get_credentials()
                    if creds is None:
                        raise CredentialError(
                            "none found (environment, shared credentials/config files, container or instance role)"
                        )
                    self._creds = creds
                frozen = creds.get_frozen_credentials()
            except BotoCoreError as exc:
                # botocore's messages are templates (profile names, missing variable names), never secrets.
                raise CredentialError(f"{type(exc).__name__}: {str(exc)[:300]}") from None
            expiry = getattr(creds, "_expiry_time", None)
            return Fetched(frozen, expiry.timestamp() if expiry is not None else None)


def aws_credentials(profile: str) -> CredentialCache[ReadOnlyCredentials]:
    chain = AwsChain(profile)
    return CredentialCache("AWS credentials", chain.fetch, forget=chain.forget, margin=REFRESH_MARGIN_S)


def sigv4_headers(
    creds: ReadOnlyCredentials, service: str, region: str, url: str, body: bytes, headers: dict[str, str]
) -> dict[str, str]:
    """The headers that sign a POST of ``body`` to ``url`` (Authorization, X-Amz-Date, token).

    ``headers`` are the ones to sign besides host; they must be sent with
    exactly these values.  ``url`` is the encoded URL as it goes on the wire.
    """
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(creds, service, region).add_auth(request)
    out = {"authorization": request.headers["Authorization"], "x-amz-date": request.headers["X-Amz-Date"]}
    token = request.headers.get("X-Amz-Security-Token")
    if token:
        out["x-amz-security-token"] = token
    return out
