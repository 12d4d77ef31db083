"""Tags for cost attribution: ``x-gateway-tags: project=search,env=prod``.

A request's tags are its key's default tags, overridden by the body's
``metadata`` entries (OpenAI: entries whose names are allow-listed;
Anthropic: ``metadata.user_id`` as ``end_user`` when that name is allowed),
overridden by the header.  Names and values come from a safe alphabet, at
most ``max_per_request`` (<= 10) in all, names from ``[tags] allowed`` when
that list is set.  A bad tag is the caller's error (400 in the path's dialect).

Tags are stored with the usage record (``usage_ledger.tags``) and reported
on; they never become a metric label except the names configured in
``[tags] metric_labels``, each with a closed set of values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.errors import ANTHROPIC, ErrorKind, GatewayError
from gateway.governance_config import TAG_NAME, TagsConfig

HEADER = "x-gateway-tags"
TAG_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,64}$")
MAX_HEADER_LEN = 2048
OTHER = "other"

Tags = dict[str, str]


class TagError(ValueError):
    """A tag that breaks the rules; the message names it (never echoes more than the tag)."""


def _clip(s: str) -> str:
    return s if len(s) <= 40 else s[:40] + "..."


class TagRules:
    """Validation shared by requests and the admin API (key default tags)."""

    def __init__(self, cfg: TagsConfig) -> None:
        self.allowed = frozenset(cfg.allowed)
        self.max = cfg.max_per_request

    def name(self, name: str, where: str) -> None:
        if not TAG_NAME.match(name):
            raise TagError(f"{where}: {_clip(name)!r} is not a tag name (a-z first, then a-z 0-9 _ . -, "
                           "at most 32 characters).")
        if self.allowed and name not in self.allowed:
            raise TagError(f"{where}: tag {name!r} is not allowed on this gateway (allowed: "
                           f"{', '.join(sorted(self.allowed))}).")

    def value(self, name: str, value: Any, where: str) -> str:
        if not isinstance(value, str) or not TAG_VALUE.match(value):
            shown = _clip(value) if isinstance(value, str) else type(value).__name__
            raise TagError(f"{where}: the value of tag {name!r} ({shown!r}) must be 1 to 64 characters from "
                           "A-Z a-z 0-9 _ . : / @ + -.")
        return value

    def mapping(self, doc: Any, where: str) -> Tags:
        """A JSON object of tags (key default tags in the admin API)."""
        if not isinstance(doc, dict):
            raise TagError(f"{where}: must be an object of tag names to values.")
        out: Tags = {}
        for k, val in doc.items():
            self.name(k, where)
            out[k] = self.value(k, val, where)
        self.count(out, where)
        return out

    def count(self, tags: Mapping[str, str], where: str) -> None:
        if len(tags) > self.max:
            raise TagError(f"{where}: at most {self.max} tags per request, got {len(tags)}.")

    def header(self, raw: str) -> Tags:
        if len(raw) > MAX_HEADER_LEN:
            raise TagError(f"{HEADER}: longer than {MAX_HEADER_LEN} characters.")
        out: Tags = {}
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not eq:
                raise TagError(f"{HEADER}: {_clip(part)!r} is not name=value.")
            self.name(name, HEADER)
            if name in out:
                raise TagError(f"{HEADER}: tag {name!r} given twice.")
            out[name] = self.value(name, value, HEADER)
            if len(out) > self.max:
                raise TagError(f"{HEADER}: at most {self.max} tags per request.")
        return out


class TagPolicy:
    """Per gateway: reads a request's tags (hot path) and counts allow-listed ones in metrics."""

    def __init__(self, cfg: TagsConfig, registry: CollectorRegistry | None = None,
                 *, metrics_enabled: bool = True) -> None:
        self.rules = TagRules(cfg)
        self.from_metadata = cfg.from_metadata and bool(cfg.allowed)
        self.end_user = "end_user" in self.rules.allowed
        self.metric_values = {name: frozenset(values) for name, values in cfg.metric_labels.items()}
        self.cost: Any = None
        self.requests: Any = None
        if self.metric_values and metrics_enabled:
            kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
            self.cost = Counter("gateway_tagged_cost_usd",
                                "Cost by allow-listed tag (tags.metric_labels); other values count as 'other'.",
                                ["tag", "value"], **kw)
            self.requests = Counter("gateway_tagged_requests",
                                    "Requests by allow-listed tag (tags.metric_labels).", ["tag", "value"], **kw)

    def for_request(self, header: str | None, doc: Mapping[str, Any], dialect: str,
                    defaults: Iterable[tuple[str, str]] | None) -> Tags | None:
        """The request's tags, or None when it has none; raises GatewayError(400) for a bad one."""
        meta = doc.get("metadata") if self.from_metadata else None
        if header is None and not defaults and not meta:
            return None
        try:
            tags: Tags = dict(defaults) if defaults else {}
            if isinstance(meta, dict):
                tags.update(self._metadata(meta, dialect))
            if header is not None:
                tags.update(self.rules.header(header))
            self.rules.count(tags, "tags")
        except TagError as exc:
            raise GatewayError(ErrorKind.INVALID_REQUEST, str(exc)) from None
        return tags or None

    def _metadata(self, meta: Mapping[str, Any], dialect: str) -> Tags:
        if dialect == ANTHROPIC:
            uid = meta.get("user_id")
            if self.end_user and uid is not None:
                return {"end_user": self.rules.value("end_user", uid, "metadata.user_id")}
            return {}
        return {k: self.rules.value(k, v, f"metadata.{k}") for k, v in meta.items() if k in self.rules.allowed}

    def observe(self, tags: Mapping[str, str], cost_pico: int) -> None:
        """Count an allow-listed tag's requests and cost (off by default; bounded label values)."""
        if self.cost is None:
            return
        for name, values in self.metric_values.items():
            value = tags.get(name)
            if value is None:
                continue
            label = value if value in values else OTHER
            self.requests.labels(name, label).inc()
            if cost_pico:
                self.cost.labels(name, label).inc(cost_pico / 1e12)  # a Prometheus float: display only
