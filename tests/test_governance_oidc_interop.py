"""Interop: the gateway's single sign-on against the certified ``oidc-provider`` from npm, run locally.

The browserless flow goes through the provider's own login and consent pages (its development
interactions): /auth/oidc/login -> provider /auth -> login form -> consent form -> callback.
The package is installed once into a cache directory with npm (the registry is reachable from
developer machines and CI); without ``node``/``npm`` on the machine the test is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
import pytest

from tests.fixtures.control_plane import ADMIN, bearer, pg_toml
from tests.fixtures.oidc_provider import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI
from tests.fixtures.servers import free_port, wait_port

pytestmark = pytest.mark.slow
PACKAGE = "oidc-provider@9.13.3"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-gateway-tests" / "oidc-provider-9.13.3"
SCRIPT = Path(__file__).parent / "fixtures" / "oidc_provider_npm.mjs"
ACCOUNTS = {
    "grace": {"email": "grace@corp.example", "email_verified": True, "name": "Grace", "groups": ["gw-admins"]},
    "linus": {"email": "linus@corp.example", "email_verified": True, "name": "Linus", "groups": ["staff"],
              "team": "kernel"},
}


@pytest.fixture(scope="module")
def npm_provider(tmp_path_factory):
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed to run oidc-provider")
    if not (CACHE / "node_modules" / "oidc-provider").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), PACKAGE],
                       check=True, capture_output=True, timeout=300)
    script = CACHE / "provider.mjs"  # beside its node_modules, so that the import resolves
    shutil.copyfile(SCRIPT, script)
    port = free_port()
    env = {**os.environ, "OIDC_CLIENT_ID": CLIENT_ID, "OIDC_CLIENT_SECRET": CLIENT_SECRET,
           "OIDC_REDIRECT_URI": REDIRECT_URI, "OIDC_ACCOUNTS": orjson.dumps(ACCOUNTS).decode()}
    log = tmp_path_factory.mktemp("oidc-provider") / "provider.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["node", str(script), str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port, timeout=30)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def _through_provider(s: aiohttp.ClientSession, url: str, sub: str) -> str:
    """Follow the provider's redirects, submitting its login and consent forms; the callback URL."""
    for _ in range(12):
        async with s.get(url, allow_redirects=False) as r:
            if r.status in (302, 303):
                url = urljoin(url, r.headers["location"])
                if url.startswith(REDIRECT_URI):
                    return url
                continue
            html = await r.text()
            assert 200 == r.status, html[:500]
        action = urljoin(url, re.search(r'<form[^>]*action="([^"]+)"', html).group(1))
        prompt = re.search(r'name="prompt" value="([a-z]+)"', html).group(1)
        form = {"prompt": prompt, "login": sub, "password": "any"} if prompt == "login" else {"prompt": prompt}
        async with s.post(action, data=form, allow_redirects=False) as r:
            assert r.status in (302, 303), (await r.text())[:500]
            url = urljoin(action, r.headers["location"])
            if url.startswith(REDIRECT_URI):
                return url
    raise AssertionError("the provider never redirected back")


async def test_sso_with_the_certified_npm_provider(make_gateway, mock_upstream, pg_env, npm_provider, monkeypatch):
    """Two accounts log in through oidc-provider's own pages: Grace (gw-admins) becomes an admin and
    can use /admin; Linus gets the team named by his claim; a replayed callback is refused."""
    monkeypatch.setenv("GATEWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    gw = await make_gateway(pg_toml(mock_upstream.base_url, f"""
    [oidc]
    enabled = true
    issuer = "{npm_provider}"
    client_id = "{CLIENT_ID}"
    redirect_uri = "{REDIRECT_URI}"
    admin_values = ["gw-admins"]
    team_claim = "team"
    """))
    team = await (await gw.post("/admin/teams", headers=ADMIN, json={"name": "kernel"})).json()
    for sub, role in (("grace", "admin"), ("linus", "user")):
        r = await gw.get("/auth/oidc/login", allow_redirects=False)
        assert 302 == r.status, await r.text()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            callback = urlsplit(await _through_provider(browser, r.headers["location"], sub))
        r = await gw.get(f"{callback.path}?{callback.query}", allow_redirects=False)
        assert 200 == r.status, await r.text()
        body = await r.json()
        assert (ACCOUNTS[sub]["email"], role) == (body["user"]["email"], body["user"]["role"])
        if sub == "grace":
            assert 200 == (await gw.get("/admin/users", headers=bearer(body["access_token"]))).status
        else:
            members = await (await gw.get(f"/admin/teams/{team['id']}/users", headers=ADMIN)).json()
            assert [body["user"]["id"]] == [m["id"] for m in members["data"]]
        r = await gw.get(f"{callback.path}?{callback.query}", allow_redirects=False)
        assert 400 == r.status  # the login was consumed
