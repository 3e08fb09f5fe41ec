"""An OpenAI-compatible server on loopback for tests and benchmarks: limits, latency, faults, counts.

It speaks POST /v1/chat/completions and /v1/completions (logprobs, top_logprobs, echo, n, usage) and
GET /v1/models, and adds GET /_stats (its counters as JSON). It enforces its own requests- and
tokens-per-minute limits the way providers do, over short windows: each limit is a token bucket
holding `window_s` seconds of budget, so a client that bursts is refused with 429, Retry-After,
retry-after-ms and x-ratelimit-* headers. Replies arrive after a lognormal latency. Faults are
injected at configurable rates: 500, 502, 503, hang (a reply that never comes), reset (the connection
is reset), nonjson (a 200 whose body is HTML), truncated (a 200 whose JSON is cut in half) and cutoff
(the connection closes halfway through the body). Every request is charged against the limits, faults
included, as a provider would; only replies actually delivered count as served.

`stats.served` counts deliveries per request key (client.request.request_key of the body as
received), which is how tests prove that no request was lost and none was paid for twice.

Replies come from a responder, `responder(kind, body) -> dict` (or an awaitable dict), which may raise
ServerError to answer with an error. The default one generates deterministic text and logprobs from
the request's hash; `chat_reply` and `completion_reply` build well-formed replies for other responders
(the explain/simulate tests plug in their own).

In process:      async with TestServer(ServerConfig(rpm=600)) as server: ... server.base_url
In a thread:     with ServerThread(ServerConfig(...)) as server: ...      (sync tests)
As a process:    python -m client.testserver --port 0 --rpm 30000 --latency-ms 200 --fault-rate 0.1
                 (prints one JSON line {"base_url": ...}; spawn() does this for you)
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import inspect
import json
import math
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from client.request import request_key

FAULT_KINDS = ("500", "502", "503", "hang", "reset", "nonjson", "truncated", "cutoff")


@dataclass
class ServerConfig:
    """How the test server behaves."""

    rpm: float | None = None
    """Requests per minute it admits (None: no limit)."""
    tpm: float | None = None
    """Tokens per minute it admits, prompt plus max_tokens charged on arrival (None: no limit)."""
    window_s: float = 1.0
    """Limits are enforced over windows this long: a bucket holds window_s seconds of budget."""
    latency_ms: float = 0.0
    """Median time to reply."""
    latency_sigma: float = 0.0
    """Spread of the lognormal latency (0: always the median)."""
    latency_max_ms: float | None = None
    """Longest latency (default: 4 x the median)."""
    faults: dict[str, float] = field(default_factory=dict)
    """Probability of each fault kind per admitted request (see FAULT_KINDS)."""
    hang_s: float = 3600.0
    """How long a 'hang' holds the request before giving up (it ends early if the client leaves)."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' (401 otherwise); None accepts anything."""
    models: list[str] | None = None
    """Models it knows (404 for others); None accepts any model."""
    context_window: int = 8192
    """Prompt plus max_tokens above this is a 400 context_length_exceeded."""
    max_concurrency: int | None = None
    """Requests worked on at once above this get 503 (an overloaded self-hosted server)."""
    retry_after: str = "ms"
    """How a 429 says when to retry: 'ms' (retry-after-ms and Retry-After seconds), 'seconds',
    'date' (an HTTP date), 'none'."""
    retry_after_floor_s: float = 0.0
    """Never ask for a retry sooner than this (makes pauses long enough for tests to see)."""
    ratelimit_headers: bool = True
    """Send x-ratelimit-limit/remaining/reset-requests/tokens headers."""
    default_max_tokens: int = 16
    """Tokens generated when a body has no max_tokens."""
    seed: int = 0
    """Seed of latency and fault draws."""


@dataclass
class ServerStats:
    """What the server saw; `served` is the one that proves 'none lost, none paid twice'."""

    received: int = 0
    """Requests that arrived on the two completion endpoints."""
    admitted: int = 0
    """Requests within the limits (charged), faults included."""
    refused: int = 0
    """429s sent."""
    overloaded: int = 0
    """503s sent because of max_concurrency."""
    served: Counter = field(default_factory=Counter)
    """Successful replies delivered, by request key."""
    faults: Counter = field(default_factory=Counter)
    """Injected faults by kind."""
    errors: Counter = field(default_factory=Counter)
    """Error replies other than 429/faults, by status."""
    abandoned: int = 0
    """Replies ready after the client had gone (its timeout fired first)."""
    in_flight: int = 0
    """Requests being worked on now."""
    max_in_flight: int = 0
    """Most requests worked on at once."""
    admitted_per_100ms: Counter = field(default_factory=Counter)
    """Admissions by int(unix time * 10): the achieved rate over time."""
    refusals: list = field(default_factory=list)
    """(unix time, seconds asked to wait) of each 429."""
    arrivals: list = field(default_factory=list)
    """Unix time of each arrival on the completion endpoints."""

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("served", "faults", "errors", "admitted_per_100ms"):
            out[name] = {str(k): v for k, v in out[name].items()}
        out["refusals"] = list(self.refusals)
        out["arrivals"] = list(self.arrivals)
        return out


