"""The Client against the test server: limits, faults, retries, dedupe, the store, errors, accounting."""

from __future__ import annotations

import asyncio
import socket

import pytest

from client.prices import Price, PriceTable
from client.request import Request
from client.runner import Client, RunAborted
from client.store import RequestStore
from client.config import ClientConfig
from client.testserver import (FAULT_KINDS, ServerConfig, ServerError, ServerFault, ServerThread, chat_reply,
                               default_responder)
from client.transport import SetupError
from client_testlib import chat_requests, fast_config, stored_keys


async def run(config, requests):
    async with Client(config) as client:
        results = await client.run_many(requests)
    return client, results


def served_once(server, requests):
    """Every request was delivered by the server exactly once."""
    served = server.snapshot()["served"]
    return all(served.get(r.key) == 1 for r in requests) and len(served) == len({r.key for r in requests})


# -- the basics -----------------------------------------------------------------------------------

async def test_chat_and_completion_replies_with_logprobs(make_server, store_path):
    server = make_server()
    chat = Request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "logprobs": True, "top_logprobs": 4})
    comp = Request({"model": "m", "prompt": "a b c", "max_tokens": 0, "echo": True, "logprobs": 2,
                    "prompt_logprobs": 1}, kind="completion")  # an extra vLLM field, passed through
    seen = []

    def responder(kind, body):
        seen.append(body)
        out = default_responder(kind, body)
        if "prompt_logprobs" in body:
            out["choices"][0]["prompt_logprobs"] = [None, {"b": -1.0}, {"c": -2.0}]
        return out

    server.server.responder = responder
    async with Client(fast_config(server, store_path)) as client:
        r1 = await client.submit(chat)
        r2 = await client.complete(comp.body, kind="completion")
    content = r1.unwrap()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 4 for e in content)
    lp = r2.unwrap()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", " b", " c"] and lp["token_logprobs"][0] is None
    assert seen[1] == comp.body                       # the body arrives exactly as given
    assert r1.usage.completion_tokens == 3 and r1.source == "sent" and r1.attempts == 1
    assert client.stats.prompt_tokens == r1.usage.prompt_tokens + r2.usage.prompt_tokens


async def test_results_come_back_in_input_order_from_any_iterable(make_server):
    server = make_server(latency_ms=5, latency_sigma=1.0, latency_max_ms=40)
    requests = chat_requests(40)
    requests.append(requests[3])                       # the same object twice
    client, results = await run(fast_config(server), requests)
    assert [r.request for r in results] == requests
    assert all(r.ok for r in results)
    streamed = []
    async with Client(fast_config(server)) as client:
        async for result in client.stream(r for r in chat_requests(20, "gen")):
            streamed.append(result.id)
    assert sorted(streamed) == sorted(f"gen{i}" for i in range(20))


# -- none lost, none paid twice ---------------------------------------------------------------------

async def test_identical_requests_in_flight_are_sent_once(make_server):
    server = make_server(latency_ms=50)
    unique = chat_requests(12)
    requests = [Request(u.body, id=f"{u.id}-{copy}") for copy in range(5) for u in unique]
    client, results = await run(fast_config(server), requests)
    assert all(r.ok for r in results)
    assert served_once(server, unique)
    assert server.snapshot()["received"] == 12
    assert client.stats.shared == 48 and client.stats.sent_ok == 12
    by_key = {}
    for r in results:
        by_key.setdefault(r.key, set()).add(r.raw)
    assert all(len(raws) == 1 for raws in by_key.values())   # copies get the very same reply


async def test_a_reply_is_stored_before_it_is_reported(make_server, store_path):
    server = make_server(latency_ms=5)
    seen = 0
    async with Client(fast_config(server, store_path, durable=True)) as client:
        async for result in client.stream(chat_requests(20)):
            assert result.ok and result.key in stored_keys(store_path)   # read by another connection
            seen += 1
    assert seen == 20


async def test_a_rerun_with_the_store_sends_nothing(make_server, store_path):
    server = make_server(latency_ms=5)
    requests = chat_requests(30)
    _, first = await run(fast_config(server, store_path), requests)
    received = server.snapshot()["received"]
    client, again = await run(fast_config(server, store_path), requests)
    assert server.snapshot()["received"] == received       # no HTTP at all
    assert all(r.source == "store" and r.ok for r in again)
    assert [r.response for r in again] == [r.response for r in first]
    assert client.stats.from_store == 30 and client.stats.cost == 0


