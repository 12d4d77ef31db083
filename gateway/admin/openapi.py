"""The control plane described as OpenAPI 3.1, served at ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.admin import openapi_governance

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, *, body: str | None = None, ok: tuple[int, str | None] = (200, None),
        errors: tuple[int, ...] = (400, 401, 403, 503), public: bool = False, params: list[Any] | None = None,
        ) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    status, schema = ok
    responses[str(status)] = {"description": "OK", **(_json(_ref(schema)) if schema else {})}
    for e in errors:
        responses[str(e)] = {"description": "error", **_json(_ref("Error"))}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    if public:
        op["security"] = []
    if params:
        op["parameters"] = params
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}]
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the last page"},
]
_KEY_FILTERS = [
    *_PAGE,
    {"name": "user_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
    {"name": "status", "in": "query", "schema": {"enum": ["active", "revoked", "expired"]}},
    {"name": "name", "in": "query", "schema": {"type": "string"}},
]
_USER_FILTERS = [
    *_PAGE,
    {"name": "email", "in": "query", "schema": {"type": "string"}, "description": "case-insensitive substring"},
    {"name": "role", "in": "query", "schema": {"enum": ["admin", "user"]}},
    {"name": "disabled", "in": "query", "schema": {"type": "boolean"}},
]

_NULLABLE_INT = {"type": ["integer", "null"], "minimum": 1}
_STRINGS = {"type": ["array", "null"], "items": {"type": "string"}}
_TIME = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "properties": {"error": {"type": "object", "required": ["code", "message"],
              "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                             "field": {"type": "string"}}}}},
    "Limits": {"type": "object", "additionalProperties": False, "properties": {
        "models": _STRINGS, "allowed_ips": _STRINGS, "rpm": _NULLABLE_INT, "tpm": _NULLABLE_INT,
        "max_concurrency": _NULLABLE_INT, "max_tokens": _NULLABLE_INT,
        "budget_usd": {"type": ["number", "null"], "minimum": 0},
        "budget_period": {"enum": ["day", "month", "total", None]}}},
    "User": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "email": {"type": "string"}, "name": {"type": "string"},
        "role": {"enum": ["admin", "user"]}, "disabled": {"type": "boolean"}, "limits": _ref("Limits"),
        "created_at": _TIME, "updated_at": _TIME}},
    "UserCreate": {"type": "object", "required": ["email"], "additionalProperties": False, "properties": {
        "email": {"type": "string"}, "name": {"type": "string"}, "password": {"type": "string", "minLength": 10},
        "role": {"enum": ["admin", "user"]}, "disabled": {"type": "boolean"}, "limits": _ref("Limits")}},
    "UserPatch": {"type": "object", "additionalProperties": False, "properties": {
        "email": {"type": "string"}, "name": {"type": "string"}, "password": {"type": "string", "minLength": 10},
        "role": {"enum": ["admin", "user"]}, "disabled": {"type": "boolean"}, "limits": _ref("Limits")}},
    "MePatch": {"type": "object", "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "password": {"type": "string"}, "current_password": {"type": "string"}}},
    "Key": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "user_id": {"type": "string", "format": "uuid"},
        "name": {"type": "string"}, "prefix": {"type": "string"}, "limits": _ref("Limits"),
        "status": {"enum": ["active", "revoked", "expired"]}, "expires_at": _TIME, "revoked_at": _TIME,
        "last_used_at": _TIME, "created_at": _TIME, "updated_at": _TIME}},
    "NewKey": {"allOf": [_ref("Key"), {"type": "object", "properties": {
        "key": {"type": "string", "description": "the plaintext key: shown once"}}}]},
    "KeyCreate": {"type": "object", "required": ["user_id"], "additionalProperties": False, "properties": {
        "user_id": {"type": "string", "format": "uuid"}, "name": {"type": "string"}, "limits": _ref("Limits"),
        "expires_at": _TIME}},
    "OwnKeyCreate": {"type": "object", "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "limits": _ref("Limits"), "expires_at": _TIME}},
    "KeyPatch": {"type": "object", "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "limits": _ref("Limits"), "expires_at": _TIME}},
    "UserPage": {"type": "object", "properties": {"data": {"type": "array", "items": _ref("User")},
                                                  "next_cursor": {"type": ["string", "null"]}}},
    "KeyPage": {"type": "object", "properties": {"data": {"type": "array", "items": _ref("Key")},
                                                 "next_cursor": {"type": ["string", "null"]}}},
    "Login": {"type": "object", "required": ["email", "password"], "additionalProperties": False,
              "properties": {"email": {"type": "string"}, "password": {"type": "string"}}},
    "RefreshToken": {"type": "object", "required": ["refresh_token"], "additionalProperties": False,
                     "properties": {"refresh_token": {"type": "string"}}},
    "Tokens": {"type": "object", "properties": {
        "access_token": {"type": "string"}, "token_type": {"const": "Bearer"}, "expires_in": {"type": "integer"},
        "refresh_token": {"type": "string"}, "refresh_expires_in": {"type": "integer"}, "user": _ref("User")}},
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "llm-gateway control plane", "version": __version__},
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "an access token from /auth/login, or the bootstrap token"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/auth/login": {"post": _op("Log in: access + refresh token", body="Login", ok=(200, "Tokens"),
                                    errors=(400, 401, 429, 503), public=True)},
        "/auth/refresh": {"post": _op("Rotate a refresh token", body="RefreshToken", ok=(200, "Tokens"),
                                      errors=(400, 401, 503), public=True)},
        "/auth/logout": {"post": _op("Revoke a session", body="RefreshToken", ok=(204, None),
                                     errors=(400, 503), public=True)},
        "/admin/users": {
            "get": _op("List users", ok=(200, "UserPage"), params=_USER_FILTERS),
            "post": _op("Create a user", body="UserCreate", ok=(201, "User"), errors=(400, 401, 403, 409, 503)),
        },
        "/admin/users/{id}": {
            "get": _op("Get a user", ok=(200, "User"), errors=(401, 403, 404, 503), params=_ID),
            "patch": _op("Change a user", body="UserPatch", ok=(200, "User"), errors=(400, 401, 403, 404, 409, 503),
                         params=_ID),
            "delete": _op("Delete a user (revokes its keys and sessions)", ok=(204, None),
                          errors=(400, 401, 403, 404, 503), params=_ID),
        },
        "/admin/keys": {
            "get": _op("List keys", ok=(200, "KeyPage"), params=_KEY_FILTERS),
            "post": _op("Create a key (shown once)", body="KeyCreate", ok=(201, "NewKey")),
        },
        "/admin/keys/{id}": {
            "get": _op("Get a key", ok=(200, "Key"), errors=(401, 403, 404, 503), params=_ID),
            "patch": _op("Change a key", body="KeyPatch", ok=(200, "Key"), errors=(400, 401, 403, 404, 409, 503),
                         params=_ID),
            "delete": _op("Revoke a key", ok=(204, None), errors=(401, 403, 404, 503), params=_ID),
        },
        "/admin/audit": {"get": _op("The audit log, newest first")},
        "/me": {
            "get": _op("One's own user", ok=(200, "User")),
            "patch": _op("Change one's name or password", body="MePatch", ok=(200, "User")),
        },
        "/me/keys": {
            "get": _op("One's own keys", ok=(200, "KeyPage"), params=[p for p in _KEY_FILTERS
                                                                        if p["name"] != "user_id"]),
            "post": _op("Create an own key (shown once)", body="OwnKeyCreate", ok=(201, "NewKey"),
                        errors=(400, 401, 403, 409, 503)),
        },
        "/me/keys/{id}": {
            "get": _op("Get an own key", ok=(200, "Key"), errors=(401, 403, 404, 503), params=_ID),
            "patch": _op("Change an own key", body="KeyPatch", ok=(200, "Key"), errors=(400, 401, 403, 404, 409, 503),
                         params=_ID),
            "delete": _op("Revoke an own key", ok=(204, None), errors=(401, 403, 404, 503), params=_ID),
        },
    },
}

SPEC["paths"].update(openapi_governance.PATHS)
_BODY = orjson.dumps(SPEC)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
