"""Explain a neuron: show an explainer LLM its top training excerpts and read one short phrase back.

The prompt (prompts.explain_messages) lists the neuron's top excerpts of the *train* split, the
values scaled to 0..10 over the excerpts shown; nothing shown here is ever scored (the scored
excerpts come from other splits, see engine.store.SPLITS). `n` explanations are sampled per
neuron; the scorer keeps the best. A reply that is empty or a refusal is a failure of that
sample, recorded with what the explainer said; it is never turned into an explanation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from client import prompts
from client.request import Request
from client.results import LONE_SURROGATE


@dataclass
class ExplainOptions:
    """How to explain."""

    model: str
    """Explainer model."""
    excerpts: int = 5
    """Top excerpts of the train split shown to the explainer."""
    n: int = 1
    """Explanations sampled per neuron (the best by score is kept)."""
    temperature: float = 1.0
    """Sampling temperature of the explainer."""
    max_tokens: int = 60
    """Longest explanation, in tokens."""

    def to_json(self) -> dict:
        return {"model": self.model, "excerpts": self.excerpts, "n": self.n, "temperature": self.temperature,
                "max_tokens": self.max_tokens}


class NothingToExplain(Exception):
    """The neuron has no train excerpts, or never fires on them (a score would be undefined)."""

    def __init__(self, message: str, never_fires: bool):
        super().__init__(message)
        self.never_fires = never_fires


def explain_listing(record, opts: ExplainOptions) -> tuple[list[list[str]], list[list[int]]]:
    """(tokens, scaled values) of the excerpts shown for `record` (an engine.store.NeuronRecord)."""
    shown = record.split("train").top[: max(1, opts.excerpts)]
    if not shown:
        raise NothingToExplain("the neuron has no train excerpts (record with --top-k 4 or more)", never_fires=False)
    acts = [list(r.activations) for r in shown]
    if not any(a > 0 for excerpt in acts for a in excerpt):
        raise NothingToExplain("the neuron never fires on its top train excerpts (maximum activation "
                               f"{max(a for e in acts for a in e):.4g})", never_fires=True)
    return [list(r.tokens) for r in shown], prompts.scale(acts)


def explain_requests(tokens: list[list[str]], values: list[list[int]], opts: ExplainOptions) -> list[Request]:
    """One chat request per explanation sampled. Samples differ by `seed`, so that each is its own
    request (and its own entry in the durable store)."""
    messages = prompts.explain_messages(tokens, values)
    out = []
    for i in range(max(1, opts.n)):
        body = {"model": opts.model, "messages": messages, "temperature": opts.temperature,
                "max_tokens": opts.max_tokens}
        if opts.n > 1:
            body["seed"] = i
        out.append(Request(body, "chat"))
    return out


MAX_EXPLANATION_CHARS = 300
"""An explanation is cut to this many characters (docs/EXPLAIN.md): it is a short phrase, and what
a runaway reply would add could not help the simulator."""


class BadExplanation(Exception):
    """An explainer reply that is no explanation (empty, a refusal)."""


_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry\b|apologies|i apologi[sz]e|i cannot|i can'?t|i can ?not|i'?m (unable|not able)|"
    r"i am (unable|not able)|i won'?t|i will not|as an ai|unfortunately|i do(n'?t| not) (know|have enough|see)|"
    r"it is not possible|it'?s not possible|there is no (clear|obvious|discernible))", re.IGNORECASE)
_PREFIX = re.compile(
    r"^(?P<em>[*_]{0,2})(explanation|answer|phrase|the neuron responds to|this neuron responds to|"
    r"the neuron fires on|it responds to|responds to|it fires on)(?P=em)?\s*[:\-]?\s*(?P=em)?\s*", re.IGNORECASE)
"""A leading label, bare or in markdown emphasis: "Explanation:", "**Answer:**", "*Explanation*:"."""
_EMPHASIS = re.compile(r"^(\*\*|\*|__|_)(?=\S)(.+?)(?<=\S)\1$")


def _plain(text: str) -> str:
    """Drop markdown emphasis around the whole phrase (**x**, *x*, __x__, _x_), not inside it:
    "__init__ methods" stays as it is."""
    text = text.strip()
    m = _EMPHASIS.match(text)
    return m.group(2).strip() if m else text


def _unwrap(text: str) -> str:
    """Drop quotes around the whole phrase (not quotes inside it, as in: the token "cat")."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" and text[0] not in text[1:-1]:
        return text[1:-1].strip()
    return text


