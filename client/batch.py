"""Request files in, result files out: the plumbing of `neuronatlas batch`.

A request file is JSONL, one request a line, in either form:

    {"id": "a1", "model": "gpt-4o-mini", "messages": [...], "max_tokens": 20}      # a body (+ optional id)
    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}  # OpenAI Batch API

A body with "messages" goes to /chat/completions, one with "prompt" to /completions; a line without an
id is named by its line number. A line that cannot be used is reported with its number and the rest
still run. The result file has one line per input line, in input order, written whole (atomically)
from the store at the end of every run that finishes (a stopped run leaves it as it was), so a rerun
rewrites it complete:

    {"id": "a1", "response": {...the reply...}}
    {"id": "a2", "error": {"type": "http", "status": 400, "message": "..."}}
    {"id": null, "line": 7, "error": {"type": "bad_input", "message": "line 7: not valid JSON (...)"}}

A line that cannot be used keeps its id in the result when it has one of its own, except a line whose
id repeats an earlier one (2 and "2" are the same id): its id is null, so that each id names one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from client.request import Request, guess_kind
from client.results import json_safe

_URL_KINDS = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
              "/v1/completions": "completion", "/completions": "completion"}


@dataclass
class InputLine:
    """One non-empty line of a request file."""

    line: int
    """1-based line number."""
    id: Any
    """The request's id (its line number when it has none); None when the line is not readable."""
    request: Request | None = None
    """The request, when the line is usable."""
    error: str | None = None
    """Why the line cannot be used ('line N: ...'), when it cannot."""
    implicit: bool = False
    """Whether the id is the line number (the line has none)."""


def read_requests(path: str, default_model: str | None = None) -> list[InputLine]:
    """Parse a request file; bad lines come back with `error` set, never raise for content.
    Raises OSError if the file cannot be read."""
    out: list[InputLine] = []
    seen: dict[str, int] = {}
    out_ids: dict[int, bool] = {}  # line -> whether its id is its line number
    # Lines end at "\n" only (a stray "\r" inside a line neither splits it nor shifts the line
    # numbers an editor shows); each is decoded alone, so that one line that is not UTF-8 is
    # refused rather than sent altered (with U+FFFD in place of its bytes) and paid for.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: a BOM is not part of line 1
            except UnicodeDecodeError as exc:
                out.append(InputLine(n, None, error=f"line {n}: not valid UTF-8 (byte {exc.start + 1} of the line)"))
                continue
            if not text.strip():
                continue
            item = _parse_line(n, text, default_model)
            if item.id is not None:  # a refused line's id is in the results too: no later line may reuse it
                key = str(item.id)  # 2 and "2" are one id to whoever joins the results on it
                if key in seen:
                    first = seen[key]
                    if item.implicit:
                        why = (f"line {n}: the line has no id, and its number {n} is already the id of line "
                               f"{first}; give it an id")
                    else:
                        why = (f"line {n}: id {item.id!r} is already used on line {first}"
                               + (" (its line number: that line has no id)" if out_ids[first] else "")
                               + "; ids must be unique")
                    # The id is the other line's in the results: this line is reported without one.
                    item = InputLine(n, None, error=why if item.error is None else item.error)
                else:
                    seen[key] = n
                    out_ids[n] = item.implicit
            out.append(item)
    return out


def _plain_id(obj: dict):
    """The id a refused line is reported under, when it has a usable one."""
    rid = obj.get("custom_id", obj.get("id"))
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) and _text_ok(rid) else None


def _text_ok(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except (UnicodeEncodeError, ValueError):
        return False


def _parse_line(n: int, text: str, default_model: str | None) -> InputLine:
    def bad(message: str, id: Any = None) -> InputLine:
        return InputLine(n, id, error=f"line {n}: {message}")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(f"not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return bad("not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return bad(f"a request must be a JSON object, not {type(obj).__name__}")
    try:  # what Python's json takes but no server should be sent
        json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return bad(f"holds an unpaired surrogate escape (\\u{ord(exc.object[exc.start]):04x}), which is not "
                   "Unicode text (an emoji cut in half?)", _plain_id(obj))
    except ValueError:
        return bad("holds NaN or Infinity, which JSON does not allow", _plain_id(obj))
    except RecursionError:
        return bad("not valid JSON (nested too deeply)")
    if "body" in obj and isinstance(obj.get("body"), dict) and ("url" in obj or "custom_id" in obj):
        implicit = "custom_id" not in obj and "id" not in obj
        rid = obj.get("custom_id", obj.get("id", n))
        body = dict(obj["body"])
        url = obj.get("url")
        kind = (_URL_KINDS.get(url) if isinstance(url, str) else None) if url else guess_kind(body)
        if kind is None and not url:
            return bad('no "url" and no "messages" (chat) or "prompt" (completion) in the body', rid)
        if kind is None:
            return bad(f"url {json.dumps(url)} is not /v1/chat/completions or /v1/completions", rid)
        method = obj.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            return bad(f'"method" is {json.dumps(method)}: completions are POST requests', rid)
    else:
        body = dict(obj)
        implicit = "id" not in body
        rid = body.pop("id", n)
        kind = guess_kind(body)
        if kind is None:
            return bad('no "messages" (chat) or "prompt" (completion) in the request', rid)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return bad(f"id must be a string or an integer, not {json.dumps(rid)}")
    if "model" not in body:
        if not default_model:
            return bad('no "model": add one to the line or pass --model', rid)
        body["model"] = default_model
    elif not isinstance(body["model"], str) or not body["model"]:
        return bad(f'"model" must be a model name, not {json.dumps(body["model"])}', rid)
    if kind == "chat" and not isinstance(body.get("messages"), list):
        return bad('"messages" must be a list of {"role": ..., "content": ...}', rid)
    if kind == "completion" and not isinstance(body.get("prompt"), (str, list)):
        return bad('"prompt" must be a string or a list', rid)
    try:
        request = Request(body, kind, rid)
    except (ValueError, TypeError) as exc:
        return bad(str(exc), rid)
    return InputLine(n, rid, request, implicit=implicit)


def write_results(path: str, lines: list[InputLine], responses: dict[str, bytes], errors: dict[str, dict]) -> None:
    """Write the result file atomically: a reader sees the old file or the whole new one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for item in lines:
                if item.error is not None:
                    record = {"id": item.id, "line": item.line, "error": {"type": "bad_input", "message": item.error}}
                else:
                    key = item.request.key
                    raw = responses.get(key)
                    if raw is not None:
                        record = {"id": item.id, "response": json.loads(raw)}
                    else:
                        error = errors.get(key) or {"type": "interrupted", "message": "not finished"}
                        record = {"id": item.id, "error": error}
                # A reply may hold NaN or Infinity (Python's parser takes them); written back as they
                # came they would make the line invalid JSON for every strict reader: null instead.
                f.write(json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
