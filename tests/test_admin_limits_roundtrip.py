"""Limits read the same in both modes: API JSON -> validation -> JSONB -> Principal limits."""

from __future__ import annotations

import dataclasses

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.admin.validation import limits as parse_limits
from gateway.config import Limits
from gateway.stores.limits_codec import limits_from_json, limits_to_json

_pos = st.one_of(st.none(), st.integers(min_value=1, max_value=1_000_000_000))
_names = st.one_of(st.none(), st.lists(st.text("abcdefgh-*.0123456789", min_size=1, max_size=20), max_size=5)
                   .map(tuple))
_ips = st.one_of(st.none(), st.lists(st.sampled_from(["10.0.0.0/8", "192.168.1.1/32", "::1/128", "0.0.0.0/0"]),
                                     max_size=3).map(tuple))
limits_strategy = st.builds(
    Limits, models=_names, rpm=_pos, tpm=_pos, max_concurrency=_pos, max_tokens=_pos,
    budget_usd=st.one_of(st.none(), st.floats(min_value=0, max_value=1e6, allow_nan=False)),
    budget_period=st.sampled_from(["day", "month", "total"]), allowed_ips=_ips,
)


@given(limits_strategy)
def test_limits_survive_api_validation_and_the_jsonb_column(limits: Limits) -> None:
    """Whatever the API accepts is stored and read back as the same config.Limits."""
    doc = orjson.loads(orjson.dumps(limits_to_json(limits)))  # as a client would send it
    parsed = parse_limits(doc)
    stored = orjson.loads(orjson.dumps(limits_to_json(parsed)))  # through the JSONB column
    back = limits_from_json(stored)
    # budget_period only means something next to a budget; alone it is dropped (back to the default).
    expected = limits if limits.budget_usd is not None else dataclasses.replace(limits, budget_period="total")
    assert expected == back


@given(limits_strategy, limits_strategy)
def test_a_limits_patch_sets_given_fields_and_null_removes(base: Limits, new: Limits) -> None:
    """PATCH semantics: fields present replace, null clears, absent fields stay."""
    patch = {"rpm": new.rpm, "models": list(new.models) if new.models is not None else None}
    merged = parse_limits(patch, base=base)
    assert new.rpm == merged.rpm
    assert new.models == merged.models
    assert base.tpm == merged.tpm
    assert base.allowed_ips == merged.allowed_ips
