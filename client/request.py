"""What one request is, what comes back, and the canonical key that makes both durable.

A request is an OpenAI request body plus the endpoint kind ("chat" for /chat/completions,
"completion" for /completions). Its key is the sha256 of the canonical JSON of (kind, body): the base
URL and the key are left out on purpose, so that the same request sent to a mirror or with another
key is still recognised as already done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("chat", "completion")
PATHS = {"chat": "/chat/completions", "completion": "/completions"}


def _canonical(value: Any) -> Any:
    # 1.0 and 1 mean the same thing to every server; hash them the same so that reformatting a
    # request file does not pay for its requests again.
    t = type(value)
    if t is float:
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if t is dict:  # strings are most leaves: skip the call for them
        return {k: v if type(v) is str else _canonical(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) is str else _canonical(v) for v in value]
    return value


def canonical_json(kind: str, body: dict) -> str:
    """The text that is hashed: sorted keys, no whitespace, integral floats written as integers."""
    return json.dumps([kind, _canonical(body)], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(kind: str, body: dict) -> str:
    """sha256 (hex) of the canonical (kind, body): the request's identity in the store and on the server."""
    return hashlib.sha256(canonical_json(kind, body).encode()).hexdigest()


def guess_kind(body: dict) -> str | None:
    """'chat' for a body with messages, 'completion' for one with a prompt, None otherwise."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    return None


def prompt_chars(kind: str, body: dict) -> int:
    """Characters of prompt text in a body: the basis of the token estimate before usage is known."""
    if kind == "chat":
        n = 0
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                n += len(content)
            elif isinstance(content, list):  # content parts: count the text ones
                n += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        return n
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):  # token ids: four characters a token is the usual rate
            return 4 * len(prompt)
        return sum(len(p) if isinstance(p, str) else 4 * len(p) for p in prompt)
    return 0


def prompt_count(kind: str, body: dict) -> int:
    """How many prompts one body holds (a completions body may batch several)."""
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return len(prompt)
    return 1


def max_completion_tokens(body: dict) -> int | None:
    """The completion budget the body asks for (max_tokens or max_completion_tokens), per choice."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(value, float) and value.is_integer():  # 1000.0: servers that validate with pydantic take it
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def logprobs_requested(kind: str, body: dict) -> bool:
    """Whether the reply must carry per-token logprobs for the generated tokens."""
    if kind == "chat":
        return bool(body.get("logprobs"))
    # /completions: logprobs=0 is valid and still asks for the chosen tokens' logprobs.
    return body.get("logprobs") is not None and body.get("logprobs") is not False


@dataclass(frozen=True)
class Request:
    """One request to send: an OpenAI request body and its endpoint."""

    body: dict
    """The JSON body, passed through unchanged (extra fields such as vLLM's prompt_logprobs too)."""
    kind: str = "chat"
    """'chat' (/chat/completions) or 'completion' (/completions)."""
    id: Any = None
    """The caller's name for it; carried to the Result, never sent."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if not isinstance(self.body, dict):
            raise TypeError("a request body must be a dict")
        if self.body.get("stream"):
            raise ValueError('"stream": true is not supported: the client needs whole replies')

    @functools.cached_property
    def key(self) -> str:
        """The request's identity: see request_key."""
        return request_key(self.kind, self.body)


@dataclass(frozen=True)
class RequestError:
    """Why a request failed (one attempt, or for good)."""

    type: str
    """http, timeout, connection, bad_body, not_openai, missing_logprobs, context_length, auth,
    quota, deadline, interrupted, store, internal."""
    message: str
    """The server's own message where there is one, else ours; one line."""
    status: int | None = None
    """The HTTP status, when a reply came."""
    retryable: bool = False
    """Whether another attempt may succeed."""
    stopped: bool = False
    """The request did not finish because the run stopped (stop(), Ctrl-C, a refused API key, a spent
    quota, a pause past the deadline, the caller leaving a stream): it was not dead-lettered, and a
    rerun sends it again. Its type says why: 'interrupted', or 'auth' / 'quota' for the request whose
    refusal stopped the run."""

    def to_json(self) -> dict:
        """The form written to result files and the dead-letter table."""
        out = {"type": self.type, "message": self.message}
        if self.status is not None:
            out["status"] = self.status
        return out

    def __str__(self) -> str:
        return f"{self.type} {self.status}: {self.message}" if self.status else f"{self.type}: {self.message}"


def _count(value) -> int:
    """A token count from a reply's usage: a non-negative finite number, else 0. A server's odd usage
    field must never cost the reply (it is paid for; it is stored whatever usage says)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return 0
    try:
        number = float(value)
    except (ValueError, OverflowError):  # float() of a 401-digit int or string overflows
        return 0
    return int(number) if math.isfinite(number) and 0 < number <= MAX_COUNT else 0


MAX_COUNT = 10**12
"""Above this a usage count is no count (SQLite holds 2^63; no reply has a trillion tokens)."""


@dataclass
class Usage:
    """Tokens one reply consumed, as the server reported them."""

    prompt_tokens: int = 0
    """Tokens of the prompt (usage.prompt_tokens)."""
    completion_tokens: int = 0
    """Tokens generated (usage.completion_tokens)."""
    cached_tokens: int = 0
    """Prompt tokens the provider served from its prompt cache (billed at a lower rate)."""

    @classmethod
    def from_reply(cls, reply: dict) -> "Usage":
        usage = reply.get("usage") if isinstance(reply, dict) else None
        if not isinstance(usage, dict):
            return cls()
        details = usage.get("prompt_tokens_details")
        return cls(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            cached_tokens=_count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
        )


@dataclass
class Result:
    """What became of one Request: the parsed reply, or the error that ended it."""

    request: Request
    """The request this answers."""
    raw: bytes | None = None
    """The reply body as received (None on failure); `response` parses it on first use."""
    error: RequestError | None = None
    """Why it failed for good (None on success)."""
    source: str = "sent"
    """'sent' (sent to the server this run), 'store' (completed or dead-lettered in an earlier run, no
    HTTP), 'shared' (an identical request was in flight at the same time and its outcome was reused),
    or 'unsent' (the run stopped, or the caller left, before it was sent: not paid). When the caller
    a request was started for leaves and another waits for it, the other's result is 'sent'."""
    attempts: int = 0
    """HTTP attempts this run (0 when served from the store or shared)."""
    usage: Usage = field(default_factory=Usage)
    """Tokens of the reply (zero for failures)."""
    cost: float | None = None
    """USD of the reply by the price table; None if the model has no price; 0 if it was not paid this run."""

    @property
    def id(self) -> Any:
        return self.request.id

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def ok(self) -> bool:
        return self.error is None

    @functools.cached_property
    def response(self) -> dict | None:
        """The parsed JSON reply (choices, logprobs, usage, ...), or None on failure."""
        return None if self.raw is None else json.loads(self.raw)

    def unwrap(self) -> dict:
        """The parsed reply; raises RequestFailed if the request failed."""
        if self.error is not None:
            raise RequestFailed(self.error, self.request)
        return self.response


class RequestFailed(Exception):
    """Raised by Result.unwrap for a request that failed for good."""

    def __init__(self, error: RequestError, request: Request):
        super().__init__(str(error))
        self.error = error
        self.request = request
