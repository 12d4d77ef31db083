"""Google OAuth2 access tokens from application default credentials (google-auth).

ADC is google-auth's own search: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
ADC file, the metadata server on Google Cloud.  ``credentials_file`` names a
service-account or authorized-user JSON instead.  google-auth is synchronous;
its refresh runs in ``CredentialCache``'s worker thread over urllib3 (already
installed with botocore), 5 minutes before the token expires.
"""

from __future__ import annotations

import datetime
import json
import threading
import warnings
from typing import Any

import google.auth
import google.auth.exceptions
import urllib3
from google.auth.transport.urllib3 import Request

from gateway.providers.credentials import CredentialCache, CredentialError, Fetched

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
REFRESH_MARGIN_S = 300.0


def _load_file(path: str) -> Any:
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "service_account":
        return service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    if kind == "authorized_user":
        return user_credentials.Credentials.from_authorized_user_info(info, scopes=SCOPES)
    with warnings.catch_warnings():  # the generic loader warns about unvalidated input: this is the operator's file
        warnings.simplefilter("ignore", DeprecationWarning)
        creds, _ = google.auth.load_credentials_from_file(path, scopes=SCOPES)
    return creds


class GoogleADC:
    def __init__(self, credentials_file: str = "") -> None:
        self._file = credentials_file
        self._creds: Any = None
        self._lock = threading.Lock()
        self._request = Request(urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=10.0), retries=False))

    def fetch(self) -> Fetched[str]:
        with self._lock:
            try:
                if self._creds is None:
                    if self._file:
                        self._creds = _load_file(self._file)
                    else:
                        self._creds, _ = google.auth.default(scopes=SCOPES)
                self._creds.refresh(self._request)
            except OSError as exc:
                raise CredentialError(f"cannot read credentials_file: {exc.strerror or type(exc).__name__}") from None
            except (google.auth.exceptions.GoogleAuthError, ValueError, KeyError) as exc:
                # Token endpoints' errors (invalid_grant...) and ADC's search result; no secret in either.
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise CredentialError(f"{type(exc).__name__}: {first[:300]}") from None
            token = self._creds.token
            if not token:
                raise CredentialError("the token endpoint returned no access token")
            expiry: datetime.datetime | None = self._creds.expiry  # naive UTC
            ts = expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry is not None else None
            return Fetched(str(token), ts)


def google_token(credentials_file: str) -> CredentialCache[str]:
    return CredentialCache("Google access token", GoogleADC(credentials_file).fetch, margin=REFRESH_MARGIN_S)
