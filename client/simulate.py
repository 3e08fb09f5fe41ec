"""Simulate a neuron from its explanation: the expected activation 0..10 at every subject token.

Four ways to ask, from the cheapest (one forward pass, nothing generated) to the plainest:

* `echo` - /completions with `echo` and `logprobs`: the prompt (prompts.simulate_prompt) holds a
  marker in place of every value, and the value of token i is read from the distribution the
  simulator predicts at its marker's position;
* `prompt-logprobs` - the same prompt, with vLLM's `prompt_logprobs` instead of echo;
* `chat-logprobs` - /chat/completions with `top_logprobs`: the simulator writes `number<TAB>value`
  for every token and the expected value comes from the top logprobs at each value it wrote;
* `text` - the same without logprobs: the values written, parsed strictly.

**Alignment never depends on the simulator's tokenizer.** The subject's tokens are one per line
(one per slot); where a value belongs is a character offset in text we wrote (the marker) or a
line we can check (`number<TAB>value`, numbers 1..n in order). The simulator's token covering that
offset is found from the character offsets it reports (`text_offset`, or the lengths of its token
strings). If its tokenizer merged the characters before the offset into that token (a tab glued to
the marker, say), the alternatives carry the same prefix, which is stripped before reading a value.
If the distribution there holds no value at all, the excerpt fails: nothing is ever invented.

A malformed written-out reply is retried (a new request that shows the model its reply and what was
wrong with it, so that the durable store does not hand back the same reply), then recorded as a
failure; never as zeros.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field, replace

from client import prompts
from client.request import Request

MODES = ("echo", "prompt-logprobs", "chat-logprobs", "text")
"""Simulation modes, in the order `auto` tries them."""

MODE_DESCRIPTIONS = {
    "echo": "completions with echo and logprobs: values read from prompt logprobs at each token's slot",
    "prompt-logprobs": "completions with vLLM's prompt_logprobs: values read at each token's slot",
    "chat-logprobs": "chat with top_logprobs: the simulator writes each value; expected value from its logprobs",
    "text": "chat without logprobs: the values the simulator writes, parsed strictly",
}


class SimulationError(Exception):
    """A reply from which no values can be read (one line, naming what was wrong)."""


class Malformed(SimulationError):
    """A written-out reply that does not follow the format (retried)."""


@dataclass
class SimOptions:
    """How to simulate."""

    model: str
    """Simulator model."""
    mode: str = "echo"
    """One of MODES (resolved; never 'auto' here)."""
    top_logprobs: int = 5
    """Alternatives asked for at each position (OpenAI allows 5 on /completions, 20 on chat)."""
    retries: int = 2
    """Malformed written-out replies are retried this many times before the excerpt fails."""
    max_slots: int = 768
    """All-at-once modes: most subject tokens in one prompt (a neuron's excerpts share prompts up to this)."""

    def to_json(self) -> dict:
        return {"model": self.model, "mode": self.mode, "top_logprobs": self.top_logprobs, "retries": self.retries,
                "max_slots": self.max_slots}


# ---------------------------------------------------------------------------------------------
# Reading a value from a distribution

_VALUE = re.compile(r"\s*(10|[0-9])(?:\.0+)?(?=\s|$)")
"""A value token: a whole number (written "7", " 7", "\t7" or "7.0"), the whole token or up to a
whitespace character (the token that carries a written value may go on with the line's newline and
what follows it, "7\n2"). " 7x", "7.5", "7,", "70%", "07" and digits other than ASCII ("٣") are not
values."""


def _number(rest: str) -> int | None:
    """The value 0..10 a token (after its merged prefix) stands for, or None."""
    m = _VALUE.match(rest)
    return int(m.group(1)) if m else None  # the pattern only takes 0..10


LOGPROB_SLACK = 1e-3
"""A logprob above 0 by at most this is rounding (taken as 0); by more, the reply is malformed."""


def _probability(logprob) -> float:
    """exp(logprob) of a server's logprob; SimulationError for one that is no log-probability
    (NaN, +inf, clearly above 0, not a number). -inf is probability 0."""
    try:
        lp = float(logprob)
    except (TypeError, ValueError):
        raise SimulationError(f"the simulator's logprob {str(logprob)[:20]!r} is not a number") from None
    if math.isnan(lp) or lp > LOGPROB_SLACK:
        raise SimulationError(f"the simulator's logprob {lp} is not a log-probability (NaN or above 0)")
    return math.exp(min(lp, 0.0))


def expected_value(alternatives: list[tuple[str, float]], prefix: str = "", chosen: str | None = None,
                   following: list[tuple[str, float]] | None = None) -> float:
    """The expected value over the alternatives (token, logprob) that read as 0..10 after `prefix`,
    normalised over those alternatives.

    A tokenizer that writes 10 as "1" then "0" makes the alternative "1" stand for both 1 and 10.
    When "1" is the token actually chosen and the alternatives at the following position are known
    (`following`), its probability is split by how likely that next token starts with "0".
    """
    mass: dict[int, float] = {}
    for token, logprob in alternatives:
        if not isinstance(token, str) or not token.startswith(prefix) or logprob is None:
            continue
        rest = token[len(prefix):]
        v = _number(rest)
        if v is None:
            continue
        p = _probability(logprob)
        if v == 1 and rest.strip() == "1" and token == chosen and following:
            total = sum(_probability(lp) for _, lp in following if lp is not None)
            zero = sum(_probability(lp) for t, lp in following
                       if lp is not None and isinstance(t, str) and t.startswith("0"))
            q = zero / total if total > 0 else 0.0
            mass[10] = mass.get(10, 0.0) + p * q
            mass[1] = mass.get(1, 0.0) + p * (1 - q)
        else:
            mass[v] = mass.get(v, 0.0) + p
    total = sum(mass.values())
    if not total > 0:
        raise SimulationError("no value 0..10 among the simulator's alternatives")
    return sum(v * p for v, p in mass.items()) / total


# ---------------------------------------------------------------------------------------------
# All at once: completions, values read at each slot marker


def echo_request(opts: SimOptions, explanation: str, excerpts: list[list[str]]) -> tuple[Request, prompts.SlotPrompt]:
    """One /completions request with echo and logprobs for a set of excerpts (lists of token strings)."""
    slots = prompts.simulate_prompt(explanation, excerpts)
    body = {"model": opts.model, "prompt": slots.text, "max_tokens": 1, "temperature": 0,
            "echo": True, "logprobs": opts.top_logprobs}
    return Request(body, "completion"), slots


def prompt_logprobs_request(opts: SimOptions, explanation: str, excerpts: list[list[str]]) -> tuple[Request, prompts.SlotPrompt]:
    """One /completions request with vLLM's prompt_logprobs for a set of excerpts."""
    slots = prompts.simulate_prompt(explanation, excerpts)
    body = {"model": opts.model, "prompt": slots.text, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": opts.top_logprobs}
    return Request(body, "completion"), slots


def _top_items(top) -> list[tuple[str, float]]:
    if isinstance(top, dict):
        return [(t, lp) for t, lp in top.items()]
    if isinstance(top, list):  # some servers send [{"token": ..., "logprob": ...}]
        return [(e.get("token"), e.get("logprob")) for e in top if isinstance(e, dict)]
    return []


def parse_echo(reply: dict, slots: prompts.SlotPrompt) -> list[list[float]]:
    """Values at each slot (per excerpt) from a /completions reply with echo and logprobs."""
    try:
        choice = reply["choices"][0]
        lp = choice["logprobs"]
        tokens, tops = lp["tokens"], lp["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise SimulationError("the reply has no echoed prompt logprobs (choices[0].logprobs.tokens/top_logprobs)") from None
    text = choice.get("text")
    prompt = slots.text
    if not isinstance(text, str) or not text.startswith(prompt):
        raise SimulationError("the echoed text is not the prompt that was sent (the server changed it?)")
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tops) != len(tokens):
        raise SimulationError("the echoed logprobs have no top alternative list per token")
    offsets = lp.get("text_offset")
    if not (isinstance(offsets, list) and len(offsets) == len(tokens)):
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t) if isinstance(t, str) else 0
    # The tokens must spell the prompt at their offsets; a server that skipped or re-tokenized part
    # of it would otherwise shift every value.
    if offsets and offsets[0] != 0:
        raise SimulationError(f"the echoed tokens start at offset {offsets[0]}, not at the prompt's start")
    for i, (t, off) in enumerate(zip(tokens, offsets)):
        if off >= len(prompt):
            break
        if not isinstance(t, str) or not isinstance(off, int):
            raise SimulationError(f"echoed token {i} is malformed")
        if t.startswith("bytes:"):
            continue
        end = offsets[i + 1] if i + 1 < len(offsets) else off + len(t)
        if prompt[off:min(end, len(prompt))] != t[: max(0, min(end, len(prompt)) - off)]:
            raise SimulationError(f"the echoed tokens do not spell the prompt at character {off} "
                                  f"({t!r} there, the prompt has {prompt[off:end]!r})")
    def value_at(m: int, where: str) -> float:
        i = bisect.bisect_right(offsets, m) - 1
        end = offsets[i + 1] if i + 1 < len(offsets) else offsets[i] + len(tokens[i])
        if i < 1 or not offsets[i] <= m < end:  # position 0 has no prediction
            raise SimulationError(f"no echoed token at the slot of {where}")
        try:
            return expected_value(_top_items(tops[i]), prompt[offsets[i]:m])
        except SimulationError as exc:
            raise SimulationError(f"slot of {where}: {exc}") from None

    return _per_slot(slots, value_at)


def _per_slot(slots: prompts.SlotPrompt, value_at) -> list[list[float]]:
    many = len(slots.markers) > 1
    return [[value_at(m, f"token {i + 1}" + (f" of excerpt {e + 1}" if many else "")) for i, m in enumerate(excerpt)]
            for e, excerpt in enumerate(slots.markers)]


def _prompt_logprobs_entries(reply: dict):
    choices = reply.get("choices") or []
    if choices and isinstance(choices[0], dict) and choices[0].get("prompt_logprobs") is not None:
        return choices[0]["prompt_logprobs"]
    return reply.get("prompt_logprobs")


def align_prompt_tokens(text: str, entries: list) -> list[tuple[int, str]]:
    """(start offset, token string) of each prompt token of a vLLM `prompt_logprobs` list, found by
    spelling `text` with one candidate per position (each position's candidates include the token
    actually there). Position 0 carries no candidates (None); it may be a BOS token of no text."""
    cands = []
    for i, e in enumerate(entries):
        if e is None:
            if i != 0:
                raise SimulationError(f"prompt_logprobs entry {i} is empty")
            cands.append(None)
            continue
        if not isinstance(e, dict):
            raise SimulationError(f"prompt_logprobs entry {i} is not an object")
        strings = {v.get("decoded_token") for v in e.values() if isinstance(v, dict)}
        strings.discard(None)
        if not strings:
            raise SimulationError("prompt_logprobs carry no decoded_token strings: cannot line them up with the prompt")
        cands.append(strings)
    L = len(text)
    # back[i] maps the end offset of token i to (its start offset, its string).
    back: list[dict[int, tuple[int, str]]] = []
    if cands and cands[0] is None:
        back.append({k: (0, text[:k]) for k in range(min(L, 32) + 1)})
    else:
        back.append({})
        for d in cands[0] if cands else ():
            if text.startswith(d):
                back[0][len(d)] = (0, d)
    for i in range(1, len(cands)):
        nxt: dict[int, tuple[int, str]] = {}
        for start in back[i - 1]:
            for d in cands[i]:
                if text.startswith(d, start) and start + len(d) not in nxt:
                    nxt[start + len(d)] = (start, d)
        if not nxt:
            raise SimulationError(f"cannot line prompt_logprobs token {i} up with the prompt")
        back.append(nxt)
    if not back or L not in back[-1]:
        raise SimulationError("the prompt_logprobs tokens do not spell the prompt")
    out = [None] * len(back)
    end = L
    for i in range(len(back) - 1, -1, -1):
        start, d = back[i][end]
        out[i] = (start, d)
        end = start
    return out  # type: ignore[return-value]


def parse_prompt_logprobs(reply: dict, slots: prompts.SlotPrompt) -> list[list[float]]:
    """Values at each slot (per excerpt) from a vLLM reply with prompt_logprobs."""
    entries = _prompt_logprobs_entries(reply)
    if not isinstance(entries, list) or not entries:
        raise SimulationError("the reply has no prompt_logprobs")
    spans = align_prompt_tokens(slots.text, entries)
    starts = [s for s, _ in spans]

    def value_at(m: int, where: str) -> float:
        i = bisect.bisect_right(starts, m) - 1  # the last token starting at or before the marker
        if i < 1 or entries[i] is None or not starts[i] + len(spans[i][1]) > m:
            raise SimulationError(f"no prediction at the slot of {where}")
        alts = [(v.get("decoded_token"), v.get("logprob")) for v in entries[i].values() if isinstance(v, dict)]
        try:
            return expected_value(alts, slots.text[starts[i]:m])
        except SimulationError as exc:
            raise SimulationError(f"slot of {where}: {exc}") from None

    return _per_slot(slots, value_at)


# ---------------------------------------------------------------------------------------------
# Written out: chat, one numbered line per token

_LINE = re.compile(r"[ \t]*([0-9]+)[ \t]*(?:\t|:|\||[ ])[ \t]*(\S+)[ \t]*")


_WHOLE = re.compile(r"10|[0-9]")
"""A written value: 0..10 in ASCII digits, no sign, no leading zero (str.isdigit also takes "٣" and "²")."""


def parse_numbered(text: str, n: int) -> list[tuple[int, int]]:
    """Strictly read `number<TAB>value` lines 1..n (a colon, bar or spaces are accepted in place of
    the tab; blank lines and a surrounding code fence are ignored). Returns (value, offset of the
    value in `text`) per token; raises Malformed naming the first problem."""
    out: list[tuple[int, int]] = []
    pos = 0
    for raw in text.split("\n"):
        start = pos
        pos += len(raw) + 1
        line = raw.rstrip("\r")
        if not line.strip() or line.strip().startswith("```"):
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise Malformed(f"line {len(out) + 1} is {line.strip()[:40]!r}, not 'NUMBER<TAB>VALUE'")
        number, value = int(m.group(1)), m.group(2)
        if number != len(out) + 1:
            raise Malformed(f"expected the line of token {len(out) + 1}, got one numbered {number}"
                            if number <= n else f"there are only {n} tokens, got a line numbered {number}")
        if not _WHOLE.fullmatch(value):
            raise Malformed(f"the value of token {number} is {value[:12]!r}, not a whole number from 0 to 10")
        out.append((int(value), start + m.start(2)))
    if len(out) != n:
        raise Malformed(f"the reply has {len(out)} values for {n} tokens")
    return out


def chat_request(opts: SimOptions, explanation: str, tokens: list[str], history: list[dict] = ()) -> Request:
    body = {"model": opts.model, "messages": prompts.simulate_messages(explanation, tokens) + list(history),
            "temperature": 0, "max_tokens": 8 * len(tokens) + 16}
    if opts.mode == "chat-logprobs":
        body["logprobs"] = True
        body["top_logprobs"] = opts.top_logprobs
    return Request(body, "chat")


def _message(reply: dict) -> tuple[str, dict]:
    try:
        choice = reply["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise Malformed("the reply has no message") from None
    if not isinstance(content, str) or not content.strip():
        refusal = (choice.get("message") or {}).get("refusal")
        raise Malformed(f"the reply is a refusal ({str(refusal)[:60]!r})" if refusal else "the reply is empty")
    if choice.get("finish_reason") == "length":
        raise Malformed("the reply was cut off by max_tokens")
    return content, choice


def parse_text(reply: dict, n: int) -> list[float]:
    content, _ = _message(reply)
    return [float(v) for v, _ in parse_numbered(content, n)]


def parse_chat_logprobs(reply: dict, n: int) -> list[float]:
    content, choice = _message(reply)
    entries = ((choice.get("logprobs") or {}).get("content")) if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(entries, list) or not entries:
        raise SimulationError("the reply has no logprobs.content")
    tokens = [e.get("token") if isinstance(e, dict) else None for e in entries]
    if not all(isinstance(t, str) for t in tokens):
        raise SimulationError("the reply's logprobs hold a token that is not text")
    # What was generated is what the logprob tokens spell; the message may be stripped of whitespace.
    text = "".join(tokens)
    if text.strip() != content.strip():
        raise SimulationError("the logprob tokens do not spell the reply's message")
    parsed = parse_numbered(text, n)
    starts = []
    pos = 0
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    def alternatives(e: dict) -> list:
        # The token's top_logprobs, or (none given) the token itself at its logprob. Anything else
        # is a malformed reply, never read as "the chosen token, certain".
        tops = e.get("top_logprobs")
        if tops is not None and (not isinstance(tops, list) or not all(isinstance(a, dict) for a in tops)):
            raise SimulationError(f"the reply's top_logprobs of token {e.get('token')!r} are not a list of objects")
        return [(a.get("token"), a.get("logprob")) for a in tops or []] or [(e.get("token"), e.get("logprob"))]

    values = []
    for slot, (_, off) in enumerate(parsed):
        i = bisect.bisect_right(starts, off) - 1
        e = entries[i]
        alts = alternatives(e)
        following = alternatives(entries[i + 1]) if i + 1 < len(entries) else None
        try:
            values.append(expected_value(alts, text[starts[i]:off], chosen=e.get("token"), following=following))
        except SimulationError as exc:
            raise SimulationError(f"value of token {slot + 1}: {exc}") from None
    return values


# ---------------------------------------------------------------------------------------------
# One excerpt, end to end


@dataclass
class SimOutcome:
    """What became of simulating one excerpt."""

    values: list[float] | None = None
    """Expected value 0..10 at each subject token (None on failure)."""
    error: str | None = None
    """Why it failed, when it did."""
    interrupted: bool = False
    """The run stopped before it finished (not a failure: a rerun finishes it)."""
    requests: list[str] = field(default_factory=list)
    """Keys of the requests it used, in order."""
    attempts: int = 0
    """Replies read (more than one when malformed replies were retried)."""


def pack(excerpts: list[list[str]], max_slots: int) -> list[list[int]]:
    """Indices of excerpts grouped into prompts of at most max_slots tokens (an excerpt longer than
    that gets a prompt of its own), in order."""
    groups: list[list[int]] = []
    used = 0
    for i, tokens in enumerate(excerpts):
        if groups and used + len(tokens) <= max_slots:
            groups[-1].append(i)
            used += len(tokens)
        else:
            groups.append([i])
            used = len(tokens)
    return groups


async def simulate_set(client, opts: SimOptions, explanation: str, excerpts: list[list[str]]) -> list[SimOutcome]:
    """Simulate a set of excerpts (lists of subject token strings) from one explanation with `client`
    (a client.runner.Client): one outcome per excerpt. The all-at-once modes send the set in as few
    prompts as max_slots allows; the written-out modes send one request per excerpt."""
    import asyncio

    outs = [SimOutcome() for _ in excerpts]
    todo = [i for i, tokens in enumerate(excerpts) if tokens]
    for i, tokens in enumerate(excerpts):
        if not tokens:
            outs[i].error = "the excerpt has no tokens"
    if opts.mode in ("echo", "prompt-logprobs"):
        groups = pack([excerpts[i] for i in todo], opts.max_slots)
        await asyncio.gather(*(_all_at_once(client, opts, explanation, [todo[j] for j in g], excerpts, outs)
                               for g in groups))
    elif opts.mode in MODES:
        done = await asyncio.gather(*(simulate_written(client, opts, explanation, excerpts[i]) for i in todo))
        for i, out in zip(todo, done):
            outs[i] = out
    else:
        raise ValueError(f"unknown simulation mode {opts.mode!r}")
    return outs


async def _all_at_once(client, opts: SimOptions, explanation: str, which: list[int], excerpts, outs) -> None:
    build = echo_request if opts.mode == "echo" else prompt_logprobs_request
    parse = parse_echo if opts.mode == "echo" else parse_prompt_logprobs
    request, slots = build(opts, explanation, [excerpts[i] for i in which])
    result = await client.submit(request)
    values = error = None
    if result.error is None:
        try:
            values = parse(result.response, slots)
        except SimulationError as exc:
            error = str(exc)
    else:
        error = f"request failed: {result.error}"
    for k, i in enumerate(which):
        out = outs[i]
        out.requests.append(request.key)
        out.attempts = int(result.error is None)
        out.interrupted = result.error is not None and result.error.stopped
        if values is not None:
            out.values = values[k]
        else:
            out.error = error


async def simulate_written(client, opts: SimOptions, explanation: str, tokens: list[str]) -> SimOutcome:
    """The written-out modes for one excerpt: ask, parse strictly, retry a malformed reply."""
    out = SimOutcome()
    history: list[dict] = []
    problem = ""
    for _ in range(opts.retries + 1):
        request = chat_request(opts, explanation, tokens, history)
        result = await client.submit(request)
        out.requests.append(request.key)
        if result.error is not None:
            out.interrupted = result.error.stopped
            out.error = f"request failed: {result.error}"
            return out
        out.attempts += 1
        reply = result.response
        try:
            out.values = (parse_text if opts.mode == "text" else parse_chat_logprobs)(reply, len(tokens))
            return out
        except Malformed as exc:
            problem = str(exc)
        except SimulationError as exc:  # logprobs that do not fit their own text: retrying will not help
            out.error = str(exc)
            return out
        said = ""
        try:
            said = reply["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        history = history + [{"role": "assistant", "content": said},
                             {"role": "user", "content": prompts.correction_message(problem, len(tokens))}]
    out.error = f"malformed reply after {out.attempts} attempts: {problem}"
    return out


async def simulate_excerpt(client, opts: SimOptions, explanation: str, tokens: list[str]) -> SimOutcome:
    """Simulate one excerpt (see simulate_set)."""
    return (await simulate_set(client, opts, explanation, [tokens]))[0]


# ---------------------------------------------------------------------------------------------
# What the server can do: one small probe per mode, before any simulation request


def probe_request(mode: str, model: str, top_logprobs: int = 5) -> Request:
    """The smallest request of a mode's shape."""
    if mode in ("echo", "prompt-logprobs"):
        body = {"model": model, "prompt": "cat\t7\ndog\t" + prompts.SLOT_MARKER, "max_tokens": 1, "temperature": 0}
        if mode == "echo":
            body.update(echo=True, logprobs=top_logprobs)
        else:
            body["prompt_logprobs"] = top_logprobs
        return Request(body, "completion")
    body = {"model": model, "messages": [{"role": "user", "content": "Reply with the number 7."}],
            "max_tokens": 2, "temperature": 0}
    if mode == "chat-logprobs":
        body.update(logprobs=True, top_logprobs=top_logprobs)
    return Request(body, "chat")


def probe_problem(mode: str, reply: dict) -> str | None:
    """Why a probe reply shows the mode cannot work (None: it can)."""
    try:
        choice = reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        return "the reply has no choices"
    if mode == "echo":
        lp = choice.get("logprobs")
        if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list) or not isinstance(lp.get("top_logprobs"), list):
            return "the reply has no logprobs for the echoed prompt"
        if not str(choice.get("text", "")).startswith("cat"):
            return "the reply does not echo the prompt"
        if not any(isinstance(t, dict) and t for t in lp["top_logprobs"]):
            return "the echoed prompt has no top_logprobs"
        return None
    if mode == "prompt-logprobs":
        entries = _prompt_logprobs_entries(reply)
        if not isinstance(entries, list) or not any(isinstance(e, dict) for e in entries):
            return "the reply has no prompt_logprobs (a vLLM extension)"
        return None
    message = choice.get("message")
    if not isinstance(message, dict):
        return "the reply has no chat message"
    if mode == "chat-logprobs":
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if not isinstance(content, list) or not content or not all(isinstance(e, dict) and e.get("top_logprobs") for e in content):
            return "the reply has no top_logprobs for the generated tokens"
    return None


class ModeRefused(Exception):
    """The server cannot simulate in the requested mode (or in any, for auto)."""


async def probe_mode(config, mode: str, model: str, top_logprobs: int = 5) -> str | None:
    """Send one probe of `mode` with a store-less Client (probes are cheap and must reflect the
    server as it is now). Returns why the mode cannot work, or None. Raises ModeRefused when the
    server could not be asked at all."""
    from client.runner import Client

    cfg = replace(config, store_path=None, max_attempts=min(config.max_attempts, 3),
                  deadline_s=min(config.deadline_s, 120.0))
    request = probe_request(mode, model, top_logprobs)
    async with Client(cfg) as client:
        result = await client.submit(request)
    if result.error is not None:
        err = result.error
        # Only a clear refusal says the mode cannot work. A failure that retries might have got past
        # (a 5xx or 429, a timeout, a dropped connection, a 200 wrapping an upstream error, a cut-off
        # body: all retryable) or a stopped run (a refused key, Ctrl-C) says nothing of the mode.
        if err.stopped or err.retryable:
            raise ModeRefused(f"could not ask {cfg.base_url} what it can do ({err}); check the server and retry")
        return str(err)
    return probe_problem(mode, result.response)


async def choose_mode(config, requested: str, model: str, top_logprobs: int = 5) -> tuple[str, list[str]]:
    """The mode to simulate in: `requested` if the server can do it (else ModeRefused), or for
    'auto' the first of MODES that works. Returns (mode, notes on the modes that did not work)."""
    if requested != "auto":
        if requested not in MODES:
            raise ModeRefused(f"unknown simulation mode {requested!r}: use auto or one of {', '.join(MODES)}")
        problem = await probe_mode(config, requested, model, top_logprobs)
        if problem:
            raise ModeRefused(f"the server cannot simulate in mode {requested} ({MODE_DESCRIPTIONS[requested]}): "
                              f"{problem}. Use --sim-mode auto or another mode")
        return requested, []
    notes = []
    for mode in MODES:
        problem = await probe_mode(config, mode, model, top_logprobs)
        if problem is None:
            return mode, notes
        notes.append(f"{mode}: {problem}")
    raise ModeRefused("the server can do none of the simulation modes: " + "; ".join(notes))