@pytest.mark.parametrize("fault", FAULT_KINDS)
async def test_each_fault_kind_is_retried_until_served_exactly_once(make_server, store_path, fault):
    server = make_server(latency_ms=5, faults={fault: 0.3}, hang_s=30, seed=3)
    requests = chat_requests(40)
    # Only the hang test needs a short timeout; elsewhere a slow machine must not look like a fault.
    client, results = await run(fast_config(server, store_path, timeout_s=1.0 if fault == "hang" else 5.0), requests)
    snap = server.snapshot()
    assert all(r.ok for r in results)
    assert served_once(server, requests)
    injected = snap["faults"][fault]
    assert injected >= 5
    cause = {"hang": "timeout", "reset": "connection", "cutoff": "connection", "nonjson": "bad_body",
             "truncated": "bad_body"}.get(fault, fault)
    assert client.stats.retries == {cause: injected}          # every fault seen, and retried once
    assert client.stats.attempts == 40 + injected


async def test_requests_in_flight_are_finished_and_stored_when_stopping(make_server, store_path):
    server = make_server(latency_ms=100, rpm=6000)
    requests = chat_requests(200)
    async with Client(fast_config(server, store_path, rpm=6000)) as client:
        task = asyncio.ensure_future(client.run_many(requests))
        while client.stats.ok < 20:
            await asyncio.sleep(0.01)
        in_flight = client.in_flight
        client.stop()
        results = await task
    assert in_flight > 0
    ok = [r for r in results if r.ok]
    assert len(ok) >= 20 + in_flight and len(ok) < 200
    assert {r.error.type for r in results if not r.ok} == {"interrupted"}
    assert served_once(server, [r.request for r in ok])                 # nothing served that was not stored
    async with Client(fast_config(server, store_path)) as client:       # the rest, on resume
        again = await client.run_many(requests)
    assert all(r.ok for r in again) and served_once(server, requests)


# -- limits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("client_rpm", [None, 100_000])   # learn the limit, or correct a wrong one
async def test_requests_per_minute_are_learned_and_kept(make_server, client_rpm):
    server = make_server(rpm=6000, window_s=0.5, latency_ms=20)
    requests = chat_requests(200)
    client, results = await run(fast_config(server, rpm=client_rpm), requests)
    snap = server.snapshot()
    assert all(r.ok for r in results)
    assert snap["refused"] <= 3
    assert client.limits.rpm == pytest.approx(6000 * 0.99)


async def test_tokens_per_minute_are_learned_and_kept(make_server):
    server = make_server(tpm=300_000, window_s=0.5, latency_ms=20)
    # ~150 prompt tokens (at 5 characters each, not the 4 the client first assumes) + 50 budgeted.
    requests = [Request({"model": "m", "max_tokens": 50, "messages": [
        {"role": "user", "content": f"{i} " + "word " * 150}]}) for i in range(60)]
    client, results = await run(fast_config(server), requests)
    assert all(r.ok for r in results)
    assert server.snapshot()["refused"] <= 3
    assert client.limits.tpm == pytest.approx(300_000 * 0.99)
    assert 4.5 < client._chars_per_token < 5.5          # corrected from usage.prompt_tokens


async def test_a_client_that_ignores_the_limits_is_refused(make_server):
    """The control of the two tests above: the server does enforce, so their bound can fail."""
    server = make_server(rpm=6000, window_s=0.5, latency_ms=20)
    client, results = await run(fast_config(server, learn_from_headers=False, max_in_flight=200), chat_requests(120))
    assert all(r.ok for r in results)                    # the client survives the refusals...
    assert server.snapshot()["refused"] > 3              # ...but the server had to refuse
    assert client.stats.retries["429"] == server.snapshot()["refused"]


@pytest.mark.parametrize("style", ["ms", "seconds"])
async def test_a_429_pauses_every_request_for_its_retry_after(make_server, style):
    server = make_server(rpm=1200, window_s=0.5, retry_after=style, retry_after_floor_s=0.6)
    client, results = await run(fast_config(server, learn_from_headers=False, max_in_flight=40), chat_requests(40))
    snap = server.snapshot()
    assert all(r.ok for r in results) and snap["refused"] > 0
    pause = 0.6 if style == "ms" else 1.0
    arrivals = sorted(snap["arrivals"])
    for t, _ in snap["refusals"]:
        # Requests already on their way may still land just after the 429; nothing new until the
        # pause is over.
        inside = [a for a in arrivals if t + 0.25 < a < t + pause - 0.05]
        assert inside == [], f"{len(inside)} requests arrived during a {pause} s pause"


