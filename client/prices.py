"""What requests cost: a price table in USD per million tokens that the user can extend.

The defaults are list prices of common OpenAI models (standard tier, checked 2025); providers change
them, and self-hosted models cost what the user says. Extend or override with a JSON file
(--prices FILE or NEURONATLAS_PRICES):

    {"my-model": {"input": 0.2, "output": 0.8}, "gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}}

A model matches its own entry, or else the longest entry it extends with a dash (a dated snapshot
such as gpt-4o-mini-2024-07-18 is priced as gpt-4o-mini).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from client.request import Usage


@dataclass(frozen=True)
class Price:
    """USD per million tokens of one model."""

    input: float
    """Prompt tokens."""
    output: float
    """Completion tokens."""
    cached_input: float | None = None
    """Prompt tokens served from the provider's prompt cache (None: billed as input)."""

    def cost(self, usage: Usage) -> float:
        cached = min(usage.cached_tokens, usage.prompt_tokens) if self.cached_input is not None else 0
        return (
            (usage.prompt_tokens - cached) * self.input
            + cached * (self.cached_input or 0.0)
            + usage.completion_tokens * self.output
        ) / 1e6


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00, 0.125),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-3.5-turbo-instruct": Price(1.50, 2.00),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "davinci-002": Price(2.00, 2.00),
    "babbage-002": Price(0.40, 0.40),
}


class PriceTable:
    """Looks up a model's price; cost() is None for a model without one."""

    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)
        self._cache: dict[str, Price | None] = {}

    @classmethod
    def load(cls, path: str | None = None) -> "PriceTable":
        """The defaults, extended by the JSON file at `path` (or $NEURONATLAS_PRICES)."""
        table = cls()
        path = path or os.environ.get("NEURONATLAS_PRICES")
        if path:
            table.update_from_file(path)
        return table

    def update_from_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read the price file {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"the price file {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f'the price file {path} must map model names to '
                             f'{{"input": USD, "output": USD}} per 1M tokens')
        for model, entry in data.items():
            if not isinstance(entry, dict) or not {"input", "output"} <= entry.keys():
                raise ValueError(f'price of {model!r} in {path} needs "input" and "output" (USD per 1M tokens)')
            try:
                values = [float(entry["input"]), float(entry["output"]),
                          None if entry.get("cached_input") is None else float(entry["cached_input"])]
                if isinstance(entry["input"], bool) or isinstance(entry["output"], bool):
                    raise TypeError
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"price of {model!r} in {path} must be numbers (USD per 1M tokens)") from None
            if not all(v is None or (math.isfinite(v) and v >= 0) for v in values):
                # A NaN or negative price would make every cost, and the --max-cost check, meaningless.
                raise ValueError(f"price of {model!r} in {path} must be finite and not negative "
                                 f"(USD per 1M tokens), not {entry}")
            self.prices[model] = Price(*values)
        self._cache.clear()

    def find(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model not in self._cache:
            best = self.prices.get(model)
            if best is None:
                matches = [name for name in self.prices if model.startswith(name + "-")]
                best = self.prices[max(matches, key=len)] if matches else None
            self._cache[model] = best
        return self._cache[model]

    def cost(self, model: str | None, usage: Usage) -> float | None:
        price = self.find(model)
        return None if price is None else price.cost(usage)
