"""Every simulation mode, over HTTP to the test server, reads one value per subject token, at the
right token, whatever the simulator's tokenizer does to them; bad replies fail, never become values;
a mode the server cannot do is refused by its probe."""

from __future__ import annotations

import pytest

from client import simulate as sim
from client.config import ClientConfig
from client.fake_llm import EV_HIGH, EV_LOW, HIGH, LOW
from client.runner import Client

# Subject tokens unlike the simulator's: spaces, newlines, tabs, empty, the marker itself, numbers,
# multi-byte text, control characters, the listing's own delimiters.
WEIRD = ["The", " cat", " sat", "\n", " on", "?", "10", "\t", "", " unknown", " cat", "é", "\x01", "<<<", " Cat", "cat"]
NAMED = {"cat"}


def _config(server) -> ClientConfig:
    return ClientConfig(base_url=server.base_url, max_attempts=2, backoff_base_s=0.01, seed=0)


def _expected(tokens, mode):
    high, low = (10.0, 0.0) if mode == "text" else (EV_HIGH, EV_LOW)
    return [high if t.strip().lower() in NAMED else low for t in tokens]


@pytest.mark.parametrize("tokenizer", ["words", "chunk3"])
@pytest.mark.parametrize("mode", sim.MODES)
async def test_each_mode_aligns_every_token(fake_server, mode, tokenizer, monkeypatch):
    tokens = WEIRD + [" cat", "x"] * 4  # lines of varying length: chunk3 cuts a written "10" into "1" + "0"
    split_tens = []
    expected_value = sim.expected_value

    def spy(alternatives, prefix="", chosen=None, following=None):
        value = expected_value(alternatives, prefix, chosen, following)
        if chosen is not None and chosen[len(prefix):] == "1":
            split_tens.append(value)
        return value

    monkeypatch.setattr(sim, "expected_value", spy)
    with fake_server(tokenizer=tokenizer) as (server, fake):
        async with Client(_config(server)) as client:
            out = await sim.simulate_excerpt(client, sim.SimOptions(model="sim", mode=mode), 'the token "cat"', tokens)
    assert out.error is None, out.error
    assert out.values == pytest.approx(_expected(tokens, mode), abs=1e-9)
    assert out.attempts == 1
    if mode == "chat-logprobs" and tokenizer == "chunk3":
        assert split_tens == pytest.approx([EV_HIGH])  # the split case happened, and read as 10


@pytest.mark.parametrize("mode", ["echo", "prompt-logprobs"])
async def test_all_at_once_modes_pack_a_set_of_excerpts_into_few_prompts(fake_server, mode):
    excerpts = [WEIRD, [" cat", "x", "\n"], ["y"] * 9, [], ["cat"] * 20]
    with fake_server(tokenizer="chunk3") as (server, fake):
        async with Client(_config(server)) as client:
            outs = await sim.simulate_set(client, sim.SimOptions(model="s", mode=mode), 'the token "cat"', excerpts)
            assert fake.calls["simulate-completion"] == 1
            small = await sim.simulate_set(client, sim.SimOptions(model="s", mode=mode, max_slots=16),
                                           'the token "cat"', excerpts)
            assert fake.calls["simulate-completion"] == 1 + 3  # [WEIRD], [3 tokens + 9 tokens], [20 tokens]
    for batch in (outs, small):
        assert batch[3].values is None and "no tokens" in batch[3].error
        for out, tokens in zip(batch, excerpts):
            if tokens:
                assert out.error is None and out.values == pytest.approx(_expected(tokens, mode), abs=1e-9)
    assert sim.pack([[1] * 5, [1] * 5, [1] * 20, [1]], 10) == [[0, 1], [2], [3]]