async def test_the_in_flight_cap_backs_off_from_an_overloaded_server(make_server):
    server = make_server(max_concurrency=4, latency_ms=30)
    requests = chat_requests(250)
    config = fast_config(server, max_in_flight=64, backoff_base_s=0.05, backoff_cap_s=0.5, max_attempts=30)
    client, results = await run(config, requests)
    assert all(r.ok for r in results) and served_once(server, requests)
    assert client.limits.decreases >= 2
    assert client.limits.concurrency < 64
    # With a fixed cap of 64 the server refuses about 1,500 attempts here (6 per request); AIMD
    # brings that to about 300.
    assert server.snapshot()["overloaded"] < 600


# -- failures that are final ----------------------------------------------------------------------

async def test_client_errors_fail_at_once_with_the_servers_message(make_server, store_path):
    def responder(kind, body):
        text = body["messages"][0]["content"]
        for status in (400, 402, 403, 404, 422):
            if text == f"fail {status}":
                raise ServerError(status, f"server refuses with {status}")
        return default_responder(kind, body)

    server = make_server(responder=responder, context_window=100)
    requests = [Request({"model": "m", "messages": [{"role": "user", "content": f"fail {s}"}]}, id=s)
                for s in (400, 402, 403, 404, 422)]
    requests.append(Request({"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": "long"}]},
                            id="long"))
    requests.append(Request({"model": "m", "messages": [{"role": "user", "content": "fine"}]}, id="fine"))
    client, results = await run(fast_config(server, store_path), requests)
    by_id = {r.id: r for r in results}
    assert by_id["fine"].ok
    for s in (400, 402, 403, 404, 422):
        err = by_id[s].error
        assert (err.status, err.message, by_id[s].attempts) == (s, f"server refuses with {s}", 1)
    assert by_id["long"].error.type == "context_length" and "maximum context length" in by_id["long"].error.message
    assert server.snapshot()["received"] == 7                  # no retries
    assert client.stats.dead_lettered == 6
    store = RequestStore(store_path)
    assert {d.key for d in store.dead_letters()} == {r.key for r in requests[:6]}
    store.close()
    async with Client(fast_config(server, store_path)) as again:   # a rerun reports, does not resend
        rerun = await again.run_many(requests)
    assert server.snapshot()["received"] == 7
    assert [r.error.status if r.error else None for r in rerun] == [400, 402, 403, 404, 422, 400, None]


async def test_replies_without_the_requested_logprobs_are_refused(make_server):
    def responder(kind, body):  # a server that ignores logprobs
        return chat_reply({**body, "logprobs": False}, [" x"])

    server = make_server(responder=responder)
    asked = Request({"model": "m", "logprobs": True, "messages": [{"role": "user", "content": "a"}]})
    plain = Request({"model": "m", "messages": [{"role": "user", "content": "b"}]})
    _, (r1, r2) = await run(fast_config(server), [asked, plain])
    assert r1.error.type == "missing_logprobs" and "logprobs" in r1.error.message and r1.attempts == 1
    assert r2.ok


async def test_a_reply_that_is_not_openai_is_not_retried(make_server):
    server = make_server(responder=lambda kind, body: {"output": "hello", "status": "done"})
    _, (result,) = await run(fast_config(server), chat_requests(1))
    assert result.error.type == "not_openai" and "choices" in result.error.message and result.attempts == 1


async def test_a_request_that_keeps_failing_is_dead_lettered_at_its_deadline(make_server, store_path):
    server = make_server(faults={"503": 1.0})
    config = fast_config(server, store_path, deadline_s=0.3, max_attempts=100, backoff_base_s=0.02, backoff_cap_s=0.05)
    client, (result,) = await run(config, chat_requests(1))
    assert result.error.status == 503 and "gave up after" in result.error.message and "deadline" in result.error.message
    assert result.attempts >= 3
    async with Client(config) as c:
        (dead,) = list(c.store.dead_letters())
    assert dead.attempts == result.attempts and dead.body == chat_requests(1)[0].body
    config.retry_dead_letters = True
    server.call(lambda: server.server.config.faults.clear() or server.server._fault_table.clear())
    async with Client(config) as c:
        (again,) = await c.run_many(chat_requests(1))
        assert again.ok and list(c.store.dead_letters()) == []