class ServerError(Exception):
    """Raised by a responder to answer with an OpenAI-style error."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers


class ServerFault(Exception):
    """Raised by a responder to answer this request with one of FAULT_KINDS (a reset, a hang, ...)."""

    def __init__(self, kind: str):
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        super().__init__(kind)
        self.kind = kind


# -- a toy tokenizer and deterministic replies ----------------------------------------------------

_TOKEN = re.compile(r"\s?\w+|\s?[^\w\s]+|\s+")
VOCAB = [" the", " of", " and", " to", " in", " a", " is", " that", " for", " it", " as", " with", " was",
         " on", " be", " by", " this", " are", " or", " from", " at", " which", " an", " not", " have",
         " neuron", " token", " word", " text", " code", " list", " number", ".", ",", "\n", " 0", " 1",
         " 2", " 5", " 10"]


def tokenize(text: str) -> list[str]:
    """Words with their leading space, punctuation runs, whitespace: roughly GPT-2's split."""
    return _TOKEN.findall(text)


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def prompt_tokens(kind: str, body: dict) -> list[list[str]]:
    """The prompt tokens of each prompt in a body (chat: one, of all message contents)."""
    if kind == "chat":
        return [[t for m in body.get("messages") or () for t in tokenize(_message_text(m))]]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenize(prompt)]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return [[str(t) for t in prompt]]
    if isinstance(prompt, list):
        return [tokenize(p) if isinstance(p, str) else [str(t) for t in p] for p in prompt]
    return [[]]


def prompt_token_count(kind: str, body: dict) -> int:
    """What usage.prompt_tokens says: chat adds 4 per message and 3 per reply, as OpenAI does."""
    tokens = sum(len(p) for p in prompt_tokens(kind, body))
    return tokens + 3 + 4 * len(body.get("messages") or ()) if kind == "chat" else tokens


def _max_tokens(body: dict, default: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and value >= 0 else default


def _alternatives(rng: random.Random, chosen: str, k: int) -> list[tuple[str, float]]:
    """The chosen token first with the highest logprob, then k-1 others, descending."""
    weights = sorted((rng.random() for _ in range(max(k, 1) + 1)), reverse=True)
    total = sum(weights) * 1.25  # leave mass for tokens outside the top k
    others = [t for t in rng.sample(VOCAB, min(len(VOCAB), k + 1)) if t != chosen][: max(k, 1) - 1]
    return [(tok, math.log(w / total)) for tok, w in zip([chosen] + others, weights)]


def chat_reply(body: dict, tokens: list[str], top_logprobs: list[list[tuple[str, float]]] | None = None,
               finish_reason: str = "stop", n: int | None = None) -> dict:
    """A /chat/completions reply whose message is `tokens` joined; logprobs when the body asks for them.
    top_logprobs[i] lists (token, logprob) for position i, the chosen token's own logprob first."""
    n = n or (body.get("n") if isinstance(body.get("n"), int) else 1)
    k = body.get("top_logprobs") or 0
    rng = random.Random(request_key("chat", body))
    logprobs = None
    if body.get("logprobs"):
        content = []
        for i, tok in enumerate(tokens):
            alts = top_logprobs[i] if top_logprobs else _alternatives(rng, tok, k)
            entry = {"token": tok, "logprob": alts[0][1], "bytes": list(tok.encode())}
            entry["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts[:k]]
            content.append(entry)
        logprobs = {"content": content, "refusal": None}
    text = "".join(tokens).lstrip()
    choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish_reason} for i in range(n)]
    p = prompt_token_count("chat", body)
    return {"id": "chatcmpl-" + request_key("chat", body)[:24], "object": "chat.completion", "created": 1700000000,
            "model": body.get("model"), "choices": choices, "system_fingerprint": "fp_testserver",
            "usage": {"prompt_tokens": p, "completion_tokens": len(tokens) * n, "total_tokens": p + len(tokens) * n}}


