"""Input validation for the control plane: every field checked, unknown fields rejected.

Each endpoint names the fields it accepts; anything else is a 400 naming the
field (mass assignment: ``role``, ``user_id``, ``spend`` ... cannot be slipped
into an endpoint that does not own them).

Every problem of a body is reported at once (``Problems``): the 400 lists them
all in ``error.errors``, the first one also as the top-level ``code``,
``message`` and ``field``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import math
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aiohttp import web

from gateway.auth.passwords import MAX_PASSWORD_LEN, MIN_PASSWORD_LEN
from gateway.auth.responses import bad_request, not_found
from gateway.config import Limits, model_matches

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ROLES = ("admin", "user")
MAX_NAME = 200
MAX_LIST = 200
MAX_PAGE = 200
DEFAULT_PAGE = 50
MAX_INT_LIMIT = 1_000_000_000
_INT_LIMITS = ("rpm", "tpm", "max_concurrency", "max_tokens")
LIMIT_FIELDS = frozenset({"models", "allowed_ips", "budget_usd", "budget_period", *_INT_LIMITS})

T = TypeVar("T")


class Problems:
    """Run every field's check, then answer one 400 that lists every problem found."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def check(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args)``; a 400 it raises is noted (and None returned) instead of ending the request."""
        try:
            return fn(*args, **kwargs)
        except web.HTTPBadRequest as exc:
            self.note(exc)
            return None

    def note(self, exc: web.HTTPException) -> None:
        err = orjson.loads(exc.text or "{}").get("error") or {"code": "invalid_request", "message": exc.reason}
        nested = err.pop("errors", None)
        self.errors.extend(nested if nested else [err])

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        first = self.errors[0]
        if len(self.errors) == 1:
            raise bad_request(first["message"], field=first.get("field"), code=first["code"])
        message = f"{len(self.errors)} problems: " + " ".join(e["message"] for e in self.errors)
        body = {"error": {**first, "message": message, "errors": self.errors}}
        raise web.HTTPBadRequest(text=orjson.dumps(body).decode(), content_type="application/json")


def only(doc: dict[str, Any], allowed: set[str] | frozenset[str], where: str = "") -> None:
    extra = sorted(set(doc) - set(allowed))
    if extra:
        hint = f" (not settable {where})" if where else ""
        raise bad_request(f"Unknown or read-only field(s){hint}: {', '.join(extra)}.", field=extra[0],
                          code="unknown_field")


def require(doc: dict[str, Any], name: str) -> Any:
    if name not in doc or doc[name] is None:
        raise bad_request(f"{name}: required.", field=name)
    return doc[name]


def email(v: Any, field: str = "email") -> str:
    if not isinstance(v, str) or len(v) > 254 or not EMAIL.match(v.strip()):
        raise bad_request(f"{field}: must be an email address.", field=field)
    return v.strip().lower()


def name(v: Any, field: str = "name") -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME or any(ord(c) < 32 for c in v):
        raise bad_request(f"{field}: must be a string of at most {MAX_NAME} printable characters.", field=field)
    return v.strip()


def password(v: Any, field: str = "password") -> str:
    if not isinstance(v, str) or not MIN_PASSWORD_LEN <= len(v) <= MAX_PASSWORD_LEN:
        raise bad_request(f"{field}: must be a string of {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters.",
                          field=field)
    return v


def role(v: Any) -> str:
    if v not in ROLES:
        raise bad_request("role: must be 'admin' or 'user'.", field="role")
    return str(v)


def boolean(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise bad_request(f"{field}: must be true or false.", field=field)
    return v


def expires_at(v: Any, field: str = "expires_at") -> datetime | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request(f"{field}: must be an ISO 8601 time with a timezone, or null.", field=field)
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"{field}: must be an ISO 8601 time with a timezone, or null.", field=field) from None
    if t.tzinfo is None:
        raise bad_request(f"{field}: needs a timezone (e.g. 2030-01-01T00:00:00Z).", field=field)
    if t <= datetime.now(UTC):
        raise bad_request(f"{field}: must be in the future.", field=field)
    return t


def _str_list(v: Any, field: str, check: Any = None) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise bad_request(f"{field}: must be a list of at most {MAX_LIST} strings.", field=field)
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item or len(item) > 200:
            raise bad_request(f"{field}[{i}]: must be a non-empty string.", field=field)
        if check is not None:
            check(item, f"{field}[{i}]")
        out.append(item)
    return tuple(out)