async def test_a_refused_key_stops_the_run_without_dead_letters(make_server, store_path):
    server = make_server(api_key="right")
    with pytest.raises(RunAborted, match="401"):
        await run(fast_config(server, store_path, api_key="wrong"), chat_requests(20))
    async with Client(fast_config(server, store_path)) as client:
        assert list(client.store.dead_letters()) == []


async def test_the_refused_request_says_auth_and_the_unsent_say_so(make_server, store_path):
    # The request whose 401 stopped the run carries the server's refusal (typed, with its status), not
    # a generic interruption; the ones the stop kept from being sent say they were not sent.
    server = make_server(api_key="right")
    async with Client(fast_config(server, store_path, api_key="wrong", max_in_flight=1)) as client:
        results = [await client.complete(r.body) for r in chat_requests(3)]
    refused, *rest = results
    assert (refused.error.type, refused.error.status, refused.error.stopped) == ("auth", 401, True)
    assert refused.source == "sent" and refused.attempts == 1
    assert all(r.error.type == "interrupted" and r.error.stopped and r.source == "unsent" for r in rest)
    assert client.stats.interrupted == 3 and client.stats.failed == 3 and client.stats.dead_lettered == 0


async def test_leaving_a_stream_early_withdraws_what_was_not_sent(make_server, store_path):
    # 10 requests a second: after the caller breaks out, the ~300 fed but not yet sent must not be sent
    # (nor paid) in the background while the Client stays open; a rerun sends them, each once.
    server = make_server(latency_ms=5)
    requests = chat_requests(300)
    async with Client(fast_config(server, store_path, rpm=600)) as client:
        got = []
        async for result in client.stream(requests):
            got.append(result)
            if len(got) == 3:
                break
        await asyncio.sleep(0.2)       # the generator is closed by the loop once it is dropped
        attempts = client.stats.attempts
        await asyncio.sleep(1.5)       # ~15 more would have been sent by now
        assert client.stats.attempts == attempts < 20
        assert client.stats.interrupted >= 250 and client.stats.ok == client.stats.sent_ok
        # The Client is still usable, and what was withdrawn is not stored as failed.
        assert (await client.complete(requests[-1].body)).ok
    assert list(RequestStore(store_path).dead_letters()) == []
    async with Client(fast_config(server, store_path)) as client:
        again = await client.run_many(requests)
    assert all(r.ok for r in again) and served_once(server, requests)


async def test_a_caller_leaving_while_its_request_is_out_stops_the_retry(make_server, store_path):
    # Cancelled while its first attempt is in flight, a request whose attempt then fails must not be
    # sent again for nobody (it was: the withdrawal only looked at queued requests).
    calls = []

    def responder(kind, body):
        calls.append(1)
        raise ServerError(500, "boom")

    server = make_server(responder=responder, latency_ms=300)
    async with Client(fast_config(server, store_path)) as client:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.complete(chat_requests(1)[0].body), 0.1)
        await asyncio.sleep(1.5)   # the 500 came back at 0.3 s; retries back off 0.01-0.2 s
        assert len(calls) == 1 and client.stats.attempts == 1
        assert client.stats.interrupted == 1 and client.stats.failed == 1 and client.stats.dead_lettered == 0


async def test_an_input_that_fails_is_raised_at_once_and_the_rest_withdrawn(make_server, store_path):
    server = make_server(latency_ms=5)

    def requests():
        yield from chat_requests(100)
        raise ValueError("line 101 of the input is broken")

    async with Client(fast_config(server, store_path, rpm=600)) as client:   # 10 a second
        got = []
        with pytest.raises(ValueError, match="line 101"):
            async for result in client.stream(requests()):
                got.append(result)
        await asyncio.sleep(1.0)
        assert client.stats.attempts < 20 and len(got) < 20     # not the 100 fed before the error
        assert client.stats.ok == client.stats.sent_ok and client.stats.interrupted == 100 - client.stats.ok