_THINK = re.compile(r"\s*<think>.*?(</think>\s*|$)", re.S)


def parse_explanation(reply: dict) -> str:
    """The explanation in a chat reply: its first non-empty line, without quotes, a leading label
    or a final period, cut to MAX_EXPLANATION_CHARS characters. Raises BadExplanation for an empty
    reply or a refusal."""
    try:
        choice = reply["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise BadExplanation("the reply has no message") from None
    refusal = message.get("refusal") if isinstance(message, dict) else None
    if refusal:
        raise BadExplanation(f"the explainer refused: {str(refusal)[:120]!r}")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
                          and isinstance(p.get("text"), str))
    if isinstance(content, str):
        # A reasoning model's thoughts (vLLM with R1 or Qwen3: "<think>...</think>" first) are no explanation.
        thought = _THINK.match(content)
        if thought:
            if not thought.group(1):
                raise BadExplanation("the reply is the explainer's reasoning, cut off before any explanation "
                                     "(raise --max-tokens)")
            content = content[thought.end():]
    if not isinstance(content, str) or not content.strip():
        raise BadExplanation("the explainer's reply is empty")
    lines = [ln for ln in content.splitlines() if ln.strip()]
    if choice.get("finish_reason") == "length" and len(lines) == 1 and not content.rstrip(" \t").endswith("\n"):
        raise BadExplanation(f"the explanation was cut off at --max-tokens: {content.strip()[:80]!r} "
                             "(raise --max-tokens)")
    # A lone surrogate ("\\ud800" in the JSON: half a character) cannot be written as UTF-8 nor sent
    # to a simulator: U+FFFD, as in a corpus.
    line = LONE_SURROGATE.sub("\ufffd", lines[0]).strip()
    if _REFUSAL.match(line):
        raise BadExplanation(f"the explainer refused: {line[:120]!r}")
    text = _unwrap(_plain(_PREFIX.sub("", _unwrap(_plain(line)))))
    text = _unwrap(text.rstrip("."))  # '"the token cat".': the quotes go too
    text = " ".join(text.rstrip(".").split())
    if not text:
        raise BadExplanation(f"the explainer's reply holds no explanation: {content.strip()[:120]!r}")
    return text[:MAX_EXPLANATION_CHARS]


@dataclass
class ExplainOutcome:
    """What became of explaining one neuron."""

    explanations: list[str] = field(default_factory=list)
    """The usable explanations (0..n)."""
    errors: list[str] = field(default_factory=list)
    """Why the others are not usable."""
    requests: list[str] = field(default_factory=list)
    """Keys of the requests, one per sample."""
    interrupted: bool = False
    """The run stopped before every sample came back (a rerun finishes it)."""


async def explain_neuron(client, tokens: list[list[str]], values: list[list[int]], opts: ExplainOptions) -> ExplainOutcome:
    """Ask for `opts.n` explanations of the listing (tokens, values) through `client`."""
    import asyncio

    out = ExplainOutcome()
    requests = explain_requests(tokens, values, opts)
    out.requests = [r.key for r in requests]
    results = await asyncio.gather(*(client.submit(r) for r in requests))
    for result in results:
        if result.error is not None:
            if result.error.stopped:
                out.interrupted = True
            out.errors.append(f"request failed: {result.error}")
            continue
        try:
            out.explanations.append(parse_explanation(result.response))
        except BadExplanation as exc:
            out.errors.append(str(exc))
    return out