def completion_reply(body: dict, tokens: list[str], top_logprobs: list[list[tuple[str, float]]] | None = None,
                     finish_reason: str = "length") -> dict:
    """A /completions reply: each prompt (times n) continued by `tokens`; with echo, the prompt is
    repeated first and its tokens get logprobs too (the first one None, as OpenAI does)."""
    k = body.get("logprobs")
    want_logprobs = k is not None and k is not False
    k = int(k or 0)
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    echo = bool(body.get("echo"))
    rng = random.Random(request_key("completion", body))
    choices = []
    for prompt in prompt_tokens("completion", body):
        for _ in range(n):
            toks = (prompt if echo else []) + tokens
            logprobs = None
            if want_logprobs:
                lps, tops, offsets, pos = [], [], [], 0
                for i, tok in enumerate(toks):
                    offsets.append(pos)
                    pos += len(tok)
                    gen = i - (len(prompt) if echo else 0)
                    if echo and i == 0:
                        lps.append(None)
                        tops.append(None)
                        continue
                    alts = top_logprobs[gen] if top_logprobs and gen >= 0 else _alternatives(rng, tok, k)
                    lps.append(alts[0][1])
                    tops.append({t: lp for t, lp in alts[:k]} if k else None)
                logprobs = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
            choices.append({"index": len(choices), "text": "".join(toks), "logprobs": logprobs,
                            "finish_reason": finish_reason})
    p = prompt_token_count("completion", body)
    c = len(tokens) * len(choices)
    return {"id": "cmpl-" + request_key("completion", body)[:24], "object": "text_completion", "created": 1700000000,
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}


def default_responder(kind: str, body: dict, default_max_tokens: int = 16) -> dict:
    """Deterministic text from the request's hash: the same body always gets the same reply."""
    rng = random.Random(request_key(kind, body))
    tokens = [rng.choice(VOCAB) for _ in range(_max_tokens(body, default_max_tokens))]
    if kind == "chat":
        return chat_reply(body, tokens, finish_reason="length")
    return completion_reply(body, tokens)


# -- limits ---------------------------------------------------------------------------------------

class _Bucket:
    """A per-minute limit enforced over windows of window_s seconds."""

    def __init__(self, per_minute: float, window_s: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * window_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float, now: float) -> float:
        """0 if `cost` fits now (a cost above the capacity needs a full bucket), else seconds to wait."""
        self._refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def headers(self, name: str) -> dict[str, str]:
        reset = max(0.0, (self.capacity - self.level) / self.rate)
        return {f"x-ratelimit-limit-{name}": str(int(self.limit)),
                f"x-ratelimit-remaining-{name}": str(max(0, int(self.level))),
                f"x-ratelimit-reset-{name}": f"{reset:.3f}s"}


# -- the server -----------------------------------------------------------------------------------

Responder = Callable[[str, dict], Any]


