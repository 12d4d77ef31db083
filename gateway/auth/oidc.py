"""OpenID Connect relying party: discovery, PKCE, code exchange, ID token checks (PyJWT).

- Discovery: ``<issuer>/.well-known/openid-configuration``, whose ``issuer``
  must equal the configured one exactly; cached for ``jwks_cache_seconds``.
- JWKS: cached; a token whose ``kid`` is not in the cache refetches the set
  (at most once per ``MIN_REFETCH_S``), so a provider's key rollover needs no
  restart, while a flood of made-up ``kid`` values cannot hammer the provider.
- ID token: asymmetric algorithms only (never ``none`` or HMAC with a public
  key), also restricted to what the provider advertises; ``iss``, ``aud``
  (and ``azp`` when there are several audiences), ``exp``, ``iat``, ``nbf``
  with ``clock_skew_seconds`` leeway; ``nonce`` equal to the one this login
  sent.  Anything else is ``OidcError``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
import structlog

from gateway.governance_config import OidcConfig

log = structlog.get_logger("oidc")

ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
MIN_REFETCH_S = 10.0
HTTP_TIMEOUT_S = 10.0


class OidcError(Exception):
    """The provider or its answer cannot be trusted; the message is safe to show (no token)."""


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str


def new_pkce() -> Pkce:
    verifier = secrets.token_urlsafe(48)  # 64 characters, within RFC 7636's 43..128
    digest = hashlib.sha256(verifier.encode()).digest()
    return Pkce(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


@dataclass(frozen=True, slots=True)
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: frozenset[str]


class OidcClient:
    def __init__(self, cfg: OidcConfig, client_secret: str) -> None:
        self.cfg = cfg
        self.client_secret = client_secret
        self._session: aiohttp.ClientSession | None = None
        self._discovery: tuple[float, Discovery] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_at = 0.0
        self._refetched_at = 0.0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._http().get(url, allow_redirects=False) as r:
                if r.status != 200:
                    raise OidcError(f"the identity provider answered {r.status} for {url}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(f"the identity provider is unreachable ({type(exc).__name__})") from None
        if not isinstance(doc, dict):
            raise OidcError("the identity provider sent no JSON object")
        return doc

    async def discovery(self) -> Discovery:
        now = time.monotonic()
        if self._discovery is not None and now - self._discovery[0] < self.cfg.jwks_cache_seconds:
            return self._discovery[1]
        doc = await self._get_json(self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self.cfg.issuer:
            raise OidcError("the discovery document names another issuer")
        try:
            d = Discovery(
                issuer=doc["issuer"], authorization_endpoint=str(doc["authorization_endpoint"]),
                token_endpoint=str(doc["token_endpoint"]), jwks_uri=str(doc["jwks_uri"]),
                algorithms=frozenset(doc.get("id_token_signing_alg_values_supported") or ["RS256"]) & ASYMMETRIC,
            )
        except KeyError as exc:
            raise OidcError(f"the discovery document lacks {exc.args[0]}") from None
        if "S256" not in (doc.get("code_challenge_methods_supported") or ["S256"]):
            raise OidcError("the identity provider does not support PKCE S256")
        self._discovery = (now, d)
        return d

    async def _load_keys(self, d: Discovery) -> None:
        doc = await self._get_json(d.jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for i, jwk in enumerate(doc.get("keys") or []):
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                keys[str(jwk.get("kid", f"#{i}"))] = jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type we cannot use: the others still can
        self._keys = keys
        self._keys_at = time.monotonic()

    async def signing_key(self, d: Discovery, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        if not self._keys or now - self._keys_at > self.cfg.jwks_cache_seconds:
            await self._load_keys(d)
        key = self._pick(kid)
        if key is None and now - self._refetched_at >= MIN_REFETCH_S:
            self._refetched_at = now  # key rollover: the provider may have published a new key
            await self._load_keys(d)
            key = self._pick(kid)
        if key is None:
            raise OidcError("the ID token is signed with a key the identity provider does not publish")
        return key

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def authorization_url(self, d: Discovery, state: str, nonce: str, pkce: Pkce) -> str:
        q = urlencode({
            "response_type": "code", "client_id": self.cfg.client_id, "redirect_uri": self.cfg.redirect_uri,
            "scope": " ".join(self.cfg.scopes), "state": state, "nonce": nonce,
            "code_challenge": pkce.challenge, "code_challenge_method": "S256",
        })
        sep = "&" if "?" in d.authorization_endpoint else "?"
        return f"{d.authorization_endpoint}{sep}{q}"

    async def exchange(self, d: Discovery, code: str, verifier: str) -> str:
        """The authorization code for an ID token (PKCE verifier; client secret if configured)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.cfg.redirect_uri,
                "client_id": self.cfg.client_id, "code_verifier": verifier}
        headers = {"accept": "application/json"}
        if self.client_secret:  # client_secret_basic (RFC 6749 2.3.1: each part form-encoded first)
            pair = f"{quote(self.cfg.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        try:
            async with self._http().post(d.token_endpoint, data=form, allow_redirects=False,
                                         headers=headers) as r:
                doc = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(f"the token endpoint is unreachable ({type(exc).__name__})") from None
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("id_token"), str):
            err = doc.get("error") if isinstance(doc, dict) else None
            raise OidcError(f"the token endpoint refused the code ({err or status})")
        return str(doc["id_token"])

    async def verify(self, d: Discovery, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.DecodeError:
            raise OidcError("the ID token is malformed") from None
        alg = header.get("alg")
        if alg not in d.algorithms:
            raise OidcError(f"the ID token's algorithm {str(alg)[:10]!r} is not accepted")
        key = await self.signing_key(d, header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token, key=key, algorithms=[alg], audience=self.cfg.client_id, issuer=d.issuer,
                leeway=self.cfg.clock_skew_seconds,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise OidcError("the ID token has expired") from None
        except jwt.InvalidAudienceError:
            raise OidcError("the ID token is for another client") from None
        except jwt.InvalidIssuerError:
            raise OidcError("the ID token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise OidcError("the ID token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise OidcError(f"the ID token is invalid ({type(exc).__name__})") from None
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.cfg.client_id:
            raise OidcError("the ID token's authorized party is another client")
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
            raise OidcError("the ID token's nonce does not match this login")
        return claims
