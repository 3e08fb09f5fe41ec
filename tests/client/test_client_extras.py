"""The request-file parser on junk, the progress display, and the test server as a process."""

from __future__ import annotations

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.batch import read_requests
from client.progress import Progress, summary
from client.runner import Client
from client.testserver import ServerError, default_responder, spawn
from client_testlib import chat_requests, fast_config

lines = st.one_of(
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["id", "model", "messages", "prompt", "custom_id", "url",
                                                           "body", "stream", "n"]),
                                          st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                                    st.lists(st.integers(), max_size=2),
                                                    st.just([{"role": "user", "content": "x"}]),
                                                    st.just({"prompt": "p"})), max_size=5)),
)


@given(st.lists(lines, max_size=20))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_file_parses_to_one_entry_per_line_without_raising(tmp_path, content):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(content) + "\n", encoding="utf-8")
    parsed = read_requests(str(path), default_model="m")
    nonempty = [i + 1 for i, text in enumerate(content) if text.strip()]
    assert [p.line for p in parsed] == nonempty
    for p in parsed:
        assert (p.request is None) != (p.error is None)
        if p.error:
            assert p.error.startswith(f"line {p.line}: ")
        else:
            assert p.request.body["model"] is not None and "id" not in p.request.body


def test_ids_and_line_numbers_do_not_collide_silently(tmp_path):
    """A line without an id is named by its number; where that number is another line's id, the
    message says which line has no id, whichever comes first."""
    path = tmp_path / "r.jsonl"
    body = '"model": "m", "prompt": "p"'
    path.write_text(f'{{"id": 2, {body}}}\n{{{body}}}\n{{{body}}}\n{{"id": 3, {body}}}\n', encoding="utf-8")
    one, two, three, four = read_requests(str(path))
    assert one.request and one.id == 2 and three.request and three.id == 3
    assert two.error == "line 2: the line has no id, and its number 2 is already the id of line 1; give it an id"
    assert four.error == ("line 4: id 3 is already used on line 3 (its line number: that line has no id); "
                          "ids must be unique")
    assert two.id is None and four.id is None  # each id in the result file names one line


def test_an_id_and_its_string_are_one_id(tmp_path):
    """3 and "3", a line number and a custom_id "2", are one id to whoever joins the results on it."""
    path = tmp_path / "r.jsonl"
    body = '"model": "m", "prompt": "p"'
    batch = '"url": "/v1/completions", "body": {"model": "m", "prompt": "q"}'
    path.write_text(f'{{"id": 3, {body}}}\n{{{body}}}\n{{"custom_id": "2", {batch}}}\n{{"id": "3", {body}}}\n'
                    f'{{"id": "3x", {body}}}\n', encoding="utf-8")
    one, two, three, four, five = read_requests(str(path))
    assert one.request and two.request and two.id == 2 and five.request
    assert three.error == ("line 3: id '2' is already used on line 2 (its line number: that line has no id); "
                           "ids must be unique")
    assert four.error == "line 4: id '3' is already used on line 1; ids must be unique"
    assert three.id is None and four.id is None


async def test_progress_and_summary_say_what_happened(make_server):
    server = make_server(faults={"502": 0.3}, seed=1)
    out = io.StringIO()
    async with Client(fast_config(server)) as client:
        bar = Progress(client, 30, file=out, mode="bar", interval_s=0.01)
        bar.start()
        await client.run_many(chat_requests(30))
        bar.update()
        status = bar.status()
        bar.close()
    assert "30 done" in status and "0 failed" in status and "in flight" in status and "req/min" in status
    assert "30/30" in out.getvalue()
    text = summary(client, 2.0)
    assert text.startswith("batch: 30 requests in 2s: 30 completed (30 sent), 0 failed.")
    assert f"retries (502: {client.stats.retries['502']})" in text and "Tokens paid" in text


async def test_the_first_log_line_has_rates_and_the_summary_says_when_errors_are_left_out(make_server):
    def responder(kind, body):
        n = int(body["messages"][0]["content"].split()[-1])
        if n < 4:
            raise ServerError(400, f"bad request kind {n}")
        return default_responder(kind, body)

    server = make_server(responder=responder, latency_ms=20)
    out = io.StringIO()
    async with Client(fast_config(server, max_in_flight=4)) as client:
        log = Progress(client, 80, file=out, mode="log", interval_s=0.01, log_every_s=0.2)
        log.start()
        await client.run_many(chat_requests(80))
        log.close()
    first = out.getvalue().splitlines()[0]
    assert " 0 req/min" not in first and "ETA" in first, first
    text = summary(client, 1.0)
    assert "4 dead-lettered this run (" in text
    assert "; and 1 more kind of error: see `neuronatlas dead-letters`)." in text


async def test_the_summary_does_not_count_unsent_requests_as_failed(make_server):
    server = make_server()
    async with Client(fast_config(server)) as client:
        client.stop()  # what Ctrl-C does: nothing is sent from here on
        results = await client.run_many(chat_requests(7))
    assert {r.error.type for r in results} == {"interrupted"}
    text = summary(client, 1.0)
    assert "0 completed, 0 failed." in text and "7 not finished" in text


def test_the_test_server_runs_as_a_process_with_limits_and_faults():
    with spawn(["--rpm", "6000", "--fault-rate", "0.2", "--faults", "500,nonjson", "--latency-ms", "5"]) as server:
        import asyncio

        async def go():
            async with Client(fast_config(server)) as client:
                return await client.run_many(chat_requests(50))

        results = asyncio.run(go())
        stats = server.stats()
    assert all(r.ok for r in results)
    assert set(stats["faults"]) <= {"500", "nonjson"} and sum(stats["faults"].values()) > 0
    assert sorted(stats["served"].values()) == [1] * 50
    assert stats["admitted"] == 50 + sum(stats["faults"].values())


async def test_the_test_server_runs_in_process_with_a_responder_hook():
    from client.testserver import ServerConfig, TestServer, chat_reply

    calls = []

    async def responder(kind, body):  # async hooks work too
        calls.append(body["messages"][0]["content"])
        return chat_reply(body, [" fixed", " reply"])

    async with TestServer(ServerConfig(models=["m"]), responder=responder) as server:
        async with Client(fast_config(server)) as client:
            assert await client.check() == ["m"]
            result = await client.complete({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
        assert server.stats.served[result.key] == 1
    assert calls == ["hello"]
    assert result.unwrap()["choices"][0]["message"]["content"] == "fixed reply"