class TestServer:
    """The aiohttp app and its state; start() binds 127.0.0.1 (port 0: a free one)."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: ServerConfig | None = None, responder: Responder | None = None):
        self.config = config or ServerConfig()
        self.responder = responder
        self.stats = ServerStats()
        self._rng = random.Random(self.config.seed)
        self._requests = _Bucket(self.config.rpm, self.config.window_s) if self.config.rpm else None
        self._tokens = _Bucket(self.config.tpm, self.config.window_s) if self.config.tpm else None
        self._fault_table = [(k, p) for k, p in self.config.faults.items() if p > 0]
        unknown = set(self.config.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completion)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/_stats", self._stats)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=2048)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "TestServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- handlers -------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        models = self.config.models or []  # None accepts any model: list none rather than a wrong one
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "testserver"} for m in models]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "completion")

    def _authorized(self, request: web.Request) -> bool:
        return self.config.api_key is None or request.headers.get("Authorization") == f"Bearer {self.config.api_key}"

    def _error(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
               headers: dict | None = None) -> web.Response:
        if status != 429:
            self.stats.errors[status] += 1
        return web.json_response({"error": {"message": message, "type": type, "param": None, "code": code}},
                                 status=status, headers=headers)

    def _limit_headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.config.ratelimit_headers:
            if self._requests:
                out.update(self._requests.headers("requests"))
            if self._tokens:
                out.update(self._tokens.headers("tokens"))
        return out

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        stats = self.stats
        stats.received += 1
        stats.arrivals.append(time.time())
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return self._error(400, "The request body must be a JSON object.")
        problem = self._validate(kind, body)
        if problem:
            return problem
        max_tokens = _max_tokens(body, self.config.default_max_tokens)
        prompts = prompt_tokens(kind, body)
        n_prompt = prompt_token_count(kind, body)
        longest = max(len(p) for p in prompts) + (n_prompt - sum(len(p) for p in prompts))
        if longest + max_tokens > self.config.context_window:
            return self._error(400, f"This model's maximum context length is {self.config.context_window} tokens. "
                               f"However, you requested {longest + max_tokens} tokens ({longest} in the messages, "
                               f"{max_tokens} in the completion). Please reduce the length of the messages or "
                               "completion.",
                               code="context_length_exceeded")
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        if not 1 <= n <= 128:  # as OpenAI's API
            return self._error(400, f"{n} is not a valid value for 'n': it must be between 1 and 128")
        refused = self._admit(n_prompt + max_tokens * n * len(prompts))
        if refused is not None:
            return refused
        key = request_key(kind, body)
        if self.config.max_concurrency is not None and stats.in_flight >= self.config.max_concurrency:
            stats.overloaded += 1
            return self._error(503, "The server is overloaded, please try again later.", type="server_error",
                               headers=self._limit_headers())
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await asyncio.sleep(self._latency())
            fault = self._draw_fault()
            if fault is not None:
                stats.faults[fault] += 1
                return await self._fault(request, fault, kind, body)
            try:
                reply = await self._respond(kind, body)
            except ServerError as exc:
                return self._error(exc.status, exc.message, exc.type, exc.code, exc.headers)
            except ServerFault as exc:
                stats.faults[exc.kind] += 1
                return await self._fault(request, exc.kind, kind, body)
            if request.transport is None or request.transport.is_closing():
                stats.abandoned += 1
                return web.Response(status=499)
            stats.served[key] += 1
            return web.Response(body=json.dumps(reply).encode(), content_type="application/json",
                                headers=self._limit_headers())
        finally:
            stats.in_flight -= 1

    def _validate(self, kind: str, body: dict) -> web.Response | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._error(400, "you must provide a model parameter")
        if self.config.models is not None and model not in self.config.models:
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found")
        if kind == "chat" and not isinstance(body.get("messages"), list):
            return self._error(400, "'messages' is a required property")
        if kind == "completion" and not isinstance(body.get("prompt"), (str, list)):
            return self._error(400, "'prompt' is a required property")
        if body.get("stream"):
            return self._error(400, "this test server does not stream")
        return None

    def _admit(self, tokens: int) -> web.Response | None:
        now = time.monotonic()
        wait = max(self._requests.wait(1, now) if self._requests else 0.0,
                   self._tokens.wait(tokens, now) if self._tokens else 0.0)
        if wait > 0:
            wait = max(wait, self.config.retry_after_floor_s)
            self.stats.refused += 1
            self.stats.refusals.append((time.time(), wait))
            which = "requests" if self._requests and self._requests.wait(1, now) > 0 else "tokens"
            headers = self._limit_headers()
            style = self.config.retry_after
            if style == "ms":
                headers["retry-after-ms"] = str(math.ceil(wait * 1000))
                headers["Retry-After"] = str(math.ceil(wait))
            elif style == "seconds":
                headers["Retry-After"] = str(math.ceil(wait))
            elif style == "date":
                headers["Retry-After"] = email.utils.formatdate(time.time() + wait + 1, usegmt=True)
            return self._error(429, f"Rate limit reached for {which} per min. Please try again in "
                               f"{wait * 1000:.0f}ms.", type=which, code="rate_limit_exceeded", headers=headers)
        if self._requests:
            self._requests.take(1)
        if self._tokens:
            self._tokens.take(tokens)
        self.stats.admitted += 1
        self.stats.admitted_per_100ms[int(time.time() * 10)] += 1
        return None

    def _latency(self) -> float:
        c = self.config
        if c.latency_ms <= 0:
            return 0.0
        ms = c.latency_ms * math.exp(c.latency_sigma * self._rng.gauss(0, 1)) if c.latency_sigma else c.latency_ms
        return min(ms, c.latency_max_ms if c.latency_max_ms is not None else 4 * c.latency_ms) / 1000

    def _draw_fault(self) -> str | None:
        if not self._fault_table:
            return None
        x = self._rng.random()
        for kind, p in self._fault_table:
            if x < p:
                return kind
            x -= p
        return None

    async def _respond(self, kind: str, body: dict) -> dict:
        if self.responder is None:
            return default_responder(kind, body, self.config.default_max_tokens)
        reply = self.responder(kind, body)
        return await reply if inspect.isawaitable(reply) else reply

    async def _fault(self, request: web.Request, fault: str, kind: str, body: dict) -> web.StreamResponse:
        if fault in ("500", "502", "503"):
            return self._error(int(fault), "The server had an error while processing your request. Sorry about that!",
                               type="server_error")
        if fault == "hang":
            deadline = time.monotonic() + self.config.hang_s
            while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.2)
            return web.Response(status=504)
        if fault == "reset":
            _reset(request)
            return web.Response(status=500)  # never written: the connection is gone
        if fault == "nonjson":
            return web.Response(status=200, content_type="text/html",
                                text="<html><body><h1>502 Bad Gateway</h1>nginx</body></html>")
        payload = json.dumps(await self._respond_quietly(kind, body)).encode()
        if fault == "truncated":
            return web.Response(body=payload[: len(payload) // 2], content_type="application/json",
                                headers=self._limit_headers())
        # cutoff: promise the whole body, send half, then close.
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(payload)
        await resp.prepare(request)
        await resp.write(payload[: len(payload) // 2])
        _reset(request)
        return resp

    async def _respond_quietly(self, kind: str, body: dict) -> dict:
        try:
            return await self._respond(kind, body)
        except (ServerError, ServerFault):
            return {"choices": [{"index": 0, "text": ""}]}


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed proxy would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


# -- running it -----------------------------------------------------------------------------------

class ServerThread:
    """A TestServer on its own event loop in a daemon thread, for synchronous tests."""

    __test__ = False

    def __init__(self, config: ServerConfig | None = None, responder: Responder | None = None, port: int = 0):
        self.server = TestServer(config, responder)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="testserver", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(port=self._port), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    async def _shutdown(self) -> None:
        # Handlers still running (a hang, a reply whose client went away) are cancelled and awaited,
        # so that no task is left pending on a loop that stops ("Task was destroyed but it is pending").
        await self.server.stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def stats(self) -> ServerStats:
        """The live counters (read them once the client is done, or use snapshot())."""
        return self.server.stats

    def snapshot(self) -> dict:
        """A consistent copy of the counters, taken on the server's loop."""
        async def take():
            return self.server.stats.to_json()
        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (to change its config or responder safely)."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)


