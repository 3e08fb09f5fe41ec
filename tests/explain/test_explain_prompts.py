"""Prompts: scaling, the sparse repetition, one line per subject token, markers where they say;
explanation replies: cleaned, and empty ones and refusals refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client import prompts
from client.explain import BadExplanation, ExplainOptions, NothingToExplain, explain_listing, parse_explanation
from client.testserver import chat_reply
from tests.explain.helpers import synthetic_record

WEIRD = ["The", " cat", "\n", "\t", "", " ?", "?", "10", " unknown", "a\tb", "\r\n", "é", "\x00", " \u2028", "<<<", ">>>"]


def test_scale_is_floor_of_ten_relu_over_max():
    rng = np.random.default_rng()
    acts = [rng.normal(size=int(rng.integers(1, 9))).tolist() for _ in range(4)]
    acts[1][0] = 2.5  # ties with the max, negatives, zeros
    acts[2][0] = 2.5
    top = max(max(a) for a in acts)
    ref = [[int(math.floor(10 * max(a, 0) / top)) for a in excerpt] for excerpt in acts]
    assert prompts.scale(acts) == ref
    assert max(max(v) for v in prompts.scale(acts)) == 10
    assert prompts.scale([[-1.0, 0.0], [-2.0]]) == [[0, 0], [0]]
    # Near the float64 maximum 10 * a overflows; the scale does not (an imported store may hold such values).
    assert prompts.scale([[1e308, 5e307, 1.0]]) == [[10, 5, 0]]
    assert prompts.scale([[2.0**1023], [-(2.0**1023), 2.0**1021]]) == [[10], [0, 2]]


def test_sparse_listing_is_repeated_without_zeros():
    toks = [["a", "b", "c", "d", "e", "f"]]
    sparse = prompts.explain_user_message(toks, [[0, 10, 0, 0, 0, 0]])
    assert prompts.SPARSE_HEADER in sparse
    assert sparse.split(prompts.SPARSE_HEADER)[1].count("\t") == 1
    dense = prompts.explain_user_message(toks, [[0, 10, 3, 0, 5, 0]])
    assert prompts.SPARSE_HEADER not in dense


def test_every_subject_token_is_one_line_and_every_marker_is_on_its_line():
    excerpts = [WEIRD, WEIRD[::-1][:5], ["x"]]
    slots = prompts.simulate_prompt('the token "cat"', excerpts)
    assert [len(m) for m in slots.markers] == [len(e) for e in excerpts]
    tail = slots.text[slots.text.rindex("responds to:"):].split("\n")[1:]
    blocks, current = [], None
    for line in tail:
        if line == prompts.OPEN:
            current = []
        elif line == prompts.CLOSE:
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    assert [len(b) for b in blocks] == [len(e) for e in excerpts]
    for excerpt, markers, lines in zip(excerpts, slots.markers, blocks):
        for tok, m, line in zip(excerpt, markers, lines):
            assert slots.text[m] == prompts.SLOT_MARKER
            line_start = slots.text.rindex("\n", 0, m) + 1
            assert slots.text[line_start:m] == prompts.show_token(tok) + "\t" == line[:-1]
    chat = prompts.numbered_user_message("x", WEIRD).split("Tokens:\n")[1].split("\n")
    assert len(chat) == len(WEIRD) and all(line.startswith(f"{i}\t") for i, line in enumerate(chat, 1))


def test_explain_listing_uses_train_top_excerpts_only():
    toks = [[f"t{i}", " x"] for i in range(12)]
    acts = [[float(12 - i), 0.0] for i in range(12)]
    rec = synthetic_record(toks, acts, top=8)
    tokens, values = explain_listing(rec, ExplainOptions(model="m", excerpts=5))
    assert [t[0] for t in tokens] == ["t0", "t4"]  # ranks 0 and 4: the train split
    assert values == [[10, 0], [6, 0]]
    with pytest.raises(NothingToExplain) as info:
        explain_listing(synthetic_record(toks, [[-1.0, 0.0]] * 12, top=8), ExplainOptions(model="m"))
    assert info.value.never_fires


def _reply(content, refusal=None):
    reply = chat_reply({"model": "m"}, [content] if content else [])
    reply["choices"][0]["message"]["content"] = content
    reply["choices"][0]["message"]["refusal"] = refusal
    return reply


@pytest.mark.parametrize("content, expected", [
    ('the token "cat"', 'the token "cat"'),
    ('"names of months."', "names of months"),
    ("Explanation: closing brackets in code.\nBecause...", "closing brackets in code"),
    ("  The neuron responds to: the word 'not'  ", "the word 'not'"),
    ("**numbers**", "numbers"),
    ("**Explanation:** the token cat.", "the token cat"),
    ("*Explanation*: numbers", "numbers"),
    ("Answer: **numbers in lists**", "numbers in lists"),
    ("__init__ methods of classes", "__init__ methods of classes"),
    ("_private_ names", "_private_ names"),
    ('Explanation: "the token cat".', "the token cat"),   # quotes, then the period outside them
    ('the token "cat".', 'the token "cat"'),
    ("\ud800 lone surrogate", "\ufffd lone surrogate"),  # half a character: no UTF-8, no simulator prompt
])
def test_explanations_are_cleaned(content, expected):
    assert parse_explanation(_reply(content)) == expected


@pytest.mark.parametrize("content, refusal", [
    ("", None), ("   \n ", None), (None, "I cannot help with that."), ("I'm sorry, but I can't help with that.", None),
    ("Sorry, there is no pattern.", None), ("As an AI, I cannot determine this.", None), ('""', None),
])
def test_empty_replies_and_refusals_are_no_explanation(content, refusal):
    with pytest.raises(BadExplanation):
        parse_explanation(_reply(content, refusal))


def test_explanations_are_cut_to_the_documented_length(capsys):
    from client.explain import MAX_EXPLANATION_CHARS
    from engine.cli import build_parser
    from tests.atlas.helpers import ROOT

    long = "tokens of " + "very " * 100 + "long lists"
    assert parse_explanation(_reply(long)) == long[:MAX_EXPLANATION_CHARS] and MAX_EXPLANATION_CHARS == 300
    assert parse_explanation(_reply("x" * 300)) == "x" * 300
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--help"])
    assert f"cut to {MAX_EXPLANATION_CHARS} characters" in " ".join(capsys.readouterr().out.split())
    assert f"cut to its first {MAX_EXPLANATION_CHARS} characters" in " ".join(
        (ROOT / "docs" / "EXPLAIN.md").read_text().split())


def test_reasoning_and_cut_off_replies_are_no_explanation():
    """Reasoning models put their thoughts first ("<think>...</think>"); a reply cut at max_tokens
    in its first line is half an explanation."""
    assert parse_explanation(_reply("<think>\nthe values peak on cat\n</think>\n\nthe token cat.")) == "the token cat"
    with pytest.raises(BadExplanation, match="reasoning, cut off"):
        parse_explanation(_reply("<think>\nthe values peak on"))
    cut = _reply('the token "ca')
    cut["choices"][0]["finish_reason"] = "length"
    with pytest.raises(BadExplanation, match="cut off at --max-tokens"):
        parse_explanation(cut)
    whole = _reply("the token cat\nBecause the values")  # cut in a later line: the first is whole
    whole["choices"][0]["finish_reason"] = "length"
    assert parse_explanation(whole) == "the token cat"
    parts = _reply("x")
    parts["choices"][0]["message"]["content"] = [{"type": "text", "text": "numbers in "}, {"type": "text", "text": "lists"}]
    assert parse_explanation(parts) == "numbers in lists"
