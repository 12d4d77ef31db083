"""Prices per model (names and globs) and cost in integer pico-dollars, exactly.

A price of P USD per million tokens is P x 10^6 pico-dollars per token, kept
as an integer (read from the TOML as the decimal written, never through float
arithmetic; a price finer than one pico-dollar per token is a config error).
A cost is tokens x price: an integer, never rounded (``accounting/money.py``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from gateway.accounting.money import per_mtok_to_pico_per_token
from gateway.accounting.usage import Usage
from gateway.config import Config, ConfigError, model_matches


@dataclass(frozen=True, slots=True)
class Price:
    input: int  # pico-dollars per token (== micro-dollars per million tokens)
    output: int
    cache_write: int
    cache_read: int

    def cost_pico(self, u: Usage) -> int:
        """The exact cost of a usage, in pico-dollars."""
        return (
            u.input_tokens * self.input
            + u.output_tokens * self.output
            + u.cache_write_tokens * self.cache_write
            + u.cache_read_tokens * self.cache_read
        )

    def worst_case_pico(self, input_tokens: int, max_output: int) -> int:
        """The most a request of ``input_tokens`` and up to ``max_output`` output tokens can cost."""
        return input_tokens * max(self.input, self.cache_write) + max_output * self.output


def _pico(v: object, path: str, errors: list[str]) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float | Decimal):
        errors.append(f"{path}: must be a non-negative number (USD per million tokens)")
        return 0
    try:
        pico = per_mtok_to_pico_per_token(v)
    except ValueError as exc:
        errors.append(f"{path}: {exc}")
        return 0
    if pico < 0:
        errors.append(f"{path}: must be a non-negative number (USD per million tokens)")
        return 0
    return pico


class PriceTable:
    def __init__(self, exact: dict[str, Price], globs: list[tuple[str, Price]], default: Price | None) -> None:
        self._exact = exact
        self._globs = globs
        self.default = default
        self._cache: dict[str, Price | None] = {}

    def exact_models(self) -> list[str]:
        """Model names priced by exact name (for /v1/models listings)."""
        return list(self._exact)

    def lookup(self, model: str) -> Price | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._exact.get(model)
        if price is None:
            for pattern, p in self._globs:
                if model_matches(pattern, model):
                    price = p
                    break
        if len(self._cache) < 10_000:
            self._cache[model] = price
        return price

    def refuses(self, model: str) -> bool:
        """``pricing.unknown_model = "refuse"`` and no price for this model: it must not be served."""
        return self.default is None and self.lookup(model) is None

    @classmethod
    def from_toml(cls, text: str, default: Price | None, source: str = "prices.toml") -> PriceTable:
        errors: list[str] = []
        try:
            data = tomllib.loads(text, parse_float=Decimal)  # prices exactly as written
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: TOML syntax: {exc}"]) from None
        exact: dict[str, Price] = {}
        globs: list[tuple[str, Price]] = []
        models = data.get("models", {})
        for key in data:
            if key != "models":
                errors.append(f"{source}: {key}: unknown key")
        if not isinstance(models, dict):
            raise ConfigError([f"{source}: models: must be a table"])
        for name, entry in models.items():
            p = f"{source}: models.{name!r}"
            if not isinstance(entry, dict):
                errors.append(f"{p}: must be a table")
                continue
            for k in entry:
                if k not in ("input", "output", "cache_write", "cache_read"):
                    errors.append(f"{p}.{k}: unknown key")
            if "input" not in entry or "output" not in entry:
                errors.append(f"{p}: input and output prices are required")
            inp = _pico(entry.get("input", 0), f"{p}.input", errors)
            price = Price(
                input=inp,
                output=_pico(entry.get("output", 0), f"{p}.output", errors),
                cache_write=_pico(entry.get("cache_write", entry.get("input", 0)), f"{p}.cache_write", errors),
                cache_read=_pico(entry.get("cache_read", entry.get("input", 0)), f"{p}.cache_read", errors),
            )
            if any(c in name for c in "*?["):
                globs.append((name, price))
            else:
                exact[name] = price
        if errors:
            raise ConfigError(errors)
        # Most specific glob first: longer literal prefix wins.
        globs.sort(key=lambda g: -len(g[0].split("*")[0]))
        return cls(exact, globs, default)

    @classmethod
    def load(cls, cfg: Config) -> PriceTable:
        path = Path(cfg.pricing.file)
        if not path.is_absolute():
            path = cfg.config_dir / path
        default = None
        if cfg.pricing.unknown_model == "default":
            errors: list[str] = []
            inp = _pico(cfg.pricing.default_input_per_mtok, "pricing.default_input_per_mtok", errors)
            out = _pico(cfg.pricing.default_output_per_mtok, "pricing.default_output_per_mtok", errors)
            if errors:
                raise ConfigError(errors)
            default = Price(input=inp, output=out, cache_write=inp, cache_read=inp)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError([f"pricing.file: cannot read {path}: {exc.strerror}"]) from None
        return cls.from_toml(text, default, source=str(path))