def _cidr(item: str, field: str) -> None:
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise bad_request(f"{field}: not an IP network: {item!r}.", field=field.split("[")[0]) from None


def limits(v: Any, base: Limits | None = None, field: str = "limits") -> Limits:
    """A limits object; with ``base``, a merge patch (fields present are set, null removes)."""
    if not isinstance(v, dict):
        raise bad_request(f"{field}: must be an object.", field=field)
    problems = Problems()
    problems.check(only, v, LIMIT_FIELDS, f"in {field}")
    changes: dict[str, Any] = {}
    for key, val in v.items():
        if key in LIMIT_FIELDS:
            problems.check(_limit, changes, key, val, f"{field}.{key}")
    problems.raise_if_any()
    return dataclasses.replace(base or Limits(), **changes)


def _limit(changes: dict[str, Any], key: str, val: Any, f: str) -> None:
    """One field of a limits object into ``changes`` (400 naming it when invalid)."""
    if val is None:
        changes[key] = "total" if key == "budget_period" else None
    elif key == "models":
        changes[key] = _str_list(val, f)
    elif key == "allowed_ips":
        changes[key] = _str_list(val, f, _cidr)
    elif key in _INT_LIMITS:
        if isinstance(val, bool) or not isinstance(val, int) or not 0 < val <= MAX_INT_LIMIT:
            raise bad_request(f"{f}: must be a positive integer.", field=f)
        changes[key] = val
    elif key == "budget_usd":
        if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val) or val < 0:
            raise bad_request(f"{f}: must be a number >= 0.", field=f)
        changes[key] = float(val)
    elif key == "budget_period":
        if val not in ("day", "month", "total"):
            raise bad_request(f"{f}: must be 'day', 'month' or 'total'.", field=f)
        changes[key] = val


def within(key: Limits, user: Limits) -> None:
    """A user's own key may not be looser than the user's limits (400 naming every such field)."""
    problems = Problems()
    for f in (*_INT_LIMITS, "budget_usd"):
        cap, mine = getattr(user, f), getattr(key, f)
        if cap is not None and mine is not None and mine > cap:
            problems.note(bad_request(f"limits.{f}: {mine} is above your own limit of {cap}.", field=f"limits.{f}"))
    if user.models is not None and key.models is not None:
        for m in key.models:
            if not any(m == u or model_matches(u, m) for u in user.models):
                problems.note(bad_request(f"limits.models: {m!r} is not among your allowed models.",
                                          field="limits.models"))
    problems.raise_if_any()


def object_id(request: web.Request, what: str, param: str = "id") -> str:
    """The {id} path parameter as a UUID; anything else is simply not found."""
    raw = request.match_info[param]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise not_found(what) from None


def optional_uuid(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise bad_request(f"{name}: must be a UUID.", field=name) from None


def page(request: web.Request) -> tuple[int, tuple[datetime, str] | None]:
    """``limit`` (1..200, default 50) and the opaque ``cursor`` of the previous page."""
    raw = request.query.get("limit", str(DEFAULT_PAGE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise bad_request(f"limit: must be an integer from 1 to {MAX_PAGE}.", field="limit")
    cursor = request.query.get("cursor")
    after = None
    if cursor:
        try:
            ts, _, ident = base64.urlsafe_b64decode(cursor.encode() + b"==").decode().partition("|")
            after = (datetime.fromisoformat(ts), str(uuid.UUID(ident)))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise bad_request("cursor: not a cursor returned by this API.", field="cursor") from None
    return int(raw), after


def next_cursor(items: list[Any], limit: int) -> str | None:
    if len(items) < limit:
        return None
    last = items[-1]
    raw = f"{last.created_at.isoformat()}|{last.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def query_bool(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise bad_request(f"{name}: must be true or false.", field=name)
    return raw == "true"


def query_choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw not in choices:
        raise bad_request(f"{name}: must be one of {', '.join(choices)}.", field=name)
    return raw


def query_text(request: web.Request, name: str, max_len: int = 200) -> str | None:
    raw = request.query.get(name)
    if raw is not None and len(raw) > max_len:
        raise bad_request(f"{name}: at most {max_len} characters.", field=name)
    return raw or None
