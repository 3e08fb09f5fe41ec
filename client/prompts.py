"""Every prompt that explain and simulate send, in one versioned place.

A prompt change that could move a score is a new PROMPT_VERSION: results are stored under
(explainer model, simulator model, prompt version), so two wordings never mix in one group. The
wording and the few-shot examples are ours (not OpenAI's); the method is the paper's:

* **Explain.** Excerpts are listed one token per line, `token<TAB>value`, with the value the
  activation scaled to an integer 0..10 (`floor(10 * relu(a) / max)` over the excerpts shown). When
  fewer than a fifth of the listed values are nonzero, the listing is repeated with the zeros
  dropped, so that a sparse neuron's few hits are not lost in a sea of zeros.
* **Simulate, all at once (completions with prompt logprobs).** The same listing with the slot
  marker `?` in place of every value. The value of token i is read from the simulator's predicted
  distribution at the position of its marker: the model has seen the token and the tab before
  that position, and, through the few-shot example, expects a number there. The marker is a
  punctuation character right after a tab, so every common tokenizer (GPT-2's, cl100k-like ones,
  SentencePiece) starts a new token at it; where one merges the tab into the marker's token anyway,
  the simulator's alternatives carry the tab as a prefix, which simulate.py strips. Alignment is by
  character offset, computed here, never by counting the simulator's tokens.
* **Simulate, written out (chat).** Tokens are numbered, one per line; the simulator answers one
  line per token, `number<TAB>value`. The value starts right after a tab, so it is a fresh token
  for the simulator; the numbers make a reply that skips or repeats a line detectable.

Token strings are shown with control characters escaped (`\\n`, `\\t`, `\\r`, `\\xNN`), so that one
subject token is always exactly one line whatever it contains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROMPT_VERSION = "v1"
"""The version of every prompt below; part of the results key."""

SLOT_MARKER = "?"
"""Stands for a value to predict in the all-at-once simulation prompt."""

OPEN, CLOSE = "<<<", ">>>"
"""Lines that open and close one excerpt's listing."""

SPARSE_FRACTION = 0.2
"""A listing with fewer nonzero values than this fraction is repeated without its zeros."""


