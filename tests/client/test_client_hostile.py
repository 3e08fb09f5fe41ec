"""What a hostile or broken server, request file or store does to `neuronatlas batch`: absurd
usage counts and pauses, request lines Python reads but no server should get, a results path
that is the store, a store damaged inside. Each case was found by probing the CLI from outside."""

from __future__ import annotations

import json
import time

import pytest

from client import cli
from client.batch import read_requests
from client.classify import classify
from client.limits import TokenBucket
from client.testserver import ServerError, chat_reply
from client.transport import HttpReply
from client_testlib import stored_keys


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "NEURONATLAS_STORE", "NEURONATLAS_PRICES"):
        monkeypatch.delenv(name, raising=False)


def write_lines(path, contents):
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": c}]}) + "\n"
                            for i, c in enumerate(contents)))


def batch(server, tmp_path, *more):
    return cli.main(["batch", str(tmp_path / "req.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--model", "m",
                     "--base-url", server.base_url, "--api-key", "k", "--progress", "off", *more])


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_pause_longer_than_the_deadline_stops_at_once(make_server, tmp_path, capsys):
    """With requests waiting on the RPM bucket, the stop's cancel used to be swallowed by the
    dispatcher's wait (Python 3.11's wait_for) and the run slept the whole pause first."""
    def responder(kind, body):
        if body["messages"][0]["content"] == "pause":
            raise ServerError(429, "slow down", type="rate_limit_error", headers={"Retry-After": "30"})
        return chat_reply(body, ["ok"])

    server = make_server(responder=responder)
    write_lines(tmp_path / "req.jsonl", ["pause", "b", "c", "d"])
    t0 = time.monotonic()
    assert batch(server, tmp_path, "--rpm", "60", "--deadline", "10") == 2
    assert time.monotonic() - t0 < 8
    assert "asks for a pause of 30 s" in error_line(capsys)


def test_absurd_pauses_and_usage_counts_are_handled(make_server, tmp_path, capsys):
    def responder(kind, body):
        content = body["messages"][0]["content"]
        if content == "forever":
            raise ServerError(429, "later", type="rate_limit_error", headers={"Retry-After": "1e300"})
        reply = chat_reply(body, ["ok"])
        if content.startswith("usage "):
            reply["usage"]["prompt_tokens"] = json.loads(content[6:])  # 1e20, a 401-digit integer
        return reply

    server = make_server(responder=responder)
    write_lines(tmp_path / "req.jsonl", ["usage 1e20", "usage 1" + "0" * 400, "usage -3", "plain"])
    assert batch(server, tmp_path, "--tpm", "6000") == 0  # stored whatever usage says; no stall
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("response" in r) for r in results] == [True] * 4
    assert len(stored_keys(str(tmp_path / "out.jsonl") + ".requests.sqlite")) == 4
    capsys.readouterr()
    write_lines(tmp_path / "req.jsonl", ["forever"])
    assert batch(server, tmp_path) == 2
    line = error_line(capsys)
    assert "pause of 1e+300 s" in line and "days from now" in line


def test_a_servers_word_never_puts_the_budget_more_than_a_minute_in_debt():
    bucket = TokenBucket.per_minute(6000, 1.0, now=0.0)
    bucket.give_back(-1e15)  # a reply claiming 10^15 tokens more than estimated
    assert bucket.wait_time(10, 0.0) <= 62
    bucket = TokenBucket.per_minute(6000, 1.0, now=0.0)
    bucket.cap(-1e12, 0.0)   # "x-ratelimit-remaining-tokens: -1000000000000"
    assert bucket.wait_time(10, 0.0) <= 62
    bucket = TokenBucket.per_minute(6000, 1.0, now=0.0)
    bucket.give_back(-500.0)  # a real under-estimate still counts in full
    assert bucket.wait_time(10, 0.0) == pytest.approx(4.1)


