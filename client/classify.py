"""What a reply means: a usable response, a failure worth retrying, or one that will never succeed.

Retried: 408, 409, 429, 5xx, and 2xx bodies that are not JSON or are cut short (proxies and
overloaded servers produce them). Failed at once, with the server's own message: other 4xx
(400 including context-length errors, 401, 402, 403, 404, 422, ...), a 429 that says the account's
quota is spent (insufficient_quota: waiting does not help), a JSON reply that is not an OpenAI
reply, and a reply without the logprobs the request asked for (the same server will drop them
again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from client.limits import parse_retry_after
from client.request import RequestError, logprobs_requested
from client.transport import HttpReply, server_message

RETRYABLE_STATUS = {408, 409, 429}
_QUOTA = re.compile(r"insufficient_quota|exceeded your current quota|quota exceeded|billing", re.I)
_CONTEXT = re.compile(r"context.length|maximum context|context window|too many tokens|prompt is too long", re.I)


@dataclass
class Verdict:
    """The meaning of one reply."""

    response: dict | None = None
    """The parsed reply, when usable."""
    error: RequestError | None = None
    """Why not, when not."""
    retry_after: float | None = None
    """Seconds the server asked us to wait (Retry-After), if it did."""


def classify(kind: str, body: dict, reply: HttpReply) -> Verdict:
    status = reply.status
    if 200 <= status < 300:
        return _success(kind, body, reply)
    message = server_message(reply.body)
    if status == 429 and _is_quota(reply.body):
        # OpenAI's "You exceeded your current quota": no wait makes it pass, unlike a rate limit.
        return Verdict(error=RequestError("quota", message, status))
    if status in RETRYABLE_STATUS or status >= 500:
        return Verdict(error=RequestError("http", message, status, retryable=True),
                       retry_after=parse_retry_after(reply.headers))
    if status == 401:
        return Verdict(error=RequestError("auth", message, status))
    if status in (400, 413, 422) and (_CONTEXT.search(message) or b"context_length_exceeded" in reply.body):
        return Verdict(error=RequestError("context_length", message, status))
    return Verdict(error=RequestError("http", message, status))


def _is_quota(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return False
    return any(isinstance(err.get(k), str) and _QUOTA.search(err[k]) for k in ("code", "type"))


def _success(kind: str, body: dict, reply: HttpReply) -> Verdict:
    try:
        data = json.loads(reply.body)
    except (ValueError, RecursionError) as exc:
        snippet = reply.body[:60].decode("utf-8", "replace")
        if isinstance(exc, UnicodeDecodeError):
            what, why = "not UTF-8", f"byte {reply.body[exc.start:exc.start + 1]!r} at {exc.start}"
        else:
            what = "cut short" if reply.body.lstrip().startswith((b"{", b"[")) else "not JSON"
            why = "nested too deeply" if isinstance(exc, RecursionError) else getattr(exc, "msg", str(exc))
        return Verdict(error=RequestError("bad_body", f"reply body is {what} ({why}): {snippet!r}",
                                          reply.status, retryable=True))
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        if isinstance(data, dict) and "error" in data:
            # Some gateways wrap an upstream failure in a 200; treat it like the 5xx it stands for.
            return Verdict(error=RequestError("http", server_message(reply.body), reply.status, retryable=True))
        if isinstance(data, dict) and isinstance(data.get("choices"), list):
            what = "an empty 'choices' list"
        elif isinstance(data, dict) and "choices" in data:
            value = data["choices"]
            what = f"'choices' that is {'null' if value is None else type(value).__name__}, not a list"
        else:
            keys = ", ".join(list(data)[:6]) if isinstance(data, dict) else type(data).__name__
            what = f"no 'choices' (it has: {keys})"
        return Verdict(error=RequestError(
            "not_openai", f"the reply has {what}; the server does not speak the OpenAI API at this base URL",
            reply.status))
    if not all(isinstance(c, dict) for c in data["choices"]):
        return Verdict(error=RequestError(
            "not_openai", "the reply's 'choices' are not objects; the server does not speak the OpenAI API at "
            "this base URL", reply.status))
    missing = _missing_logprobs(kind, body, data)
    if missing:
        return Verdict(error=RequestError("missing_logprobs", missing, reply.status))
    return Verdict(response=data)


def _missing_logprobs(kind: str, body: dict, data: dict) -> str | None:
    choices = data["choices"]
    if logprobs_requested(kind, body):
        field = "content" if kind == "chat" else "token_logprobs"
        want_top = body.get("top_logprobs") if kind == "chat" else body.get("logprobs")
        for choice in choices:
            lp = choice.get("logprobs") if isinstance(choice, dict) else None
            if not isinstance(lp, dict) or not isinstance(lp.get(field), list):
                return ("the reply has no logprobs although the request asked for them: the server ignores "
                        "'logprobs' (use one that returns them, e.g. vLLM, or drop the field)")
            if want_top and isinstance(want_top, int) and want_top > 0:
                entries = lp[field] if kind == "chat" else lp.get("top_logprobs")
                if kind == "chat":
                    ok = all(isinstance(e, dict) and e.get("top_logprobs") for e in entries)
                else:
                    ok = isinstance(entries, list) and len(entries) == len(lp[field])
                if not ok:
                    return ("the reply has no top_logprobs although the request asked for them: the server "
                            "ignores 'top_logprobs'")
    if body.get("prompt_logprobs") is not None:
        if "prompt_logprobs" not in data and not all(
                isinstance(c, dict) and c.get("prompt_logprobs") is not None for c in choices):
            return "the reply has no prompt_logprobs although the request asked for them (a vLLM extension)"
    return None