def test_ten_written_as_two_tokens_is_ten():
    # "1" chosen, then "0": the mass of "1" goes to 10 as far as the next token starts with "0".
    alts = [("\t1", -0.1), ("\t9", -2.5)]
    v = sim.expected_value(alts, "\t", chosen="\t1", following=[("0\n", -0.01)])
    p1, p9 = 2.718281828 ** -0.1, 2.718281828 ** -2.5
    assert v == pytest.approx((10 * p1 + 9 * p9) / (p1 + p9), rel=1e-6)
    assert sim.expected_value(alts, "\t", chosen="\t1", following=[("\n", -0.01)]) == pytest.approx((p1 + 9 * p9) / (p1 + p9), rel=1e-6)
    with pytest.raises(sim.SimulationError):
        sim.expected_value([("\tcat", -0.1), ("7", -0.2)], "\t")  # "7" lacks the merged tab: not this slot's


def test_a_value_is_a_whole_token_not_a_prefix():
    """" 7x", "7.5", "7," or "70%" is not the value 7; "7", " 7", "7.0" and a value followed by the
    line's newline (a token "7\n" or "7\n2") are."""
    for token in ("7", " 7", "\t7", "7.0", "7\n", "7\n2", " 7 "):
        assert sim.expected_value([(token, -0.1)]) == 7.0, token
    for token in (" 7x", "7x", "7.5", "7,", "70%", "7.", "x7"):
        with pytest.raises(sim.SimulationError):
            sim.expected_value([(token, -0.1)])
    # Among other alternatives they carry no mass: the expected value is that of the real ones.
    assert sim.expected_value([(" 7x", -0.01), ("\t2", -1.0), ("\t2.5", -0.5)], "\t") == 2.0
    assert sim.expected_value([("\t10", -0.7), ("\t1x", -0.1), ("\t0", -0.7)], "\t") == pytest.approx(5.0)


def test_prompt_logprobs_line_up_after_a_bos_token():
    slots = sim.prompts.simulate_prompt('the token "a"', [["a", "b"]])
    text = slots.text
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    entries = [None, {"1": {"logprob": -1.0, "decoded_token": pieces[0]}}]  # BOS first: no text of its own
    for p in pieces[1:]:
        entries.append({"7": {"logprob": -1.0, "decoded_token": p}, "8": {"logprob": -2.0, "decoded_token": p[:2]}})
    spans = sim.align_prompt_tokens(text, entries)
    assert spans[0] == (0, "") and [s for s, _ in spans[1:]] == list(range(0, len(text), 5))


async def test_values_that_do_not_line_up_fail_and_are_never_values(fake_server):
    tokens = ["a", " cat", "b", "c", "d", "e", "f", "g"]
    for mode in sim.MODES:
        with fake_server(simulate="misaligned") as (server, fake):
            async with Client(_config(server)) as client:
                out = await sim.simulate_excerpt(client, sim.SimOptions(model="s", mode=mode, retries=2),
                                                 'the token "cat"', tokens)
        assert out.values is None, mode
        if mode in ("chat-logprobs", "text"):
            assert out.attempts == 3 and "7 values for 8 tokens" in out.error  # retried twice, then recorded
        else:
            assert "spell the prompt" in out.error or "line" in out.error
    with fake_server(simulate="garbage") as (server, fake):
        async with Client(_config(server)) as client:
            for mode in sim.MODES:
                out = await sim.simulate_excerpt(client, sim.SimOptions(model="s", mode=mode), 'the token "cat"', tokens)
                assert out.values is None and out.error, mode


@pytest.mark.parametrize("content", ["1\t0\n2\t5", "1\t0\n3\t5\n2\t1", "1\t0\n2\t11\n3\t0", "1\t0\n2\tlow\n3\t0",
                                     "Sure! 1\t0\n2\t0\n3\t0", "1\t0\n2\t0\n3\t0\n4\t0"])
def test_written_values_are_parsed_strictly(content):
    with pytest.raises(sim.Malformed):
        sim.parse_numbered(content, 3)