def test_request_lines_no_server_should_get_are_refused_alone(tmp_path):
    path = tmp_path / "req.jsonl"
    ok = json.dumps({"id": "ok", "messages": [{"role": "user", "content": "fine"}]})
    path.write_bytes(b"\n".join([
        b'{"id": "cut", "messages": [{"role": "user", "content": "emoji \\ud83d cut"}]}',
        b'{"id": "nan", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
        b'{"id": "latin1", "messages": [{"role": "user", "content": "caf\xe9"}]}',
        b'{"id": "x", "messages": "not a list"}',
        b'{"id": "x", "messages": [{"role": "user", "content": "same id as a refused line"}]}',
        b'{"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": []}}',
        b'{"id": "cr",\r "messages": [{"role": "user", "content": "b"}]}',
        ok.encode(),
    ]) + b"\n")
    lines = read_requests(str(path), default_model="m")
    errors = {item.line: item.error for item in lines if item.error}
    assert "unpaired surrogate" in errors[1] and "NaN or Infinity" in errors[2]
    assert "not valid UTF-8" in errors[3] and '"messages" must be a list' in errors[4]
    assert "id 'x' is already used on line 4" in errors[5] and '"method" is "GET"' in errors[6]
    # A stray carriage return is inside its line: line numbers stay an editor's.
    usable = {item.line: item for item in lines if not item.error}
    assert sorted(usable) == [7, 8] and usable[7].id == "cr"
    assert [item.id for item in lines if item.line in (4, 5)] == ["x", None]  # ids stay unique in the results


def test_results_written_over_the_store_are_refused(make_server, tmp_path, capsys):
    server = make_server()
    write_lines(tmp_path / "req.jsonl", ["a"])
    assert batch(server, tmp_path, "--store", str(tmp_path / "out.jsonl")) == 2
    assert "is the request store (--store)" in error_line(capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_store_damaged_inside_is_one_line(make_server, tmp_path, capsys):
    server = make_server()
    write_lines(tmp_path / "req.jsonl", [f"request {i} " + "x" * 200 for i in range(60)])
    assert batch(server, tmp_path) == 0
    store = tmp_path / "out.jsonl.requests.sqlite"
    with open(store, "r+b") as f:  # a data page, not the header: the store still opens
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096)
    capsys.readouterr()
    assert batch(server, tmp_path) == 2
    assert "is damaged" in error_line(capsys)


def test_a_reply_nested_too_deeply_to_parse_is_a_bad_body():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    deep = b"[" * 200_000 + b"]" * 200_000
    verdict = classify("chat", body, HttpReply(200, {"content-type": "application/json"}, deep))
    assert verdict.response is None and verdict.error.type == "bad_body" and verdict.error.retryable


def test_bare_429s_do_not_collapse_throughput(make_server, tmp_path, capsys):
    """A server that refuses with bare 429s (no Retry-After, no x-ratelimit-* headers). The one
    request of a burst it let through used to end the probe, every refusal of the burst doubled
    the backoff, and the run crawled at a few requests a minute in 30 s bursts. Not a speed
    target: a liveness bound, several times the ideal (20 requests at 240 a minute: 5 s)."""
    server = make_server(rpm=240, window_s=1.0, ratelimit_headers=False, retry_after="none", latency_ms=20)
    write_lines(tmp_path / "req.jsonl", [f"r{i}" for i in range(20)])
    t0 = time.monotonic()
    assert batch(server, tmp_path) == 0
    assert time.monotonic() - t0 < 25
    snap = server.snapshot()
    assert len(snap["served"]) == 20 and max(snap["served"].values()) == 1


def test_nan_and_infinity_in_replies_leave_the_results_strict_json(make_server, tmp_path):
    # Python's parser takes NaN and Infinity in a reply; written back as they came, they would make
    # the result line unreadable to every strict JSON reader. They come out as null.
    def responder(kind, body):
        return {**chat_reply(body, [" x"]), "x_scores": [float("nan"), float("inf"), -float("inf"), 0.5]}

    server = make_server(responder=responder)
    write_lines(tmp_path / "req.jsonl", ["a", "b"])
    assert batch(server, tmp_path) == 0

    def strict(constant):
        raise ValueError(f"{constant} in a result line")

    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    results = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["response"]["x_scores"] for r in results] == [[None, None, None, 0.5]] * 2
    assert results[0]["response"]["choices"][0]["message"]["content"].strip() == "x"
