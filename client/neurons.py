"""Which neurons a run covers, and what it will cost before it starts.

Selections: `--layers` and `--neurons` take "all" or ranges such as "0-3,7" (inclusive), checked
against the store; `--ids FILE` takes one `LAYER:NEURON` per line (blank lines and # comments
ignored). Out-of-range ids, and an empty selection or item ("", "0,", "0,,1"), are refused with one
line, before anything is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError


def span(upper: int, what: str) -> str:
    """The valid indices in words: '0..71', or 'no neurons' for an empty layer."""
    return f"{what}s 0..{upper - 1}" if upper > 0 else f"no {what}s"


def parse_ranges(spec: str, upper: int, what: str, flag: str, where: str = "the store has") -> list[int]:
    """'all' or 'A-B,C,...' -> sorted distinct ints in [0, upper). An empty selection or an empty
    item ('', '0,', '0,,1') is refused: it is a mistake, never a way to say 'all'."""
    if spec is None or not spec.strip():
        raise UserError(f"{flag} is empty: give 'all' or a list of {what}s like 0-3,7")
    spec = spec.strip()
    if spec.lower() == "all":
        return list(range(upper))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise UserError(f"{flag} '{spec}' has an empty item: give a list of {what}s like 0-3,7 "
                            "(no leading, trailing or doubled commas)")
        m = re.fullmatch(r"(-?[0-9]+)(?:\s*-\s*(-?[0-9]+))?", part)
        if not m:
            raise UserError(f"{flag} '{spec}' is not 'all' or a list of {what}s like 0-3,7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"{flag} '{part}': the range ends before it starts")
        values = range(lo, hi + 1)
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise UserError(f"{flag}: {what} {bad} out of range: {where} {span(upper, what)}")
        out.update(values)
    if not out:
        raise UserError(f"{flag} '{spec}' selects no {what}s")
    return sorted(out)


def read_ids(path: str, n_neurons: list[int]) -> list[tuple[int, int]]:
    """(layer, neuron) pairs of an ids file, in file order, duplicates dropped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--ids file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --ids file {path}: {exc}") from None
    seen: set[tuple[int, int]] = set()
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            layer, neuron = int(parts[0]), int(parts[1])
        except ValueError:
            raise UserError(f"{path} line {lineno}: {line[:40]!r} is not LAYER:NEURON (e.g. 3:117)") from None
        if not 0 <= layer < len(n_neurons):
            raise UserError(f"{path} line {lineno}: layer {layer} out of range: the store has layers "
                            f"0..{len(n_neurons) - 1}")
        if not 0 <= neuron < n_neurons[layer]:
            raise UserError(f"{path} line {lineno}: neuron {neuron} out of range: layer {layer} has "
                            f"{span(n_neurons[layer], 'neuron')}")
        if (layer, neuron) not in seen:
            seen.add((layer, neuron))
            out.append((layer, neuron))
    if not out:
        raise UserError(f"--ids file {path} lists no neurons (one LAYER:NEURON per line)")
    return out


def select(n_neurons: list[int], layers: str | None = None, neurons: str | None = None, ids: str | None = None,
           limit: int | None = None) -> list[tuple[int, int]]:
    """The (layer, neuron) pairs selected, layer-major. Default: every neuron of every layer."""
    # None is "not given"; an empty string was given and is refused by the parsers.
    if ids is not None and (layers is not None or neurons is not None):
        raise UserError("--ids cannot be combined with --layers/--neurons: put every id in the file")
    if ids is not None:
        if not ids.strip():
            raise UserError("--ids is empty: give a file of LAYER:NEURON lines")
        out = read_ids(ids, n_neurons)
    else:
        layer_list = parse_ranges("all" if layers is None else layers, len(n_neurons), "layer", "--layers")
        out = []
        for layer in layer_list:
            for index in parse_ranges("all" if neurons is None else neurons, n_neurons[layer], "neuron", "--neurons",
                                      f"layer {layer} has"):
                out.append((layer, index))
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, not {limit}")
        out = out[:limit]
    return out


def spread(items: list, k: int) -> list:
    """Up to k items evenly spread over the list (a sample for estimates)."""
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


# ---------------------------------------------------------------------------------------------
# Cost


@dataclass
class Estimate:
    """What a run will send."""

    stage: str
    """explain or simulate."""
    model: str
    """The model the requests go to."""
    neurons: int
    """Neurons that need requests."""
    requests: int
    """Requests (retries of malformed replies not counted)."""
    prompt_tokens: float
    """Prompt tokens, estimated at 4 characters a token."""
    completion_tokens: float
    """Completion tokens at most (max_tokens of each request)."""
    cost: float | None
    """USD by the price table; None when the model has no price."""

    def text(self) -> str:
        from client.progress import human, money

        what = (f"{self.stage}: {self.neurons:,} neurons -> {self.requests:,} requests to {self.model}, "
                f"~{human(self.prompt_tokens)} prompt tokens + <= {human(self.completion_tokens)} completion tokens")
        if self.cost is None:
            return what + f"; cost unknown ({self.model} has no price: add it with --prices)"
        return what + f"; estimated cost {money(self.cost)} (prompts at ~4 characters a token)"


def estimate(stage: str, model: str, neurons: int, sample_bodies: list[tuple[str, dict]], per_neuron: float,
             prices) -> Estimate:
    """Extrapolate from the request bodies of a sample of neurons (kind, body) that stand for
    `per_neuron` requests each (on average) to `neurons` neurons."""
    from client.request import Usage, max_completion_tokens, prompt_chars

    if not sample_bodies or neurons == 0:
        return Estimate(stage, model, neurons, 0, 0, 0, 0.0 if prices.find(model) else None)
    chars = sum(prompt_chars(kind, body) for kind, body in sample_bodies) / len(sample_bodies)
    overhead = sum(3 + 4 * len(body.get("messages") or ()) if kind == "chat" else 1 for kind, body in sample_bodies) / len(sample_bodies)
    completion = sum(max_completion_tokens(body) or 16 for _, body in sample_bodies) / len(sample_bodies)
    requests = round(neurons * per_neuron)
    p = requests * (chars / 4 + overhead)
    c = requests * completion
    cost = prices.cost(model, Usage(prompt_tokens=int(p), completion_tokens=int(c)))
    return Estimate(stage, model, neurons, requests, p, c, cost)
