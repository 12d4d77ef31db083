"""Prices per model (names and globs) and cost in integer micro-dollars.

A price of P USD per million tokens is P micro-dollars per token; prices are
kept as integer pico-dollars per token (P * 1e6) so that the arithmetic is
exact, and a cost is rounded up to the next micro-dollar (never free).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.accounting.usage import Usage
from gateway.config import Config, ConfigError, model_matches


@dataclass(frozen=True, slots=True)
class Price:
    input: int  # pico-dollars per token == micro-dollars per million tokens
    output: int
    cache_write: int
    cache_read: int

    def cost_micros(self, u: Usage) -> int:
        pico = (
            u.input_tokens * self.input
            + u.output_tokens * self.output
            + u.cache_write_tokens * self.cache_write
            + u.cache_read_tokens * self.cache_read
        )
        return -(-pico // 1_000_000)

    def worst_case_micros(self, input_tokens: int, max_output: int) -> int:
        per_in = max(self.input, self.cache_write)
        return -(-(input_tokens * per_in + max_output * self.output) // 1_000_000)


def _pico(v: object, path: str, errors: list[str]) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or not math.isfinite(v):
        errors.append(f"{path}: must be a non-negative number (USD per million tokens)")
        return 0
    return round(v * 1_000_000)


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
            data = tomllib.loads(text)
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
            default = Price(
                input=round(cfg.pricing.default_input_per_mtok * 1_000_000),
                output=round(cfg.pricing.default_output_per_mtok * 1_000_000),
                cache_write=round(cfg.pricing.default_input_per_mtok * 1_000_000),
                cache_read=round(cfg.pricing.default_input_per_mtok * 1_000_000),
            )
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError([f"pricing.file: cannot read {path}: {exc.strerror}"]) from None
        return cls.from_toml(text, default, source=str(path))
