"""Pure pieces of the client: request keys, header parsing, pacing, prices, reply classification."""

from __future__ import annotations

import email.utils
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.classify import classify
from client.limits import Limits, TokenBucket, _int_header, parse_duration, parse_retry_after
from client.prices import Price, PriceTable
from client.request import Request, Usage, request_key
from client.testserver import chat_reply, completion_reply, default_responder
from client.transport import HttpReply

# -- keys -----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
@settings(max_examples=60, deadline=None)
def test_key_ignores_key_order_and_survives_a_json_round_trip(body):
    reordered = dict(reversed(list(body.items())))
    assert request_key("chat", body) == request_key("chat", reordered)
    assert request_key("chat", body) == request_key("chat", json.loads(json.dumps(body)))


def test_key_separates_what_matters():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0}
    same = {"temperature": 1, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert request_key("chat", body) == request_key("chat", same)           # 1.0 == 1, order free
    assert request_key("chat", body) != request_key("completion", body)     # the endpoint matters
    assert request_key("chat", body) != request_key("chat", {**body, "model": "m2"})
    assert request_key("chat", body) != request_key("chat", {**body, "temperature": 0.5})
    assert Request(body).key == request_key("chat", body)


def test_request_rejects_streaming_and_unknown_kinds():
    with pytest.raises(ValueError, match="stream"):
        Request({"model": "m", "messages": [], "stream": True})
    with pytest.raises(ValueError, match="kind"):
        Request({"model": "m"}, kind="embeddings")


# -- headers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("2.5s", 2.5),
    ("", None), ("soon", None), ("5x", None), ("1s junk", None),
])
def test_parse_duration(text, seconds):
    got = parse_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_retry_after_prefers_ms_then_seconds_then_dates():
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == pytest.approx(1.5)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now_wall=now) == pytest.approx(7, abs=1)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now_wall=now) == 0
    assert parse_retry_after({"retry-after": "tomorrow"}) is None
    assert parse_retry_after({}) is None


# -- pacing ---------------------------------------------------------------------------------------

@given(rpm=st.floats(60, 100_000), burst_s=st.floats(0.01, 0.5),
       gaps=st.lists(st.floats(0, 0.05), min_size=50, max_size=300), window=st.floats(0.05, 2.0))
@settings(max_examples=60, deadline=None)
def test_bucket_never_exceeds_rate_times_window_plus_burst(rpm, burst_s, gaps, window):
    """Whatever the arrival pattern, requests sent in any window of length T are at most rate*T + burst."""
    bucket = TokenBucket.per_minute(rpm, burst_s, now=0.0)
    now, sent = 0.0, []
    for gap in gaps:
        now += gap
        wait = bucket.wait_time(1, now)
        now += wait
        assert bucket.wait_time(1, now) == pytest.approx(0, abs=1e-9)
        bucket.take(1, now)
        sent.append(now)
    rate = rpm / 60
    j = 0
    for i, t in enumerate(sent):
        while sent[j] < t - window:
            j += 1
        assert i - j + 1 <= rate * window + bucket.burst + 1e-6


def test_bucket_paces_evenly_after_the_burst():
    bucket = TokenBucket.per_minute(6000, 0.05, now=0.0)   # 100/s, burst 5
    now, times = 0.0, []
    for _ in range(105):
        now += bucket.wait_time(1, now)
        bucket.take(1, now)
        times.append(now)
    assert times[4] == 0.0 and times[5] > 0                  # the burst, then pacing
    assert times[-1] == pytest.approx(1.0, abs=1e-6)         # 100 more at 100/s
    gaps = [b - a for a, b in zip(times[5:], times[6:])]
    assert max(gaps) == pytest.approx(0.01) and min(gaps) == pytest.approx(0.01)


