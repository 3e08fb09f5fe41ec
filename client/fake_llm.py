"""A deterministic explainer and simulator for client.testserver: `TestServer(responder=FakeLLM())`.

It reads our prompts the way a model would read them, by their text, with its own parsing (never
with the code that builds or aligns them), and answers:

* **explainer** - the token most frequent among high activations (value >= 5) of the neuron's
  listing, as `the token "cat"`;
* **simulator** - high values on tokens named in the explanation (in double quotes), low ones
  elsewhere: the distribution HIGH (10: .7, 9: .2, 8: .1) or LOW (0: .8, 1: .15, 2: .05), whose
  expected values are EV_HIGH = 9.6 and EV_LOW = 0.25. It answers all the simulation modes:
  /completions with echo + logprobs, vLLM's prompt_logprobs, chat with top_logprobs, plain chat.

Its tokenizer is deliberately unlike the subject's: `words` glues a tab or newline to what follows
("\\t?", "\\nfoo"), `chunk3` cuts the text into 3-character pieces wherever they fall (splitting
tokens, values and markers, and merging across lines). Capabilities can be switched off to play a
server that cannot do a mode, and behaviours switched to play bad replies (empty, refusing,
misaligned, garbage).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Callable

from client import prompts
from client.testserver import ServerError, chat_reply
from client.testserver import tokenize as word_tokenize

HIGH = ((10, 0.7), (9, 0.2), (8, 0.1))
LOW = ((0, 0.8), (1, 0.15), (2, 0.05))
EV_HIGH = sum(v * p for v, p in HIGH)
EV_LOW = sum(v * p for v, p in LOW)


def chunk3(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"words": word_tokenize, "chunk3": chunk3}


def _tid(token: str) -> str:
    return str(int(hashlib.sha1(token.encode()).hexdigest()[:7], 16))


def named_in(explanation: str) -> set[str]:
    """Words the explanation names in double quotes, lower-cased."""
    return {w.strip().lower() for w in re.findall(r'"([^"]*)"', explanation) if w.strip()}


class FakeLLM:
    """A responder (kind, body) -> reply for TestServer."""

    def __init__(self, *, tokenizer: str = "words", completions: bool = True, echo: bool = True,
                 prompt_logprobs: bool = True, chat_logprobs: bool = True, explain: str | Callable = "normal",
                 simulate: str = "normal"):
        self.tokenize = TOKENIZERS[tokenizer]
        self.completions = completions
        self.echo = echo
        self.prompt_logprobs = prompt_logprobs
        self.chat_logprobs = chat_logprobs
        self.explain_behaviour = explain
        """normal, empty, refuse, or a function (listing tokens, values) -> reply text."""
        self.simulate_behaviour = simulate
        """normal, misaligned (a value or token missing), garbage (no values at all)."""
        self.calls: Counter = Counter()
        """Requests answered, by role."""

    def __call__(self, kind: str, body: dict) -> dict:
        if kind == "completion":
            if not self.completions:
                raise ServerError(404, "This is a chat model and not supported in the v1/completions endpoint.",
                                  code="model_not_supported")
            if body.get("echo") and not self.echo:
                raise ServerError(400, "echo is not supported together with logprobs by this server")
            return self._completion(body)
        messages = body.get("messages") or []
        system = messages[0].get("content") if messages and isinstance(messages[0], dict) else None
        if system == prompts.EXPLAIN_SYSTEM:
            self.calls["explain"] += 1
            return self._explain(body, messages)
        if system == prompts.SIMULATE_SYSTEM:
            self.calls["simulate-chat"] += 1
            return self._simulate_chat(body, messages)
        self.calls["other-chat"] += 1
        return self._chat(body, self.tokenize("7"), [[("7", math.log(0.9)), ("8", math.log(0.1))]])

    # -- chat -------------------------------------------------------------------------------------
    def _chat(self, body: dict, tokens: list[str], alternatives=None, message: dict | None = None) -> dict:
        if not self.chat_logprobs:
            body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
        reply = chat_reply(body, tokens, top_logprobs=alternatives)
        if message is not None:
            for choice in reply["choices"]:
                choice["message"].update(message)
        return reply

    def _explain(self, body: dict, messages: list[dict]) -> dict:
        text = messages[-1]["content"]
        main = text.split(prompts.SPARSE_HEADER)[0]
        pairs = []
        for line in main.splitlines():
            if "\t" in line:
                tok, _, value = line.rpartition("\t")
                if value.isdigit():
                    pairs.append((tok, int(value)))
        behaviour = self.explain_behaviour
        if callable(behaviour):
            answer = behaviour([t for t, _ in pairs], [v for _, v in pairs])
        elif behaviour == "empty":
            answer = ""
        elif behaviour == "refuse":
            answer = "I'm sorry, but I can't help with identifying that."
        else:
            high = [t.strip() for t, v in pairs if v >= 5 and t.strip()]
            counts = Counter(high)
            if counts:
                best = max(counts, key=lambda t: (counts[t], -high.index(t)))
                answer = f'the token "{best}"'
            else:
                answer = "nothing in particular"
        return self._chat(body, self.tokenize(answer) if answer else [])

    def _simulate_chat(self, body: dict, messages: list[dict]) -> dict:
        listing = next(m["content"] for m in reversed(messages)
                       if m.get("role") == "user" and "\nTokens:\n" in m.get("content", ""))
        head, _, lines = listing.partition("\nTokens:\n")
        named = named_in(head)
        shown = [line.split("\t", 1)[1] if "\t" in line else "" for line in lines.split("\n")]
        dists = [HIGH if s.strip().lower() in named else LOW for s in shown]
        if self.simulate_behaviour == "garbage":
            return self._chat(body, self.tokenize("The activations look high to me."))
        if self.simulate_behaviour == "misaligned":
            dists = dists[:-1]
        text = "\n".join(f"{i}\t{d[0][0]}" for i, d in enumerate(dists, 1))
        value_starts = {}
        pos = 0
        for i, d in enumerate(dists, 1):
            value_starts[pos + len(f"{i}\t")] = d
            pos += len(f"{i}\t{d[0][0]}") + 1
        tokens = self.tokenize(text)
        alternatives = []
        pos = 0
        for tok in tokens:
            alts = [(tok, math.log(0.99))]
            for j in range(len(tok)):
                d = value_starts.get(pos + j)
                if d is not None:  # the chosen token carries the most likely value; the others follow it
                    alts = [(tok, math.log(d[0][1]))] + [(tok[:j] + str(v), math.log(p)) for v, p in d[1:]]
                    break
            alternatives.append(alts)
            pos += len(tok)
        return self._chat(body, tokens, alternatives)

    # -- completions ------------------------------------------------------------------------------
    def _slots(self, prompt: str) -> dict[int, tuple]:
        """Marker offset -> distribution, for the excerpts of the last neuron of a simulation prompt."""
        if prompts.SIMULATE_PREAMBLE not in prompt:
            return {}
        head = prompt.rfind("responds to:")
        start = prompt.find("\n", head) + 1
        named = named_in(prompt[head:start].split("responds to:", 1)[-1])
        out = {}
        pos = start
        inside = False
        for line in prompt[start:].split("\n"):
            if line == prompts.OPEN or line == prompts.CLOSE:
                inside = line == prompts.OPEN
            elif inside and line.endswith("\t" + prompts.SLOT_MARKER):
                shown = line[:-2]
                out[pos + len(line) - 1] = HIGH if shown.strip().lower() in named else LOW
            pos += len(line) + 1
        return out

    def _completion(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ServerError(400, "this fake server takes one string prompt")
        slots = self._slots(prompt)
        self.calls["simulate-completion" if slots else "other-completion"] += 1
        k = body.get("logprobs") if isinstance(body.get("logprobs"), int) else 0
        tokens = self.tokenize(prompt)
        per_token = []  # (token, its logprob, alternatives)
        pos = 0
        for tok in tokens:
            alts = [(tok, -0.05)]
            for j in range(len(tok)):
                d = slots.get(pos + j)
                if d is not None:
                    if self.simulate_behaviour == "garbage":
                        alts = [(tok[:j] + w, math.log(p)) for w, (_, p) in zip(("maybe", "unsure", "hmm"), d)]
                    else:
                        alts = [(tok[:j] + str(v), math.log(p)) for v, p in d]
                    break
            per_token.append((tok, -2.5 if len(alts) > 1 else -0.05, alts))
            pos += len(tok)
        if self.simulate_behaviour == "misaligned" and slots and len(per_token) > 4:
            del per_token[len(per_token) // 2]
        generated = "\n"
        choice = {"index": 0, "text": generated, "logprobs": None, "finish_reason": "length"}
        if body.get("echo"):
            choice["text"] = prompt + generated
            if body.get("logprobs") is not None:
                toks, lps, tops, offsets = [], [], [], []
                pos = 0
                for i, (tok, lp, alts) in enumerate(per_token):
                    toks.append(tok)
                    offsets.append(pos)
                    lps.append(None if i == 0 else lp)
                    tops.append(None if i == 0 else {t: a for t, a in alts[: max(k, 1)]})
                    pos += len(tok)
                toks.append(generated)
                offsets.append(len(prompt))
                lps.append(-0.1)
                tops.append({generated: -0.1})
                choice["logprobs"] = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
        if body.get("prompt_logprobs") is not None and self.prompt_logprobs:
            kk = int(body["prompt_logprobs"])
            entries = [None]
            for tok, lp, alts in per_token[1:]:
                entry = {_tid(tok): {"logprob": lp, "rank": 1 + len(alts), "decoded_token": tok}}
                for rank, (t, a) in enumerate(alts[:kk], 1):
                    entry[_tid(t)] = {"logprob": a, "rank": rank, "decoded_token": t}
                entries.append(entry)
            choice["prompt_logprobs"] = entries
        n = len(tokens)
        return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body.get("model"),
                "choices": [choice], "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}}
