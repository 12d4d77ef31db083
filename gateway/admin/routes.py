"""The control plane's routes: auth, users, keys, /me, audit (one call from create_app)."""

from __future__ import annotations

from aiohttp import web

from gateway.admin import alerts, audit_log, key_rotation, key_tags, keys, me, openapi, teams, users
from gateway.auth import handlers as auth
from gateway.auth import oidc_login


def setup(app: web.Application) -> None:
    auth.setup(app)
    r = app.router
    r.add_get("/openapi.json", openapi.openapi)
    r.add_get("/admin/users", users.list_users)
    r.add_post("/admin/users", users.create_user)
    r.add_get("/admin/users/{id}", users.get_user)
    r.add_patch("/admin/users/{id}", users.patch_user)
    r.add_delete("/admin/users/{id}", users.delete_user)
    r.add_get("/admin/keys", keys.admin_list)
    r.add_post("/admin/keys", keys.admin_create)
    r.add_get("/admin/keys/{id}", keys.admin_get)
    r.add_patch("/admin/keys/{id}", keys.admin_patch)
    r.add_delete("/admin/keys/{id}", keys.admin_revoke)
    r.add_get("/admin/audit", audit_log.list_audit)
    r.add_get("/me", me.get_me)
    r.add_patch("/me", me.patch_me)
    r.add_get("/me/keys", keys.own_list)
    r.add_post("/me/keys", keys.own_create)
    r.add_get("/me/keys/{id}", keys.own_get)
    r.add_patch("/me/keys/{id}", keys.own_patch)
    r.add_delete("/me/keys/{id}", keys.own_revoke)
    r.add_post("/admin/keys/{id}/rotate", key_rotation.admin_rotate)
    r.add_post("/me/keys/{id}/rotate", key_rotation.own_rotate)
    r.add_get("/admin/keys/{id}/tags", key_tags.admin_get)
    r.add_put("/admin/keys/{id}/tags", key_tags.admin_put)
    r.add_get("/me/keys/{id}/tags", key_tags.own_get)
    r.add_put("/me/keys/{id}/tags", key_tags.own_put)
    alerts.setup(app)
    teams.setup(app)
    oidc_login.setup(app)