def test_default_pacing_stays_within_the_limit_over_any_second():
    """Providers enforce per-minute limits over windows as short as a second: with the default
    headroom and burst no one-second window holds more than rpm / 60 requests, whenever the
    dispatcher wakes. And the window check does not slow small requests below the paced rate."""
    for rpm in (600, 3000, 60_000):
        limits = Limits(rpm=rpm, tpm=None, learn_from_headers=False, clock=lambda: 0.0)
        bucket, now, sent = limits.requests, 0.0, []
        for k in range(rpm // 20):  # 3 s of sends, waking late now and then
            now += bucket.wait_time(1, now) + (0.004 if k % 7 == 0 else 0.0)
            bucket.take(1, now)
            sent.append(now)
        j = 0
        for i, t in enumerate(sent):
            while sent[j] <= t - 1.0:
                j += 1
            assert i - j + 1 <= rpm / 60, (rpm, t)
        if rpm == 60_000:
            assert len(sent) / now >= 0.985 * rpm / 60


def _send_paced(limits: Limits, clock: list, tokens: float) -> float:
    """Wait (on the fake clock) as `Limits.acquire` would, send, and return at once."""
    while (wait := limits.delay(tokens)) != 0:
        assert wait is not None
        clock[0] += wait
    limits.take(tokens)
    limits.release()
    return clock[0]


def _most_in_a_second(times: list[float], costs: list[float], window: float = 1.0) -> float:
    return max(sum(c for u, c in zip(times, costs) if t <= u < t + window) for t in times)


def test_the_probe_counts_against_the_limit_it_learns():
    """The lone first request leaves before the limit is known; once its headers teach the limit,
    that request is charged, so the first second holds no more than the limit either."""
    clock = [0.0]
    limits = Limits(rpm=None, tpm=None, clock=lambda: clock[0])
    times = [_send_paced(limits, clock, 10)]
    clock[0] += 0.001
    limits.on_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599"})
    times += [_send_paced(limits, clock, 10) for _ in range(40)]
    assert _most_in_a_second(times, [1] * len(times)) <= 10


def test_a_lower_limit_from_the_headers_charges_what_went_out_under_the_users():
    """--rpm 1200 given, the server's headers say 300: the request that brought them counts
    against the 300 as well."""
    clock = [0.0]
    limits = Limits(rpm=1200, tpm=None, clock=lambda: clock[0])
    times = [_send_paced(limits, clock, 10)]
    clock[0] += 0.1  # the reply's latency: the user's limit had room again by then
    limits.on_headers({"x-ratelimit-limit-requests": "300", "x-ratelimit-remaining-requests": "299"})
    times += [_send_paced(limits, clock, 10) for _ in range(20)]
    assert _most_in_a_second(times, [1] * len(times)) <= 5


def test_the_probe_goes_on_until_a_reply_says_something():
    """An error page, a reset or a 429 without limit headers says nothing about the limit: the
    next request goes alone too. Limit headers or a success (a server without headers) end it;
    a 429 without headers starts it again."""
    for end in ("headers", "success"):
        clock = [0.0]
        limits = Limits(rpm=None, tpm=None, clock=lambda: clock[0])
        for _ in range(3):
            assert limits.delay(1) == 0
            limits.take(1)
            assert limits.delay(1) is None  # one at a time
            limits.release()
            limits.on_headers({"content-type": "text/html"})
            limits.on_other() if _ % 2 else limits.on_trouble(clock[0])
            assert limits.concurrency == 1
        if end == "headers":
            limits.on_headers({"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "5000"})
        else:
            limits.on_success(clock[0])
        assert limits.concurrency > 1, end
        limits.on_429({}, clock[0])
        assert limits.concurrency == (1 if end == "success" else limits.max_in_flight // 2), end


def test_a_429_with_retry_after_zero_still_backs_off():
    """The backoff doubles per round trip refused, not per refusal: the 429s of one burst (requests
    sent before the previous 429 came back) are one."""
    clock = [0.0]
    limits = Limits(rpm=None, tpm=None, backoff_base_s=0.5, clock=lambda: clock[0])
    waits = []
    for _ in range(3):
        clock[0] += 10.0
        waits.append(limits.on_429({"Retry-After": "0"}, clock[0] - 0.1))  # sent after the previous 429
    assert waits == [0.5, 1.0, 2.0] and limits.paused_for() == 2.0
    burst = [limits.on_429({"retry-after-ms": "0"}, clock[0] - 0.2) for _ in range(5)]  # the same burst
    assert burst == [2.0] * 5
    clock[0] += 10.0
    assert limits.on_429({"retry-after-ms": "0"}, clock[0] - 0.1) == 4.0
    # A success of a request sent before the latest 429 neither ends the backoff nor a probe.
    limits.on_success(clock[0] - 0.5)
    assert limits.probing and limits.consecutive_429 == 4
    limits.on_success(clock[0] + 1.0)
    assert not limits.probing and limits.consecutive_429 == 0


def test_large_requests_stay_within_a_token_window():
    """At 60,000 TPM (1,000 tokens a second) requests of 312 tokens cannot go every 0.315 s:
    four of them would land in one second. At most three do, and no fewer go than fit; sent a
    window apart, they stay so when the network delays one of them by up to 20 ms."""
    clock = [0.0]
    limits = Limits(rpm=None, tpm=60_000, learn_from_headers=False, clock=lambda: clock[0])
    times = [_send_paced(limits, clock, 312) for _ in range(30)]
    assert _most_in_a_second(times, [312] * len(times), window=1.019) <= 1000
    assert times[-1] < 10.5  # three a second: 30 requests in a little under 10 s
    # One request larger than a whole second's budget still goes, alone in its window.
    big = Limits(rpm=None, tpm=6_000, learn_from_headers=False, clock=lambda: clock[0])
    sent = [_send_paced(big, clock, 500) for _ in range(3)]
    assert all(b - a >= 1.02 - 1e-9 for a, b in zip(sent, sent[1:]))


def test_a_pause_resumes_from_an_empty_bucket():
    clock = [0.0]
    limits = Limits(rpm=6000, tpm=None, learn_from_headers=False, clock=lambda: clock[0])
    limits.pause(5.0, "test")
    clock[0] = 5.0  # the pause is over: nothing accrued during it, so the next request waits its turn
    assert limits.delay(1) == pytest.approx(60 / (6000 * 0.99))


def test_non_finite_header_values_are_ignored():
    assert parse_retry_after({"retry-after": "inf"}) is None
    assert parse_retry_after({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0
    assert parse_duration("inf") is None and parse_duration("1e400") is None
    assert _int_header({"x": "1e400"}, "x") is None and _int_header({"x": "-inf"}, "x") is None
    limits = Limits(rpm=None, tpm=None)
    limits.on_headers({"x-ratelimit-limit-requests": "inf", "x-ratelimit-remaining-requests": "nan",
                       "x-ratelimit-reset-requests": "inf"})
    assert limits.rpm is None and limits.paused_for() == 0


def test_usage_that_is_not_a_count_reads_as_zero():
    odd = {"usage": {"prompt_tokens": "n/a", "completion_tokens": {"x": 1},
                     "prompt_tokens_details": {"cached_tokens": "7"}}}
    assert Usage.from_reply(odd) == Usage(0, 0, 7)
    assert Usage.from_reply({"usage": {"prompt_tokens": 12.0, "completion_tokens": True}}) == Usage(12, 0, 0)
    assert Usage.from_reply({"usage": {"prompt_tokens": float("inf"), "completion_tokens": -3}}) == Usage(0, 0, 0)


def test_limits_learn_from_headers_lower_only_and_cap_by_remaining():
    limits = Limits(rpm=100_000, tpm=None, headroom=1.0, burst_s=0.05)
    assert limits.probing  # tpm unknown: one request first
    limits.on_headers({"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "2",
                       "x-ratelimit-limit-tokens": "60000"})
    assert not limits.probing
    assert limits.rpm == pytest.approx(6000) and limits.tpm == pytest.approx(60000)
    assert limits.requests.level <= 2
    limits.on_headers({"x-ratelimit-limit-requests": "90000"})     # the server's limit may grow again,
    assert limits.rpm == pytest.approx(90000)                       # up to the user's ceiling
    limits.on_headers({"x-ratelimit-limit-requests": "200000"})
    assert limits.rpm == pytest.approx(90000)
    user = Limits(rpm=1000, tpm=1000, headroom=1.0)
    user.on_headers({"x-ratelimit-limit-requests": "6000"})
    assert user.rpm == pytest.approx(1000)                          # a lower user limit is kept
    blind = Limits(rpm=None, tpm=None, learn_from_headers=False)
    blind.on_headers({"x-ratelimit-limit-requests": "6000"})
    assert blind.rpm is None and not blind.probing


def test_429_pauses_everyone_and_halves_the_cap_once_per_round_trip():
    clock = [100.0]
    limits = Limits(rpm=None, tpm=None, max_in_flight=64, learn_from_headers=False, clock=lambda: clock[0])
    assert limits.delay(1) == 0
    wait = limits.on_429({"retry-after-ms": "750"}, sent_at=99.0)
    assert wait == pytest.approx(0.75)
    assert limits.delay(1) == pytest.approx(0.75)
    assert limits.concurrency == 32
    limits.on_429({"retry-after-ms": "100"}, sent_at=99.5)    # sent before the decrease: no second halving,
    assert limits.concurrency == 32 and limits.paused_for() == pytest.approx(0.75)  # nor a shorter pause
    clock[0] += 1.0
    limits.on_429({}, sent_at=100.5)                           # no header: a backoff pause
    assert limits.concurrency == 16 and 0 < limits.paused_for() <= limits.backoff_cap_s
    clock[0] += 60.0
    limits.on_429({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2.5s",
                   "x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "9s"}, sent_at=160.5)
    assert limits.paused_for() == pytest.approx(2.5)           # the exhausted limit's reset
    clock[0] += 60.0
    limits.on_429({"x-ratelimit-reset-requests": "3s", "x-ratelimit-remaining-tokens": "500",
                   "x-ratelimit-reset-tokens": "7s"}, sent_at=220.5)
    assert limits.paused_for() == pytest.approx(3.0)           # a reset whose remaining count is not given


def test_random_faults_do_not_shrink_the_cap_but_an_overload_does():
    clock = [0.0]
    limits = Limits(rpm=None, tpm=None, max_in_flight=512, learn_from_headers=False, clock=lambda: clock[0])
    limits.in_flight = 120
    for i in range(2000):          # 10% trouble, evenly spread
        clock[0] = i / 100
        (limits.on_trouble if i % 10 == 0 else limits.on_success)(sent_at=clock[0] - 0.2)
    assert limits.decreases == 0 and limits.concurrency == 512
    clock[0] = 100.0
    for i in range(100):           # then half of the replies to what was sent at t=99.5 fail
        (limits.on_trouble if i % 2 == 0 else limits.on_success)(sent_at=99.5)
    assert limits.decreases == 1 and 60 <= limits.concurrency <= 61   # half of what was in flight, once
    clock[0] = 101.0
    for i in range(20):            # and again for what was sent after that decrease
        limits.on_trouble(sent_at=100.5)
    assert limits.decreases == 2 and limits.concurrency == 30


# -- prices ---------------------------------------------------------------------------------------

def test_prices_match_snapshots_and_extend_from_a_file(tmp_path):
    table = PriceTable()
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert table.cost("gpt-4o-mini", usage) == pytest.approx(0.15 + 0.60)
    assert table.cost("gpt-4o-mini-2024-07-18", usage) == pytest.approx(0.75)   # a dated snapshot
    assert table.cost("gpt-4o-2024-08-06", usage) == pytest.approx(12.5)         # not gpt-4o-mini, not gpt-4
    assert table.cost("my-local-model", usage) is None
    cached = Usage(prompt_tokens=1_000_000, completion_tokens=0, cached_tokens=500_000)
    assert table.cost("gpt-4o-mini", cached) == pytest.approx(0.5 * 0.15 + 0.5 * 0.075)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-local-model": {"input": 1, "output": 2}}))
    table.update_from_file(str(path))
    assert table.cost("my-local-model", usage) == pytest.approx(3.0)
    path.write_text(json.dumps({"x": {"input": 1}}))
    with pytest.raises(ValueError, match='"output"'):
        table.update_from_file(str(path))
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        table.update_from_file(str(path))
    # NaN, infinite or negative prices would make every cost and the --max-cost check meaningless
    # (a NaN estimate passed `cost > limit`); a boolean is not a price.
    for bad in ('{"m": {"input": NaN, "output": 1}}', '{"m": {"input": 1, "output": -100}}',
                '{"m": {"input": 1, "output": 2, "cached_input": Infinity}}', '{"m": {"input": 1e400, "output": 1}}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="finite and not negative"):
            table.update_from_file(str(path))
    path.write_text('{"m": {"input": true, "output": 1}}')
    with pytest.raises(ValueError, match="must be numbers"):
        table.update_from_file(str(path))
    assert table.find("m") is None
    assert Price(1, 2).cost(Usage(10, 20)) == pytest.approx(50 / 1e6)


# -- classification -------------------------------------------------------------------------------

def reply(status=200, body=b"", headers=None):
    return HttpReply(status, headers or {}, body if isinstance(body, bytes) else json.dumps(body).encode())


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}


@pytest.mark.parametrize("status,retryable,type_", [
    (408, True, "http"), (409, True, "http"), (429, True, "http"), (500, True, "http"), (502, True, "http"),
    (503, True, "http"), (504, True, "http"), (400, False, "http"), (401, False, "auth"), (402, False, "http"),
    (403, False, "http"), (404, False, "http"), (422, False, "http"),
])
def test_statuses(status, retryable, type_):
    verdict = classify("chat", CHAT, reply(status, {"error": {"message": f"the server says {status}"}}))
    assert verdict.response is None
    assert verdict.error.retryable is retryable and verdict.error.type == type_
    assert verdict.error.message == f"the server says {status}" and verdict.error.status == status


def test_context_length_is_named():
    body = {"error": {"message": "This model's maximum context length is 8192 tokens. However, you requested 9000",
                      "code": "context_length_exceeded"}}
    verdict = classify("chat", CHAT, reply(400, body))
    assert verdict.error.type == "context_length" and not verdict.error.retryable
    assert "maximum context length" in verdict.error.message


def test_bodies_that_are_not_replies():
    good = json.dumps(default_responder("chat", CHAT)).encode()
    assert classify("chat", CHAT, reply(200, good)).response["choices"]
    cut = classify("chat", CHAT, reply(200, good[: len(good) // 2]))
    assert cut.error.type == "bad_body" and cut.error.retryable and "cut short" in cut.error.message
    html = classify("chat", CHAT, reply(200, b"<html>502 Bad Gateway</html>"))
    assert html.error.type == "bad_body" and html.error.retryable and "not JSON" in html.error.message
    other = classify("chat", CHAT, reply(200, {"result": "ok", "status": 1}))
    assert other.error.type == "not_openai" and not other.error.retryable and "result" in other.error.message
    wrapped = classify("chat", CHAT, reply(200, {"error": {"message": "upstream timed out"}}))
    assert wrapped.error.retryable and wrapped.error.message == "upstream timed out"
    latin = classify("chat", CHAT, reply(200, good.replace(b'"chat.completion"', b'"chat.completi\xf3n"')))
    assert latin.error.type == "bad_body" and "not UTF-8 (byte b'\\xf3'" in latin.error.message
    null = classify("chat", CHAT, reply(200, {"id": "x", "choices": None}))
    assert null.error.type == "not_openai" and "'choices' that is null, not a list" in null.error.message


def test_missing_logprobs_fail_at_once():
    plain = chat_reply({**CHAT, "logprobs": False}, [" a", " b"])
    verdict = classify("chat", CHAT, reply(200, plain))
    assert verdict.error.type == "missing_logprobs" and not verdict.error.retryable
    assert "logprobs" in verdict.error.message
    no_top = chat_reply({**CHAT, "top_logprobs": 0}, [" a"])
    assert "top_logprobs" in classify("chat", CHAT, reply(200, no_top)).error.message
    comp = {"model": "m", "prompt": "x y", "logprobs": 0, "echo": True, "max_tokens": 2}
    assert classify("completion", comp, reply(200, completion_reply(comp, [" z", " w"]))).response
    stripped = completion_reply({**comp, "logprobs": None}, [" z"])
    assert classify("completion", comp, reply(200, stripped)).error.type == "missing_logprobs"
    vllm = {"model": "m", "prompt": "x", "prompt_logprobs": 1, "max_tokens": 1}
    assert classify("completion", vllm, reply(200, completion_reply(vllm, [" z"]))).error.type == "missing_logprobs"


def test_test_server_replies_follow_the_openai_shapes():
    comp = {"model": "m", "prompt": "one two", "logprobs": 3, "echo": True, "max_tokens": 2}
    out = completion_reply(comp, [" three", " four"])
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == "one two three four"
    assert lp["tokens"] == ["one", " two", " three", " four"] and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == [0, 3, 7, 13]
    assert all(len(t) == 3 and max(t.values()) <= 0 for t in lp["top_logprobs"][1:])
    chat = default_responder("chat", CHAT)
    entry = chat["choices"][0]["logprobs"]["content"][0]
    assert entry["top_logprobs"][0]["token"] == entry["token"] and len(entry["top_logprobs"]) == 2
    assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"])
    assert chat == default_responder("chat", CHAT)  # deterministic
    assert chat["usage"]["completion_tokens"] == 16
