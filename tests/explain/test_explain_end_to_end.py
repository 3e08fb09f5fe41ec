"""record -> explain -> simulate -> score -> top on a tiny model, through the CLI and the test server;
reruns send nothing; a run killed with SIGKILL resumes without paying again for any stored reply."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np

from client.simulate import probe_request
from client.testserver import ServerConfig
from engine import open_store
from tests.explain.helpers import served

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SELECT = ["--layers", "0-1", "--neurons", "0-11"]


def _flags(server):
    return ["--base-url", server.base_url, "--progress", "off", *SELECT]


def test_end_to_end_on_a_tiny_model(store, fake_server, cli):
    with fake_server(tokenizer="chunk3") as (server, fake):
        rc, _, err = cli("explain", store, "--dry-run", "--explainer-model", "fake-e", "--simulator-model", "fake-s",
                         *_flags(server))
        assert rc == 0 and "24 neurons -> 24 requests to fake-e" in err and "dry run" in err
        assert not (store / "explanations").exists() and server.snapshot()["received"] == 0

        rc, _, err = cli("explain", store, "--explainer-model", "fake-e", "--simulator-model", "fake-s", *_flags(server))
        assert rc == 0, err
        rc, _, err = cli("simulate", store, *_flags(server))  # the store's only results group
        assert rc == 0, err
        assert "mode echo" in err
        rc, _, err = cli("score", store, *SELECT)
        assert rc == 0, err
        rc, out, _ = cli("top", store, "--by", "score", "-n", "5")
        assert rc == 0

        # Reruns find everything done and send nothing.
        before = served(server)
        for stage in ("explain", "simulate"):
            rc, _, err = cli(stage, store, *_flags(server))
            assert rc == 0 and "0 to do, 24 done already" in err
        assert served(server) == before
        assert all(n == 1 for key, n in before.items() if key != probe_request("echo", "fake-s").key)

    s = open_store(store)
    defined = []
    for layer in (0, 1):
        for index in range(12):
            results = s.explanations(layer, index)
            assert len(results) == 1 and s.neuron(layer, index).explanations == results
            r = results[0]
            assert r["explainer_model"] == "fake-e" and r["simulator_model"] == "fake-s" and r["prompt_version"] == "v1"
            assert r["status"] in ("scored", "never_fires")
            if r["status"] == "scored":
                assert r["explanation"].startswith("the token ") and r["simulation_mode"] == "echo"
                if r["score"] is None:  # undefined is said so, with the reason, never as 0
                    assert r["undefined"]["score"]
                else:
                    defined.append((r["score"], layer, index))
                    _check_score_against_numpy(store, r["key"], layer, index, r["score"])
    assert len(defined) >= 6 and max(defined)[0] > 0.3
    listed = [line.split()[0] for line in out.splitlines()[1:6]]
    assert listed == [f"{layer}:{index}" for _, layer, index in sorted(defined, reverse=True)[:5]]


def _check_score_against_numpy(store, key, layer, index, score):
    rec = json.loads((store / "explanations" / key / "neurons" / f"{layer:03d}" / f"{index:06d}.json").read_text())
    best = next(c for c in rec["candidates"] if c["explanation"] == rec["explanation"])
    ex = [e for e in best["simulation"]["excerpts"] if e["split"] == "valid"]
    true = np.concatenate([e["true"] for e in ex])
    simv = np.concatenate([e["sim"] for e in ex])
    assert math.isclose(score, np.corrcoef(true, simv)[0, 1], rel_tol=1e-9)
    record = open_store(store).neuron(layer, index)
    by_id = {r.excerpt_id: r for r in record.most_positive_activation_records + record.random_sample}
    for e in ex:  # the true activations scored are the recording's
        assert e["true"] == by_id[e["excerpt_id"]].activations and len(e["sim"]) == len(e["true"])


def _simulate_process(store, server, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "simulate", str(store), "--base-url", server.base_url,
                             "--progress", "off", "--max-in-flight", "4", "--max-slots", "12", *SELECT, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stored_keys(store) -> set[str]:
    con = sqlite3.connect(store / "explanations" / "requests.sqlite")
    try:
        return {k for (k,) in con.execute("SELECT key FROM results")}
    finally:
        con.close()


def _simulations(store) -> dict:
    s = open_store(store)
    out = {}
    for layer in (0, 1):
        for index in range(12):
            r = s.explanations(layer, index)[0]
            out[layer, index] = (r["status"], r["explanation"], r["score"])
    return out


def test_a_killed_run_resumes_without_paying_twice(recorded_store, store, fake_server, cli, tmp_path):
    with fake_server(ServerConfig(latency_ms=50), tokenizer="words") as (server, fake):
        rc, _, err = cli("explain", store, "--explainer-model", "fake", *_flags(server))
        assert rc == 0, err
        proc = _simulate_process(store, server)
        deadline = time.monotonic() + 300
        # Kill it partway: 24 explanations, then one simulation request per excerpt (--max-slots 12,
        # 8 excerpts a neuron), 4 in flight, all neurons under way at once.
        while sum(served(server).values()) < 24 + 60 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the simulation finished before it could be killed: " + proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stored = _stored_keys(store)
        at_kill = served(server)
        statuses = [r[0] for r in _simulations(store).values()]  # every neuron file whole and readable
        assert "explained" in statuses  # killed mid-run: some neurons not simulated yet

        proc = _simulate_process(store, server)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "from the store" in err
        rc, _, err = cli("score", store, *SELECT)
        assert rc == 0, err
        final = served(server)

    probe = probe_request("echo", "fake").key
    # Every reply stored before the kill was paid once; only requests in flight at the kill (at most
    # --max-in-flight of them) may have been delivered and lost, and so sent again.
    assert all(final[k] == 1 for k in stored if k != probe)
    again = {k: n for k, n in final.items() if n > 1 and k != probe}
    assert len(again) <= 4 and all(at_kill.get(k, 0) == 1 for k in again)

    # The resumed run ends where an uninterrupted one does.
    clean = tmp_path / "clean"
    shutil.copytree(recorded_store, clean)
    with fake_server(tokenizer="words") as (server, fake):
        for stage, extra in (("explain", []), ("simulate", ["--max-slots", "12"])):
            rc, _, err = cli(stage, clean, "--explainer-model", "fake", *_flags(server), *extra)
            assert rc == 0, err
        assert cli("score", clean, *SELECT)[0] == 0
    assert _simulations(store) == _simulations(clean)


def test_a_second_ctrl_c_says_the_cancelled_requests_may_have_been_paid(store, fake_server, cli):
    # The first Ctrl-C lets the requests in flight finish; the second cancels them, and those may
    # have been paid already: the closing line must not promise that nothing is paid again.
    with fake_server(ServerConfig(latency_ms=3000), tokenizer="words") as (server, fake):
        rc, _, err = cli("explain", store, "--explainer-model", "fake", *_flags(server))
        assert rc == 0, err
        proc = _simulate_process(store, server)
        deadline = time.monotonic() + 120
        while server.snapshot()["received"] < 24 + 1 + 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the explanations, the mode probe (echo), then 4 simulation requests in flight
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "the 4 requests cancelled in flight may have been paid, and are sent again" in err, err
