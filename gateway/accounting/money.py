"""Money as exact integers: pico-dollars (10^-12 USD).

Every price in ``config/prices.toml`` is USD per million tokens; one token of
a price P costs P x 10^6 pico-dollars, a whole number for any price with at
most six decimals (the price table refuses finer ones).  So a request's cost
is an integer, any sum of costs is exactly tokens x price, and nothing rounds
until a report formats USD (``usd``, exact too).

A bigint holds ~9.2 million USD of pico-dollars: enough for one request or
one budget period's counter; sums over many records use Postgres ``numeric``
and Python ints.  ``micros_ceil`` gives the old ``cost_micros`` columns kept
for the previous release.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

PICO_PER_USD = 10**12
PICO_PER_MICRO = 10**6


def exact_decimal(value: object) -> Fraction:
    """A config number as the decimal it was written as (a float's shortest repr: 0.02 -> 1/50), exactly."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("not a number")
    if isinstance(value, float | Decimal) and not math.isfinite(value):
        raise ValueError("not a finite number")
    try:
        return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError("not a number") from None


def usd_to_pico(value: object) -> int:
    """USD (as written) -> pico-dollars, exactly; ValueError when below one pico-dollar's precision."""
    p = exact_decimal(value) * PICO_PER_USD
    if p.denominator != 1:
        raise ValueError("finer than a pico-dollar")
    return int(p)


def usd_to_pico_floor(value: object) -> int:
    """USD -> pico-dollars, dropping anything finer than a pico-dollar (budget limits)."""
    return math.floor(exact_decimal(value) * PICO_PER_USD)


def per_mtok_to_pico_per_token(value: object) -> int:
    """A price in USD per million tokens -> pico-dollars per token; ValueError when not whole."""
    p = exact_decimal(value) * PICO_PER_USD / 1_000_000
    if p.denominator != 1:
        raise ValueError("finer than one pico-dollar per token (at most 6 decimals per million tokens)")
    return int(p)


def usd(pico: int) -> str:
    """Pico-dollars as an exact USD decimal string: 200000 -> "0.0000002", 10**12 -> "1"."""
    sign = "-" if pico < 0 else ""
    whole, frac = divmod(abs(int(pico)), PICO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}." + f"{frac:012d}".rstrip("0")


def micros_ceil(pico: int) -> int:
    """The previous release's unit: whole micro-dollars, rounded up (never free)."""
    return -(-pico // PICO_PER_MICRO)
