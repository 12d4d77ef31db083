"""[tags], [alerts] and [oidc]: every error reported at once with its path."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse


@pytest.mark.parametrize(("toml", "error"), [
    ('[tags]\nallowed = ["Bad"]', "tags.allowed[0]: 'Bad' is not a tag name"),
    ("[tags]\nmax_per_request = 11", "tags.max_per_request: must be 1..10"),
    ('[tags]\nallowed = ["env"]\n[tags.metric_labels]\nproject = ["x"]', "tags.metric_labels.project: not among"),
    ("[alerts]\nthresholds = [0]", "alerts.thresholds[0]: must be a percentage"),
    ('[alerts]\nwebhook_url = "ftp://x"', "alerts.webhook_url: must start with http"),
    ("[alerts]\nmax_attempts = 0", "alerts.max_attempts: must be positive"),
    ("[oidc]\nenabled = true", "oidc.issuer: required"),
    ('[oidc]\nenabled = true\nissuer = "http://idp.example.com"\nclient_id = "c"\nredirect_uri = "https://g/cb"',
     "oidc.issuer: must be an https URL"),
    ('[oidc]\nenabled = true\nissuer = "https://idp"\nclient_id = "c"\nredirect_uri = "https://g/cb"\n'
     'scopes = ["email"]', "oidc.scopes: must include 'openid'"),
    ("[oidc]\nfoo = 1", "oidc.foo: unknown key"),
])
def test_bad_governance_settings_are_reported_with_their_path(toml, error):
    with pytest.raises(ConfigError) as exc:
        parse(toml)
    assert any(error in e for e in exc.value.errors), exc.value.errors


def test_good_governance_settings_parse():
    cfg = parse('[tags]\nallowed = ["env"]\nmetric_labels = { env = ["prod"] }\n'
                '[oidc]\nenabled = true\nissuer = "http://127.0.0.1:9000"\nclient_id = "c"\n'
                'redirect_uri = "http://127.0.0.1:8000/auth/oidc/callback"\n')
    assert ("env",) == cfg.tags.allowed and {"env": ("prod",)} == cfg.tags.metric_labels
    assert cfg.oidc.enabled and (50, 80, 100) == cfg.alerts.thresholds
