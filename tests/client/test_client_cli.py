"""`neuronatlas batch`, `dead-letters` and `retry-dead`: files, bad input, SIGKILL and Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import pytest

from client import cli
from client.request import Request
from client.testserver import chat_reply, default_responder
from client_testlib import ROOT, cli_env, neuronatlas, stored_keys


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "NEURONATLAS_STORE", "NEURONATLAS_PRICES"):
        monkeypatch.delenv(name, raising=False)


def write_requests(path, n, prefix="q", **extra):
    lines = [json.dumps({"id": f"{prefix}{i}", "max_tokens": 3, **extra,
                         "messages": [{"role": "user", "content": f"{prefix} {i}"}]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return [Request({"max_tokens": 3, **extra, "messages": [{"role": "user", "content": f"{prefix} {i}"}],
                     "model": "test-model"}) for i in range(n)]


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch_args(server, tmp_path, *more, requests="req.jsonl", out="out.jsonl"):
    return ["batch", str(tmp_path / requests), "--out", str(tmp_path / out), "--model", "test-model",
            "--base-url", server.base_url, "--api-key", "k", "--progress", "off", *more]


# -- files ----------------------------------------------------------------------------------------

def test_batch_writes_every_line_reports_bad_ones_and_reruns_from_the_store(make_server, tmp_path, capsys):
    server = make_server(latency_ms=5, faults={"500": 0.2, "truncated": 0.1})
    good = write_requests(tmp_path / "req.jsonl", 30)
    with open(tmp_path / "req.jsonl", "a") as f:
        f.write("{broken json\n\n")
        f.write(json.dumps({"id": "nomsg", "model": "m"}) + "\n")
        f.write(json.dumps({"id": "q3", "prompt": "dup id"}) + "\n")
        f.write(json.dumps({"custom_id": "b1", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "m2", "prompt": "x", "max_tokens": 2}}) + "\n")
        f.write(json.dumps({"id": "same", "model": "test-model", "max_tokens": 3,
                            "messages": [{"role": "user", "content": "q 0"}]}) + "\n")
    rc = cli.main(batch_args(server, tmp_path))
    err = capsys.readouterr().err
    assert rc == 1                                            # some lines failed
    assert "line 31: not valid JSON" in err and 'line 33: no "messages"' in err
    assert "line 34: id 'q3' is already used on line 4" in err
    results = read_results(tmp_path / "out.jsonl")
    assert [r["id"] for r in results] == [f"q{i}" for i in range(30)] + [None, "nomsg", None, "b1", "same"]
    assert all("response" in r for r in results[:30])
    assert results[30]["line"] == 31 and results[30]["error"]["type"] == "bad_input"
    assert results[33]["response"]["object"] == "text_completion"
    assert results[34]["response"] == results[0]["response"]  # identical body: one reply, sent once
    served = server.snapshot()["served"]
    assert all(served[r.key] == 1 for r in good) and sum(served.values()) == 31
    assert "32 completed" in err and "retries" in err

    received = server.snapshot()["received"]
    (tmp_path / "out.jsonl").unlink()
    assert cli.main(batch_args(server, tmp_path)) == 1
    assert server.snapshot()["received"] == received          # the rerun sent nothing
    assert read_results(tmp_path / "out.jsonl") == results    # and wrote the whole file again
    assert "from the store" in capsys.readouterr().err


def test_a_huge_integer_budget_neither_stalls_nor_stops_the_batch(make_server, tmp_path):
    """max_tokens or n of 10**400 (JSON allows it, Python reads it) once overflowed the limiter's
    float arithmetic: the dispatcher died and the run waited forever with nothing in flight."""
    server = make_server(latency_ms=2, tpm=600_000)
    write_requests(tmp_path / "req.jsonl", 6)
    with open(tmp_path / "req.jsonl", "a") as f:
        f.write('{"id": "huge", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1%s}\n' % ("0" * 400))
        f.write('{"id": "many", "messages": [{"role": "user", "content": "y"}], "max_tokens": 2, "n": 1%s}\n' % ("0" * 400))
        f.write('{"id": "after", "messages": [{"role": "user", "content": "z"}], "max_tokens": 2}\n')
    run = subprocess.run([*neuronatlas(), *batch_args(server, tmp_path, "--timeout", "5", "--deadline", "20")],
                         cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)  # it hung for good
    assert run.returncode == 1, run.stderr  # the server refuses the huge ones with a 400: a line's error
    results = {r["id"]: r for r in read_results(tmp_path / "out.jsonl")}
    assert len(results) == 9 and "response" in results["after"] and all("response" in results[f"q{i}"] for i in range(6))
    assert results["huge"]["error"]["status"] == 400 and results["many"]["error"]["status"] == 400
    took = re.search(r"batch: 9 requests in (\d+)s", run.stderr)
    assert took and int(took.group(1)) < 20, run.stderr  # no minute's pause behind them


def test_failures_are_dead_lettered_listed_and_retried(make_server, tmp_path, capsys):
    ignore = {"on": True}

    def responder(kind, body):  # a server that ignores logprobs, until it is fixed
        return chat_reply({**body, "logprobs": False}, [" x"]) if ignore["on"] else default_responder(kind, body)

    server = make_server(responder=responder)
    write_requests(tmp_path / "req.jsonl", 5, logprobs=True)
    store = str(tmp_path / "s.sqlite")
    assert cli.main(batch_args(server, tmp_path, "--store", store)) == 1
    results = read_results(tmp_path / "out.jsonl")
    assert {r["error"]["type"] for r in results} == {"missing_logprobs"}
    assert "ignores 'logprobs'" in results[0]["error"]["message"]
    capsys.readouterr()

    assert cli.main(["dead-letters", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "5 dead letters" in listing and "5 x missing_logprobs" in listing
    assert cli.main(["dead-letters", "--store", store, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and rows[0]["body"]["logprobs"] is True

    received = server.snapshot()["received"]
    assert cli.main(batch_args(server, tmp_path, "--store", store)) == 1   # a rerun reports, does not resend
    assert server.snapshot()["received"] == received
    assert (": 0 completed, 5 failed (5 dead-lettered earlier, not sent again)."
            in capsys.readouterr().err)

    ignore["on"] = False
    assert cli.main(["retry-dead", "--store", store, "--base-url", server.base_url, "--api-key", "k",
                     "--progress", "off"]) == 0
    assert "5 of 5 now completed" in capsys.readouterr().err
    assert cli.main(batch_args(server, tmp_path, "--store", store)) == 0
    assert all("logprobs" in r["response"]["choices"][0] for r in read_results(tmp_path / "out.jsonl"))
    assert cli.main(["dead-letters", "--store", store]) == 0
    assert "no dead letters" in capsys.readouterr().out


def test_dead_letters_group_give_ups_whatever_their_count_and_time(tmp_path, capsys):
    import asyncio

    from client.store import RequestStore

    store = str(tmp_path / "s.sqlite")

    async def fill():
        s = RequestStore(store, durable=False)
        await asyncio.gather(*(s.put_dead(f"k{i}", "chat", {"model": "m", "messages": []}, "connection", None,
                                          f"gave up after {n} attempts in {sec} s (max attempts): connection refused", n)
                               for i, (n, sec) in enumerate([(10, 41), (10, 44), (7, 53)])),
                             s.put_dead("k9", "chat", {"model": "m", "messages": []}, "http", 400, "bad request", 1))
        await s.flush()
        s.close()

    asyncio.run(fill())
    assert cli.main(["dead-letters", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "3 x connection: gave up (max attempts): connection refused" in listing
    assert "1 x http 400: bad request" in listing


def test_a_listing_piped_into_head_stops_quietly(tmp_path):
    import asyncio

    from client.store import RequestStore

    store = str(tmp_path / "s.sqlite")

    async def fill():
        s = RequestStore(store, durable=False)
        await asyncio.gather(*(s.put_dead(f"k{i}", "chat", {"model": "m", "messages": []}, "http", 400,
                                          f"bad request {i}", 1) for i in range(2000)))  # one group commit
        await s.flush()
        s.close()

    asyncio.run(fill())
    cmd = " ".join([*neuronatlas(), "dead-letters", "--store", store, "--limit", "2000"])
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -n 1"], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith(f"{store}: 2,000 dead letters")
    assert r.stderr == "" and r.returncode == 141


# -- bad input: one line, exit 2, nothing sent -----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("neuronatlas ")
    return err[0]


def test_a_missing_key_for_openai_is_named_before_anything_is_sent(tmp_path, capsys):
    write_requests(tmp_path / "req.jsonl", 2)
    assert cli.main(["batch", str(tmp_path / "req.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                     "--model", "gpt-4o-mini", "--progress", "off"]) == 2
    assert "OPENAI_API_KEY" in one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", ["nothing listens", "key refused", "wrong path", "no model", "no file",
                                  "bad prices", "bad store", "rpm nan", "timeout nan", "deadline -1",
                                  "attempts 0", "out is a dir", "out is the input", "out under a file"])
def test_bad_setups_get_one_line_and_exit_2(make_server, tmp_path, capsys, case):
    server = make_server(api_key="right")
    write_requests(tmp_path / "req.jsonl", 3)
    args = batch_args(server, tmp_path)
    args[args.index("--api-key") + 1] = "right"
    if case == "nothing listens":
        args[args.index("--base-url") + 1] = f"http://127.0.0.1:{free_port()}/v1"
        expect = "nothing answers at"
    elif case == "key refused":
        args[args.index("--api-key") + 1] = "wrong"
        expect = "key was refused"
    elif case == "wrong path":
        args[args.index("--base-url") + 1] = server.base_url.removesuffix("/v1") + "/_stats/v1"
        expect = "404"
    elif case == "no model":
        args.remove("--model")
        args.remove("test-model")
        expect = 'pass --model or add "model"'
    elif case == "no file":
        args[1] = str(tmp_path / "missing.jsonl")
        expect = "not found"
    elif case == "bad prices":
        (tmp_path / "p.json").write_text('{"m": 1}')
        args += ["--prices", str(tmp_path / "p.json")]
        expect = "needs \"input\" and \"output\""
    elif case == "bad store":
        (tmp_path / "junk.sqlite").write_bytes(b"junk" * 1000)
        args += ["--store", str(tmp_path / "junk.sqlite")]
        expect = "not a request store"
    elif case in ("rpm nan", "timeout nan", "deadline -1", "attempts 0"):
        flag, value = case.split()
        args += [{"attempts": "--max-attempts"}.get(flag, f"--{flag}"), value]
        expect = "must be a positive number" if flag != "attempts" else "must be at least 1"
    elif case == "out is a dir":
        (tmp_path / "out.jsonl").mkdir()
        expect = "is a directory"
    elif case == "out is the input":
        args[args.index("--out") + 1] = str(tmp_path / "." / "req.jsonl")
        expect = "is the request file"
    else:
        (tmp_path / "f").write_text("")
        args[args.index("--out") + 1] = str(tmp_path / "f" / "out.jsonl")
        expect = "is a file, not a directory"
    before = (tmp_path / "req.jsonl").read_bytes()
    assert cli.main(args) == 2
    assert expect in one_error_line(capsys)
    assert server.snapshot()["received"] == 0
    assert (tmp_path / "out.jsonl").is_dir() if case == "out is a dir" else not (tmp_path / "out.jsonl").exists()
    assert (tmp_path / "req.jsonl").read_bytes() == before


# -- crashes and Ctrl-C: real processes ------------------------------------------------------------

N = 400


def start_batch(server, tmp_path):
    args = batch_args(server, tmp_path, "--max-in-flight", "32", "--store", str(tmp_path / "s.sqlite"))
    return subprocess.Popen([*neuronatlas(), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stored(path, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while len(stored_keys(path)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.02)


def test_sigkill_then_rerun_sends_no_completed_request_again(make_server, tmp_path):
    server = make_server(latency_ms=40, rpm=6000)
    requests = write_requests(tmp_path / "req.jsonl", N)
    store = str(tmp_path / "s.sqlite")
    proc = start_batch(server, tmp_path)
    wait_for_stored(store, 60, proc)
    proc.kill()
    proc.wait()
    done_before = stored_keys(store)
    assert 60 <= len(done_before) < N

    rerun = subprocess.run([*neuronatlas(), *batch_args(
        server, tmp_path, "--max-in-flight", "32", "--store", store)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    served = server.snapshot()["served"]
    assert all(served[k] == 1 for k in done_before)               # none of the completed sent again
    assert all(served.get(r.key, 0) >= 1 for r in requests)        # none lost
    # Sent twice: at most what was in flight at the kill (32) and replies not yet committed (25 ms).
    assert sum(served.values()) - N <= 32 + 16
    assert len(read_results(tmp_path / "out.jsonl")) == N
    assert f"{len(done_before):,} from the store" in rerun.stderr


def test_a_second_batch_on_a_store_in_use_is_refused_and_pays_for_nothing(make_server, tmp_path):
    server = make_server(latency_ms=40, rpm=6000)
    write_requests(tmp_path / "req.jsonl", N)
    store = str(tmp_path / "s.sqlite")
    proc = start_batch(server, tmp_path)
    wait_for_stored(store, 20, proc)
    second = subprocess.run([*neuronatlas(), *batch_args(server, tmp_path, "--store", store, out="out2.jsonl")],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert second.returncode == 2  # a user error, as every refused store
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by another run (pid {proc.pid})" in lines[0], second.stderr
    assert not (tmp_path / "out2.jsonl").exists()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    served = server.snapshot()["served"]
    assert len(served) == N and set(served.values()) == {1}  # the second run sent nothing


def test_ctrl_c_finishes_what_is_in_flight_stores_it_and_says_how_to_resume(make_server, tmp_path):
    server = make_server(latency_ms=40, rpm=6000)
    requests = write_requests(tmp_path / "req.jsonl", N)
    store = str(tmp_path / "s.sqlite")
    proc = start_batch(server, tmp_path)
    wait_for_stored(store, 60, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted: finishing" in err and "Run the same command again to resume" in err
    assert not (tmp_path / "out.jsonl").exists()
    served = server.snapshot()["served"]
    assert set(served) == stored_keys(store) and set(served.values()) == {1}   # everything served is stored
    assert len(served) < N

    rerun = subprocess.run([*neuronatlas(), *batch_args(
        server, tmp_path, "--max-in-flight", "32", "--store", store)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    served = server.snapshot()["served"]
    assert {r.key for r in requests} == set(served) and set(served.values()) == {1}   # each paid exactly once


def test_neuronatlas_has_the_client_commands():
    pytest.importorskip("engine.commands", reason="the engine's commands are not there yet")
    from engine.cli import build_parser

    args = build_parser().parse_args(["batch", "r.jsonl", "--out", "o.jsonl", "--rpm", "600"])
    assert args.func is cli.batch_command and args.rpm == 600
    assert build_parser().parse_args(["retry-dead", "--store", "s"]).func is cli.retry_dead_command
