"""OpenAPI paths of the governance endpoints (teams, tags, alerts, rotation, single sign-on).

Merged into ``openapi.SPEC`` by openapi.py; bodies are described in README.md
("Governance"), here as open objects.
"""

from __future__ import annotations

from typing import Any

_OBJ = {"content": {"application/json": {"schema": {"type": "object"}}}}


def _id(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _op(summary: str, ok: int = 200, *, body: bool = False, params: list[dict[str, Any]] | None = None,
        public: bool = False, errors: tuple[int, ...] = (400, 401, 403, 404, 503)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {str(ok): {"description": "OK", **(_OBJ if ok != 204 else {})},
                                        **{str(e): {"description": "error"} for e in errors}}}
    if body:
        op["requestBody"] = {"required": False, **_OBJ}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    return op


TEAM = _id("id")
PATHS: dict[str, Any] = {
    "/admin/keys/{id}/rotate": {"post": _op("Rotate a key: new secret, old one valid for grace_seconds", 201,
                                            body=True, params=TEAM)},
    "/me/keys/{id}/rotate": {"post": _op("Rotate an own key", 201, body=True, params=TEAM)},
    "/admin/keys/{id}/tags": {"get": _op("A key's default tags", params=TEAM),
                              "put": _op("Replace a key's default tags", body=True, params=TEAM)},
    "/me/keys/{id}/tags": {"get": _op("An own key's default tags", params=TEAM),
                           "put": _op("Replace an own key's default tags", body=True, params=TEAM)},
    "/admin/usage/tags": {"get": _op("Usage filtered and grouped by tag (and team)")},
    "/me/usage/tags": {"get": _op("One's own usage by tag")},
    "/admin/alerts": {"get": _op("List spend alert rules"), "post": _op("Create a spend alert rule", 201, body=True)},
    "/admin/alerts/{id}": {"get": _op("Get an alert rule", params=TEAM),
                           "patch": _op("Change an alert rule", body=True, params=TEAM),
                           "delete": _op("Delete an alert rule", 204, params=TEAM)},
    "/admin/alerts/{id}/events": {"get": _op("An alert rule's events and delivery status", params=TEAM)},
    "/admin/alert-events": {"get": _op("All alert events (status, rule_id, limit, before)")},
    "/admin/teams": {"get": _op("List teams"), "post": _op("Create a team", 201, body=True)},
    "/admin/teams/{id}": {"get": _op("Get a team (admin or its team admin)", params=TEAM),
                          "patch": _op("Change a team's name, limits or model budgets", body=True, params=TEAM),
                          "delete": _op("Delete a team (members leave it)", 204, params=TEAM)},
    "/admin/teams/{id}/users": {"get": _op("A team's members", params=TEAM),
                                "post": _op("Add (admin) or create a member", 201, body=True, params=TEAM)},
    "/admin/teams/{id}/users/{user_id}": {
        "patch": _op("Change a member", body=True, params=_id("id", "user_id")),
        "delete": _op("Remove a member from the team", 204, params=_id("id", "user_id"))},
    "/admin/teams/{id}/keys": {"get": _op("The members' keys", params=TEAM),
                               "post": _op("Create a key for a member (shown once)", 201, body=True, params=TEAM)},
    "/admin/teams/{id}/keys/{key_id}": {"delete": _op("Revoke a member's key", 204, params=_id("id", "key_id"))},
    "/admin/teams/{id}/keys/{key_id}/rotate": {"post": _op("Rotate a member's key", 201, body=True,
                                                           params=_id("id", "key_id"))},
    "/admin/teams/{id}/usage": {"get": _op("A team's usage", params=TEAM)},
    "/auth/oidc/login": {"get": _op("Start single sign-on (302 to the identity provider)", 302, public=True,
                                    errors=(400, 404, 503))},
    "/auth/oidc/callback": {"get": _op("Finish single sign-on: the gateway's tokens", public=True,
                                       errors=(400, 401, 403, 404, 503))},
}