def test_written_values_accept_common_separators():
    assert [v for v, _ in sim.parse_numbered("```\n1: 0\n2 | 10\n3 7\n```", 3)] == [0, 10, 7]


async def test_forced_mode_the_server_cannot_do_is_refused(fake_server):
    with fake_server(completions=False) as (server, fake):
        with pytest.raises(sim.ModeRefused, match="cannot simulate in mode echo"):
            await sim.choose_mode(_config(server), "echo", "s")
        assert not server.snapshot()["served"] and not fake.calls  # the probe was refused; nothing else sent
        mode, notes = await sim.choose_mode(_config(server), "auto", "s")
        assert mode == "chat-logprobs" and len(notes) == 2
    with fake_server(completions=False, chat_logprobs=False) as (server, fake):
        mode, _ = await sim.choose_mode(_config(server), "auto", "s")
        assert mode == "text"
    with fake_server(prompt_logprobs=False, echo=False) as (server, fake):
        with pytest.raises(sim.ModeRefused, match="prompt_logprobs"):
            await sim.choose_mode(_config(server), "prompt-logprobs", "s")


def test_fake_distributions_are_what_the_tests_assume():
    assert EV_HIGH == pytest.approx(9.6) and EV_LOW == pytest.approx(0.25)
    assert HIGH[0][0] == 10 and LOW[0][0] == 0


@pytest.mark.parametrize("content", ["1\t0\n2\t\u0663\n3\t0", "1\t0\n2\t\u00b2\n3\t0", "1\t0\n2\t07\n3\t0",
                                     "1\t0\n\uff12\t5\n3\t0", "1\t0\n2\t\uff15\n3\t0"])
def test_written_values_are_ascii_digits(content):
    """str.isdigit() takes Arabic-Indic "٣", fullwidth "５" and superscript "²" (on which int()
    raises): a value is 0..10 in ASCII digits, without a leading zero."""
    with pytest.raises(sim.Malformed):
        sim.parse_numbered(content, 3)


def test_alternatives_that_are_no_values_or_no_logprobs():
    for token in ("\u0663", "\uff17", "07", "010", "+7"):
        with pytest.raises(sim.SimulationError, match="no value"):
            sim.expected_value([(token, -0.1)])
    # A logprob is at most 0: NaN, +inf or a clearly positive one is a malformed reply, not a value.
    for bad in (float("inf"), float("nan"), 2.0, "x"):
        with pytest.raises(sim.SimulationError, match="logprob"):
            sim.expected_value([("7", bad), ("3", -1.0)])
    # -inf is probability 0; a positive rounding error is probability 1.
    assert sim.expected_value([("7", float("-inf")), ("3", -1.0)]) == 3.0
    assert sim.expected_value([("7", 1e-6), ("3", float("-inf"))]) == 7.0


def test_chat_logprobs_that_are_not_a_list_are_malformed_not_certain():
    """A top_logprobs that is not a list of objects (a string, a number) was read as "no
    alternatives given": the chosen token at probability 1, a silently different simulation."""
    def reply(tops):
        toks = ["1", "\t", "7", "\n"]
        content = [{"token": t, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": -0.1}]} for t in toks]
        content[2]["top_logprobs"] = tops
        return {"choices": [{"message": {"role": "assistant", "content": "".join(toks)},
                             "logprobs": {"content": content}}]}

    good = [{"token": "7", "logprob": -0.1}, {"token": "3", "logprob": -2.5}]
    assert sim.parse_chat_logprobs(reply(good), 1)[0] == pytest.approx(sim.expected_value(
        [("7", -0.1), ("3", -2.5)]))
    assert sim.parse_chat_logprobs(reply(None), 1) == [7.0]          # none given: the token itself
    for bad in ("garbage", 5, [1, 2], {"token": "7"}):
        with pytest.raises(sim.SimulationError, match="top_logprobs of token '7' are not a list"):
            sim.parse_chat_logprobs(reply(bad), 1)
