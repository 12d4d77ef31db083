"""The price table: exact integer pico-dollars, names and globs, every validation error at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.accounting.pricing import Price, PriceTable
from gateway.accounting.usage import Usage
from gateway.config import ConfigError

PRICES = Path(__file__).resolve().parent.parent / "config" / "prices.toml"

TABLE = PriceTable.from_toml(
    """
    [models."claude-sonnet-4-*"]
    input = 3.0
    output = 15.0
    cache_write = 3.75
    cache_read = 0.30

    [models."gpt-4o"]
    input = 2.50
    output = 10.0

    [models."gpt-4o-*"]
    input = 1.0
    output = 2.0

    [models."gpt-4o-mini"]
    input = 0.15
    output = 0.60

    [models."gpt-*"]
    input = 9.0
    output = 9.0
    """,
    default=None,
)


def test_one_million_tokens_cost_exactly_the_listed_price():
    p = TABLE.lookup("claude-sonnet-4-5-20250929")
    assert p is not None
    assert 3 * 10**12 == p.cost_pico(Usage(input_tokens=1_000_000))
    assert 15 * 10**12 == p.cost_pico(Usage(output_tokens=1_000_000))
    assert 3_750_000_000_000 == p.cost_pico(Usage(cache_write_tokens=1_000_000))
    assert 300_000_000_000 == p.cost_pico(Usage(cache_read_tokens=1_000_000))
    assert (3 + 15 + 3.75 + 0.3) * 10**12 == p.cost_pico(Usage(1_000_000, 1_000_000, 1_000_000, 1_000_000))


def test_a_fraction_of_a_micro_dollar_is_kept_exactly_never_rounded():
    p = TABLE.lookup("claude-sonnet-4-x")
    assert p is not None
    assert 300_000 == p.cost_pico(Usage(cache_read_tokens=1))  # 0.3 micro-dollars
    assert 0 == p.cost_pico(Usage())


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=50))
def test_costs_are_exact_integers_the_sum_of_parts_never_drifts(tokens):
    """Integer pico-dollar prices: the cost of n tokens is exactly n * price, whatever the split."""
    p = Price(input=3_000_000, output=15_000_000, cache_write=3_750_000, cache_read=300_000)
    total = sum(tokens)
    assert total * 3_000_000 == p.cost_pico(Usage(input_tokens=total))
    assert sum(p.cost_pico(Usage(input_tokens=t)) for t in tokens) == total * 3_000_000


@pytest.mark.parametrize(("model", "expected_input"), [
    ("gpt-4o", 2_500_000),  # exact name before any glob
    ("gpt-4o-mini", 150_000),  # exact name before a matching glob
    ("gpt-4o-2024-11-20", 1_000_000),  # longer literal prefix wins: gpt-4o-* over gpt-*
    ("gpt-5", 9_000_000),
    ("claude-sonnet-4-5", 3_000_000),
])
def test_exact_names_win_then_the_most_specific_glob(model, expected_input):
    p = TABLE.lookup(model)
    assert p is not None
    assert expected_input == p.input


def test_an_unpriced_model_is_none_and_refused_only_without_a_default():
    assert TABLE.lookup("mystery") is None
    assert TABLE.refuses("mystery") is True
    assert TABLE.refuses("gpt-4o") is False
    with_default = PriceTable.from_toml("", default=Price(1, 1, 1, 1))
    assert with_default.refuses("mystery") is False


def test_cache_prices_default_to_the_input_price():
    t = PriceTable.from_toml('[models.m]\ninput = 2.0\noutput = 4.0\n', default=None)
    assert Price(2_000_000, 4_000_000, 2_000_000, 2_000_000) == t.lookup("m")


def test_every_validation_error_is_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        PriceTable.from_toml(
            """
            currency = "EUR"
            [models.a]
            input = -1
            output = "cheap"
            [models.b]
            input = 1.0
            colour = 2
            [models.c]
            output = 1.0
            """,
            default=None,
            source="p.toml",
        )
    text = "\n".join(exc.value.errors)
    for fragment in ("currency: unknown key", "models.'a'.input", "models.'a'.output",
                     "models.'b'.colour: unknown key", "models.'b': input and output prices are required",
                     "models.'c': input and output prices are required"):
        assert fragment in text
    with pytest.raises(ConfigError, match="TOML syntax"):
        PriceTable.from_toml("[models\n", default=None)


def test_the_shipped_price_table_loads_and_prices_current_models():
    t = PriceTable.from_toml(PRICES.read_text(), default=None)
    for model in ("claude-opus-4-1-20250805", "claude-sonnet-4-5-20250929", "claude-haiku-4-5", "gpt-4o",
                  "gpt-4o-mini", "gpt-4.1", "gpt-5", "o3", "text-embedding-3-small", "demo-claude"):
        assert t.lookup(model) is not None, model