def show_token(token: str) -> str:
    """A token as one line of a listing: control characters escaped, everything else as is."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127 or ch in "\u2028\u2029\x85":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def scale(activations: list[list[float]]) -> list[list[int]]:
    """Activations of the excerpts shown, as integers 0..10: floor(10 * relu(a) / max), where max is
    the largest activation over all of them (all zeros when nothing is positive)."""
    top = max((a for acts in activations for a in acts), default=0.0)
    if not (top > 0) or not math.isfinite(top):
        return [[0] * len(acts) for acts in activations]
    return [[_tenths(a, top) for a in acts] for acts in activations]


def _tenths(a: float, top: float) -> int:
    a = max(a, 0.0)
    v = 10 * a / top if a < 1e300 else 10 * (a / top)  # 10 * a overflows near the float64 maximum
    return min(10, max(0, math.floor(v)))


def is_sparse(values: list[list[int]]) -> bool:
    n = sum(len(v) for v in values)
    nonzero = sum(1 for v in values for x in v if x > 0)
    return n > 0 and nonzero < SPARSE_FRACTION * n


def listing(tokens: list[list[str]], values: list[list[int]], drop_zeros: bool = False) -> str:
    """Excerpts as OPEN / `token<TAB>value` lines / CLOSE blocks."""
    blocks = []
    for toks, vals in zip(tokens, values):
        lines = [f"{show_token(t)}\t{v}" for t, v in zip(toks, vals) if v > 0 or not drop_zeros]
        blocks.append("\n".join([OPEN, *lines, CLOSE]))
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Explain

EXPLAIN_SYSTEM = (
    "You are helping to map the neurons of a language model. Each neuron responds to some feature of "
    "the text the model reads. You will see short excerpts of text split into tokens, one token per "
    "line, each followed by a tab and the neuron's activation on that token, from 0 (silent) to 10 (its "
    "strongest). Control characters inside tokens are written as \\n, \\t and so on. Work out what the "
    "neuron responds to and describe it in one short phrase of a few words. Describe the pattern, not "
    "every token, and do not explain your reasoning."
)

EXPLAIN_QUESTION = "What does this neuron respond to? Answer with the phrase only."
SPARSE_HEADER = "The same activations with the zeros left out:"


@dataclass(frozen=True)
class Example:
    """A made-up neuron for the few-shot part of a prompt."""

    explanation: str
    """What it responds to."""
    tokens: tuple[tuple[str, ...], ...]
    """Excerpts, as token strings."""
    values: tuple[tuple[int, ...], ...]
    """Its activation on each token, 0..10."""


EXAMPLES = (
    Example(
        explanation="names of months",
        tokens=(("The", " meeting", " moved", " from", " March", " to", " April", " because", " of", " the",
                 " storm", "."),
                (" Sales", " rose", " in", " June", " and", " fell", " again", " by", " late", " August", ".")),
        values=((0, 0, 0, 0, 9, 0, 10, 0, 0, 0, 0, 0),
                (0, 0, 1, 8, 0, 0, 0, 0, 0, 10, 0)),
    ),
    Example(
        explanation="closing parentheses in code",
        tokens=(("for", " i", " in", " range", "(", "n", "):", "\n", "   ", " total", " +=", " f", "(", "i", ")"),
                ("print", "(", "len", "(", "items", "))", " #", " count")),
        values=((0, 0, 0, 0, 0, 1, 8, 0, 0, 0, 0, 0, 0, 2, 10),
                (0, 0, 0, 0, 1, 10, 0, 0)),
    ),
)
"""Few-shot examples shared by the explainer and the simulator prompts (ours, made up)."""


def explain_user_message(tokens: list[list[str]], values: list[list[int]]) -> str:
    parts = ["Activations:", listing(tokens, values)]
    if is_sparse(values):
        parts += [SPARSE_HEADER, listing(tokens, values, drop_zeros=True)]
    parts.append(EXPLAIN_QUESTION)
    return "\n".join(parts)


def explain_messages(tokens: list[list[str]], values: list[list[int]]) -> list[dict]:
    """The chat messages asking for one explanation of a neuron whose scaled activations on the
    excerpts `tokens` are `values`."""
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for ex in EXAMPLES:
        messages.append({"role": "user", "content": explain_user_message(
            [list(t) for t in ex.tokens], [list(v) for v in ex.values])})
        messages.append({"role": "assistant", "content": ex.explanation})
    messages.append({"role": "user", "content": explain_user_message(tokens, values)})
    return messages


# ---------------------------------------------------------------------------------------------
# Simulate, all at once (one completions prompt; values read from prompt logprobs)

SIMULATE_PREAMBLE = (
    "Neurons of a language model respond to features of text. Below, each neuron is described in a "
    "few words, followed by an excerpt split into tokens, one token per line: the token, a tab, and "
    "the neuron's activation on that token from 0 (silent) to 10 (strongest). Control characters inside "
    "tokens are written as \\n, \\t and so on. A " + SLOT_MARKER + " stands for an activation still to "
    "be filled in.\n"
)


def _neuron_header(n: int, explanation: str) -> str:
    return f"Neuron {n} responds to: {explanation}"


@dataclass
class SlotPrompt:
    """A completions prompt with one marker per subject token, and where each marker is."""

    text: str
    """The whole prompt."""
    markers: list[list[int]]
    """markers[e][i]: character offset in `text` of the marker of token i of excerpt e."""


def simulate_prompt(explanation: str, excerpts: list[list[str]]) -> SlotPrompt:
    """The all-at-once simulation prompt of a set of excerpts: few-shot neurons with their values
    shown, then this neuron's excerpts, one block each, with a marker in place of every value."""
    parts = [SIMULATE_PREAMBLE]
    for n, ex in enumerate(EXAMPLES, 1):
        parts.append("\n" + _neuron_header(n, ex.explanation) + "\n")
        for toks, vals in zip(ex.tokens, ex.values):
            parts.append(listing([list(toks)], [list(vals)]) + "\n")
    parts.append("\n" + _neuron_header(len(EXAMPLES) + 1, explanation) + "\n")
    text = "".join(parts)
    markers: list[list[int]] = []
    for tokens in excerpts:
        block = [OPEN + "\n"]
        pos = len(text) + len(block[0])
        slots = []
        for tok in tokens:
            line = show_token(tok) + "\t"
            slots.append(pos + len(line))
            line += SLOT_MARKER + "\n"
            block.append(line)
            pos += len(line)
        block.append(CLOSE + "\n")
        text += "".join(block)
        markers.append(slots)
    return SlotPrompt(text, markers)


# ---------------------------------------------------------------------------------------------
# Simulate, written out (chat: values generated, one numbered line per token)

SIMULATE_SYSTEM = (
    "Neurons of a language model respond to features of text. You will get a few words describing what "
    "one neuron responds to, and an excerpt split into numbered tokens, one per line: the number, a tab, "
    "and the token (control characters inside tokens are written as \\n, \\t and so on). Predict the "
    "neuron's activation on every token, from 0 (silent) to 10 (strongest). Reply with one line per "
    "token, in order: the token's number, a tab, and the activation as a whole number from 0 to 10. "
    "Write nothing else."
)


def numbered_user_message(explanation: str, tokens: list[str]) -> str:
    lines = [f"{i}\t{show_token(t)}" for i, t in enumerate(tokens, 1)]
    return f"The neuron responds to: {explanation}\nTokens:\n" + "\n".join(lines)


def numbered_reply(values: list[int]) -> str:
    return "\n".join(f"{i}\t{v}" for i, v in enumerate(values, 1))


def simulate_messages(explanation: str, tokens: list[str]) -> list[dict]:
    """The chat messages asking the simulator to write a value for every token of one excerpt."""
    messages = [{"role": "system", "content": SIMULATE_SYSTEM}]
    for ex in EXAMPLES:
        toks = [t for excerpt in ex.tokens for t in excerpt][:16]
        vals = [v for excerpt in ex.values for v in excerpt][:16]
        messages.append({"role": "user", "content": numbered_user_message(ex.explanation, toks)})
        messages.append({"role": "assistant", "content": numbered_reply(vals)})
    messages.append({"role": "user", "content": numbered_user_message(explanation, tokens)})
    return messages


def correction_message(problem: str, n: int) -> str:
    """What a retry of a malformed written-out simulation says after the bad reply."""
    return (f"That reply could not be read: {problem}. Reply again with exactly {n} lines, one per token "
            f"from 1 to {n} in order, each the token's number, a tab, and a whole number from 0 to 10. "
            "Write nothing else.")