async def test_best_of_and_integral_float_max_tokens_count_in_the_cost_ceiling(make_server):
    from client.runner import _Job

    server = make_server()
    prices = PriceTable({"m": Price(input=0.0, output=1e6)})   # 1 USD per completion token
    async with Client(fast_config(server, prices=prices, max_cost=1e9)) as client:
        def est(kind, **body):
            job = _Job(Request({"model": "m", "prompt": "x", **body} if kind == "completion" else
                               {"model": "m", "messages": [], **body}, kind), asyncio.get_running_loop())
            client._estimate(job)
            return job.completion_est

        assert est("completion", max_tokens=100) == 100
        assert est("completion", max_tokens=100, best_of=5) == 500 and est("completion", max_tokens=100, n=5) == 500
        assert est("chat", max_tokens=1000.0) == 1000 and est("chat", max_completion_tokens=7) == 7


async def test_a_request_shared_with_a_stream_is_not_withdrawn_when_the_stream_is_left(make_server, store_path):
    server = make_server(latency_ms=5)
    requests = chat_requests(100)
    async with Client(fast_config(server, store_path, rpm=600)) as client:
        stream = client.stream(requests)
        first = await anext(stream)
        waiter = asyncio.ensure_future(client.submit(requests[-1]))   # the last request, also in the stream
        await asyncio.sleep(0)
        await stream.aclose()
        result = await asyncio.wait_for(waiter, 30)
    # The stream it was started for left before it was sent: it was sent for this caller alone,
    # whose result says so (it said 'shared', 0 attempts, no cost, while stats counted the cost).
    assert first.ok and result.ok and result.source == "sent" and result.attempts == 1


async def test_a_cancelled_complete_withdraws_its_request_if_unsent(make_server, store_path):
    server = make_server(latency_ms=5)
    async with Client(fast_config(server, store_path, rpm=60)) as client:   # one a second
        assert (await client.complete(chat_requests(1, "a")[0].body)).ok
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.complete(chat_requests(1, "b")[0].body), 0.05)
        await asyncio.sleep(1.5)
        assert client.stats.attempts == 1 and client.stats.interrupted == 1
    assert server.snapshot()["received"] == 1


async def test_a_spent_quota_stops_the_run_at_once(make_server, store_path):
    # OpenAI answers 429 insufficient_quota when the account has no credit: no wait makes it pass.
    def responder(kind, body):
        raise ServerError(429, "You exceeded your current quota, please check your plan and billing details.",
                          type="insufficient_quota", code="insufficient_quota")

    server = make_server(responder=responder)
    with pytest.raises(RunAborted, match="quota is spent"):
        await run(fast_config(server, store_path), chat_requests(20))
    assert server.snapshot()["received"] == 1  # the probe; nothing after it
    async with Client(fast_config(server, store_path)) as client:
        assert list(client.store.dead_letters()) == []  # a rerun sends them all


async def test_a_pause_beyond_the_deadline_stops_the_run(make_server, store_path):
    def responder(kind, body):
        raise ServerError(429, "slow down", type="rate_limit_error", headers={"Retry-After": "3600"})

    server = make_server(responder=responder)
    with pytest.raises(RunAborted, match="pause of 3600 s .*--deadline"):
        await asyncio.wait_for(run(fast_config(server, store_path, deadline_s=30), chat_requests(5)), 20)
    async with Client(fast_config(server, store_path)) as client:
        assert list(client.store.dead_letters()) == []


async def test_odd_usage_and_infinite_headers_never_cost_a_reply(make_server, store_path):
    tries: dict = {}

    def responder(kind, body):
        key = body["messages"][0]["content"]
        tries[key] = tries.get(key, 0) + 1
        if tries[key] == 1:  # first a 429 whose Retry-After is no time at all
            raise ServerError(429, "slow down", type="rate_limit_error", headers={"Retry-After": "inf"})
        reply = default_responder(kind, body)
        reply["usage"] = {"prompt_tokens": "n/a", "completion_tokens": {"x": 1}}
        return reply

    server = make_server(responder=responder)
    requests = chat_requests(6)
    client, results = await run(fast_config(server, store_path), requests)
    assert all(r.ok for r in results) and served_once(server, requests)
    assert stored_keys(store_path) == {r.key for r in requests}
    _, again = await run(fast_config(server, store_path), requests)
    assert all(r.source == "store" for r in again) and served_once(server, requests)