class SpawnedServer:
    """A test server in a child process (its CPU is not the client's)."""

    def __init__(self, proc: subprocess.Popen, base_url: str):
        self.proc = proc
        self.base_url = base_url

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/_stats", timeout=30) as resp:
            return json.load(resp)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "SpawnedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn(args: list[str], python: str = sys.executable) -> SpawnedServer:
    """Start `python -m client.testserver ARGS` and wait until it listens."""
    proc = subprocess.Popen([python, "-m", "client.testserver", *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the test server did not start (exit status {proc.returncode})")
    return SpawnedServer(proc, json.loads(line)["base_url"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    kinds = FAULT_KINDS if args.faults == "all" else tuple(k for k in args.faults.split(",") if k)
    faults = {k: args.fault_rate / len(kinds) for k in kinds} if args.fault_rate > 0 else {}
    return ServerConfig(rpm=args.rpm, tpm=args.tpm, window_s=args.window_s, latency_ms=args.latency_ms,
                        latency_sigma=args.latency_sigma, latency_max_ms=args.latency_max_ms, faults=faults,
                        hang_s=args.hang_s, api_key=args.api_key, max_concurrency=args.max_concurrency,
                        retry_after=args.retry_after, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m client.testserver", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--tpm", type=float, default=None)
    p.add_argument("--window-s", type=float, default=1.0, help="limits are enforced over windows this long")
    p.add_argument("--latency-ms", type=float, default=0.0, help="median latency")
    p.add_argument("--latency-sigma", type=float, default=0.0, help="lognormal spread of the latency")
    p.add_argument("--latency-max-ms", type=float, default=None)
    p.add_argument("--fault-rate", type=float, default=0.0, help="probability of a fault per admitted request")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated kinds sharing the rate ({','.join(FAULT_KINDS)}) or all")
    p.add_argument("--hang-s", type=float, default=3600.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--retry-after", default="ms", choices=["ms", "seconds", "date", "none"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    async def serve() -> None:
        server = TestServer(config_from_args(args))
        await server.start(port=args.port)
        print(json.dumps({"base_url": server.base_url}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