async def test_a_server_that_goes_away_stops_the_run(make_server):
    server = make_server()
    config = fast_config(server, unreachable_s=0.3, backoff_base_s=0.05, max_attempts=1000)
    server.stop()
    with pytest.raises(RunAborted, match="no reply from"):
        await run(config, chat_requests(5))


async def test_an_outage_dead_letters_nothing(make_server, store_path):
    """While nothing answers, failed connections say nothing about the requests: they do not use up
    --max-attempts (here 2, reached within milliseconds), the silence stops the run, and a rerun
    sends them all."""
    server = make_server()
    config = fast_config(server, store_path, unreachable_s=0.5, max_attempts=2, backoff_base_s=0.01,
                         backoff_cap_s=0.02)
    server.stop()
    with pytest.raises(RunAborted, match="no reply from .* for [01] s"):
        await run(config, chat_requests(5))
    async with Client(config) as client:
        assert list(client.store.dead_letters()) == []


async def test_a_server_that_never_answers_stops_the_run_at_the_first_timeout(make_server, store_path):
    """A server that accepts requests and never answers: the first timed-out attempt, past the
    silence limit, ends the run; the other requests are not each made to wait their own timeout."""
    server = make_server(faults={"hang": 1.0}, hang_s=30.0)
    config = fast_config(server, store_path, unreachable_s=0.5, timeout_s=1.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(RunAborted, match="no reply from"):
        await run(config, chat_requests(8))
    assert loop.time() - start < 2.5
    async with Client(config) as client:
        assert list(client.store.dead_letters()) == []


async def test_a_request_the_server_always_drops_is_dead_lettered(make_server, store_path):
    """A server that answers everyone else but resets one request: that request's failures count,
    and it is dead-lettered at --max-attempts while the others complete."""
    async def responder(kind, body):
        if body["messages"][0]["content"] == "q number 0":
            await asyncio.sleep(0.05)  # the others' replies arrive first
            raise ServerFault("reset")
        return default_responder(kind, body)

    server = make_server(responder=responder, latency_ms=5)
    config = fast_config(server, store_path, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.02, max_in_flight=4)
    requests = chat_requests(1) + [r for r in chat_requests(200) if r.id != "q0"]
    client, results = await run(config, requests)
    # The probe (alone, nobody else answered meanwhile) does not count; three attempts after it do.
    assert results[0].error.type == "connection" and "(max attempts)" in results[0].error.message
    assert 3 <= results[0].attempts <= 4
    assert all(r.ok for r in results[1:])
    async with Client(config) as c:
        assert [d.key for d in c.store.dead_letters()] == [requests[0].key]


async def test_a_request_reset_on_arrival_is_dead_lettered_even_when_alone(make_server, store_path):
    """Reset as it arrives, with no other reply in between to show that the server is up: GET /models
    shows it, so the resets count and the request is dead-lettered; the run ends instead of stopping
    on silence in every rerun. A rerun does not send it again."""
    def responder(kind, body):
        if body["messages"][0]["content"] == "q number 0":
            raise ServerFault("reset")
        return default_responder(kind, body)

    server = make_server(responder=responder)
    config = fast_config(server, store_path, max_attempts=3, unreachable_s=0.5)
    requests = chat_requests(3)
    client, results = await run(config, requests)
    assert client.abort_reason is None
    assert results[0].error.type == "connection" and "(max attempts)" in results[0].error.message
    assert results[0].attempts == 3
    assert all(r.ok for r in results[1:])
    received = server.snapshot()["received"]
    _, again = await run(config, requests)
    assert again[0].source == "store" and not again[0].ok and server.snapshot()["received"] == received


async def test_a_request_slower_than_the_timeout_is_dead_lettered_even_when_alone(make_server, store_path):
    """The server answers everyone else, and GET /models, but this request never within --timeout:
    its timeouts count, it is dead-lettered at --max-attempts and the run ends (as does the rerun,
    which does not send it again). Several requests timing out with nothing answered between
    still stop the run (test_a_server_that_never_answers_stops_the_run_at_the_first_timeout)."""
    async def responder(kind, body):
        if body["messages"][0]["content"] == "q number 0":
            await asyncio.sleep(3.0)
        return default_responder(kind, body)

    server = make_server(responder=responder)
    config = fast_config(server, store_path, max_attempts=2, timeout_s=0.4, unreachable_s=0.3)
    requests = chat_requests(3)
    for _ in range(2):
        client, results = await run(config, requests)
        assert client.abort_reason is None
        assert results[0].error.type == "timeout" and not results[0].ok
        assert all(r.ok for r in results[1:])
    assert results[0].source == "store" and server.snapshot()["received"] == 4  # 2 attempts, 2 others


async def test_after_an_outage_the_requests_go_again_at_once(make_server, store_path):
    """Backoffs double while nothing answers; the first reply after the outage sends the waiting
    requests again at once instead of after their (up to --backoff-cap) waits."""
    port = free_port()
    config = ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", timeout_s=2.0, backoff_base_s=0.2,
                          backoff_cap_s=4.0, unreachable_s=30, store_path=store_path, seed=0, durable=False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(run(config, chat_requests(20)))
    await asyncio.sleep(2.5)  # each request has failed several times: backoffs of up to 4 s
    assert not task.done()
    server = ServerThread(ServerConfig(), port=port).start()
    try:
        back = loop.time()
        client, results = await asyncio.wait_for(task, 10)
        assert all(r.ok for r in results) and loop.time() - back < 1.5
        assert client.stats.attempts > 40  # the outage was seen: not a run that never failed
    finally:
        server.stop()


# -- the pre-flight check -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def check(config):
    async with Client(config) as client:
        return await client.check()


async def test_check_names_the_problem(make_server):
    server = make_server(models=["a", "b"], api_key="k")
    assert await check(fast_config(server, api_key="k")) == ["a", "b"]
    with pytest.raises(SetupError, match="no API key was sent.*OPENAI_API_KEY"):
        await check(fast_config(server, api_key=None))
    with pytest.raises(SetupError, match="nothing answers at"):
        await check(fast_config(server, base_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(SetupError, match="404.*/v1"):
        await check(fast_config(server, api_key="k", base_url=server.base_url.removesuffix("/v1")))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(SetupError, match="no answer from"):
            await check(fast_config(server, base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout_s=0.3))


async def test_check_spots_a_server_that_is_not_openai():
    from aiohttp import web

    app = web.Application()
    async def html(request):
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app.router.add_route("*", "/{tail:.*}", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        from client.config import ClientConfig
        with pytest.raises(SetupError, match="does not speak the OpenAI API.*text/html"):
            await check(ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key="k"))
    finally:
        await runner.cleanup()


# -- accounting -----------------------------------------------------------------------------------

async def test_tokens_and_cost_are_counted_once_per_paid_reply(make_server, store_path):
    server = make_server()
    prices = PriceTable({"priced": Price(input=2.0, output=10.0)})
    requests = [Request({"model": "priced", "max_tokens": 5, "messages": [{"role": "user", "content": f"x {i}"}]})
                for i in range(10)]
    requests += requests[:4]                                     # duplicates: paid once
    requests.append(Request({"model": "free-model", "max_tokens": 5, "messages": [{"role": "user", "content": "y"}]}))
    client, results = await run(fast_config(server, store_path, prices=prices), requests)
    paid = [r for r in results if r.source == "sent" and r.request.body["model"] == "priced"]
    assert len(paid) == 10
    expected = sum(r.usage.prompt_tokens * 2.0 + r.usage.completion_tokens * 10.0 for r in paid) / 1e6
    assert client.stats.cost == pytest.approx(expected) and expected > 0
    assert sum(r.cost for r in paid) == pytest.approx(expected)
    assert all(r.cost == 0 for r in results if r.source == "shared")
    assert client.stats.unpriced == {"free-model": 1}
    assert client.stats.completion_tokens == 11 * 5
    again, _ = await run(fast_config(server, store_path, prices=prices), requests)
    assert again.stats.cost == 0 and again.stats.prompt_tokens == 0 and again.stats.from_store == 15


async def test_max_cost_stops_sending_before_the_spending_could_pass_it(make_server, store_path):
    # 1,000 USD per million tokens: each request ~10 prompt tokens and 5 of completion at most. With
    # 512 allowed in flight, all 40 would leave at once; the ceiling must hold them back before.
    server = make_server(latency_ms=20)
    prices = PriceTable({"priced": Price(input=1000.0, output=1000.0)})
    requests = [Request({"model": "priced", "max_tokens": 5, "messages": [{"role": "user", "content": f"x {i}"}]})
                for i in range(40)]
    with pytest.raises(RunAborted, match=r"--max-cost \$0.1 reached: .*raise --max-cost and run the same command"):
        await run(fast_config(server, store_path, prices=prices, max_cost=0.1), requests)
    import sqlite3

    assert 2 <= len(stored_keys(store_path)) == server.snapshot()["received"] < 40   # nothing sent unstored
    conn = sqlite3.connect(store_path)
    spent = conn.execute("SELECT SUM(cost) FROM results").fetchone()[0]          # the first run's spending
    conn.close()
    assert 0 < spent <= 0.1
    client, results = await run(fast_config(server, store_path, prices=prices, max_cost=10.0), requests)
    assert all(r.ok for r in results) and served_once(server, requests)
    assert ClientConfig(base_url="http://x", max_cost=float("nan")).problems() == [
        "--max-cost must be a finite number of USD, 0 or more, not nan"]


# -- the Client's life: open once, closed for good, released however it ends ---------------------

async def test_a_closed_or_unopened_client_says_so(make_server, store_path):
    """After the `async with`, calls said the store was 'damaged' (advising a move that would pay
    for everything again); before open() they hung or raised AttributeError."""
    server = make_server()
    client = Client(fast_config(server, store_path))
    with pytest.raises(SetupError, match="not open"):
        await client.complete({"model": "test-model", "messages": [{"role": "user", "content": "x"}]})
    async with client:
        assert (await client.complete({"model": "test-model", "max_tokens": 2,
                                       "messages": [{"role": "user", "content": "x"}]})).ok
        with pytest.raises(SetupError, match="open already"):
            await client.open()
    for call in (client.complete({"model": "test-model", "messages": []}), client.run_many(chat_requests(2)),
                 client.check()):
        with pytest.raises(SetupError, match="this Client is closed"):
            await call
    with pytest.raises(SetupError, match="closed"):
        await client.open()
    await client.aclose()  # twice: nothing more to do


async def test_a_second_cancel_while_closing_still_releases_the_store(make_server, store_path):
    """Cancelled again while it waits for requests in flight (a second Ctrl-C, a task group's
    teardown), the Client still commits and releases its store and closes its pool: the store
    stayed held (a new Client in this process was refused), with the session left open."""
    server = make_server(latency_ms=800)

    async def run():
        async with Client(fast_config(server, store_path, timeout_s=10.0)) as client:
            await client.run_many(chat_requests(20))

    task = asyncio.create_task(run())
    while server.snapshot()["received"] < 5:
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.1)  # now in aclose, waiting for the requests in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the release runs on, shielded
        await asyncio.sleep(0.05)
        try:
            RequestStore(store_path, exclusive=True).close()
            break
        except Exception:  # noqa: BLE001 - still held
            continue
    else:
        pytest.fail("the store is still held after the Client was cancelled twice")
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "client-dispatcher"]


async def test_a_store_reached_by_a_link_is_the_same_store(make_server, tmp_path):
    """The lock follows the file, not the name: a symlink to a store in use is refused (it was
    taken, and both Clients paid for the same request)."""
    import os

    from client.store import StoreError

    server = make_server()
    real = tmp_path / "s.sqlite"
    async with Client(fast_config(server, str(real))):
        os.symlink(real, tmp_path / "link.sqlite")
        with pytest.raises(StoreError, match="in use by another run"):
            async with Client(fast_config(server, str(tmp_path / "link.sqlite"))):
                pass


@pytest.mark.parametrize("url", ["http://", "http://[::1/v1", "http://127.0.0.1:99999/v1"])
def test_a_base_url_no_request_could_reach_is_a_setup_error(url):
    """It passed, and every request then waited out the outage timeout before the run stopped."""
    assert any("is not a valid URL" in p for p in ClientConfig(base_url=url, api_key="k").problems())


def test_limits_of_the_wrong_type_are_setup_errors():
    problems = ClientConfig(base_url="http://127.0.0.1:1/v1", api_key="k", rpm="100", max_in_flight=2.5).problems()
    assert any("--rpm must be a positive number, not '100'" in p for p in problems)
    assert any("--max-in-flight must be at least 1, not 2.5" in p for p in problems)
