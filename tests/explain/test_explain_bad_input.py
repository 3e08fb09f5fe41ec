"""Bad input: one clear line and exit status 2 before anything is sent or written; bad replies are
recorded per neuron as failures with their reason, the run goes on, and no score is invented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr

from engine import open_store
from engine.errors import UserError
from tests.explain.helpers import served

SELECT = ["--layers", "0", "--neurons", "0-7"]


def _flags(server):
    return ["--base-url", server.base_url, "--progress", "off"]


def _one_error_line(rc, err, *needles):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _set_progress(store, **changes):
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    progress = dict(root.attrs["progress"])
    progress.update(changes)
    root.attrs["progress"] = progress


def test_a_store_with_no_recording_is_refused(store, tmp_path, fake_server, cli):
    with fake_server() as (server, fake):
        args = ["--explainer-model", "m", *_flags(server)]
        _one_error_line(*cli("explain", tmp_path / "missing", *args)[::2], "not found")
        (tmp_path / "empty").mkdir()
        _one_error_line(*cli("explain", tmp_path / "empty", *args)[::2], "not a neuronatlas store")
        _set_progress(store, complete=False)
        _one_error_line(*cli("explain", store, *args)[::2], "not complete", "--allow-incomplete")
        rc, _, err = cli("explain", store, "--allow-incomplete", "--dry-run", *SELECT, *args)
        assert rc == 0, err
        _set_progress(store, checkpoint=None)
        _one_error_line(*cli("simulate", store, *args)[::2], "no recording")
        assert server.snapshot()["received"] == 0
    assert not (store / "explanations").exists()


@pytest.mark.parametrize("selection, needles", [
    (["--layers", "7"], ["layer 7 out of range", "layers 0..1"]),
    (["--layers", "0", "--neurons", "0-9999"], ["neuron 9999 out of range", "layer 0 has neurons 0..71"]),
    (["--neurons", "-3"], ["neuron -3 out of range"]),
    (["--layers", "one"], ["not 'all' or a list of layers"]),
    (["--ids", "IDS"], ["line 2", "neuron 500 out of range"]),
    (["--ids", "BAD"], ["line 1", "not LAYER:NEURON"]),
    (["--ids", "IDS", "--layers", "0"], ["cannot be combined"]),
    (["--ids", "MISSING"], ["not found"]),
    # An empty selection or an empty item is a mistake, never "all".
    (["--layers", ""], ["--layers is empty"]),
    (["--layers", "0", "--neurons", " "], ["--neurons is empty"]),
    (["--layers", "0,"], ["--layers '0,' has an empty item"]),
    (["--layers", "0", "--neurons", "0,,1"], ["--neurons '0,,1' has an empty item"]),
    (["--neurons", ",3"], ["--neurons ',3' has an empty item"]),
    (["--ids", ""], ["--ids is empty"]),
])
def test_neuron_ids_out_of_range_are_refused(store, tmp_path, fake_server, cli, selection, needles):
    (tmp_path / "IDS").write_text("0:3  # fine\n1:500\n")
    (tmp_path / "BAD").write_text("zero:1\n")
    selection = [str(tmp_path / a) if a in ("IDS", "BAD", "MISSING") else a for a in selection]
    with fake_server() as (server, fake):
        for stage in ("explain", "simulate"):
            rc, _, err = cli(stage, store, "--explainer-model", "m", *selection, *_flags(server))
            if stage == "simulate" and rc == 2 and "no explanations by" in err:
                continue  # resolved before the selection: also a clear refusal
            _one_error_line(rc, err, *needles)
        assert server.snapshot()["received"] == 0
    assert not (store / "explanations" / "m__m__v1" / "neurons").exists()


@pytest.mark.parametrize("behaviour, reason", [("empty", "empty"), ("refuse", "refused")])
def test_an_empty_or_refusing_explainer_is_a_recorded_failure(store, fake_server, cli, behaviour, reason):
    with fake_server(explain=behaviour) as (server, fake):
        rc, _, err = cli("explain", store, "--explainer-model", "m", "--samples", "2", *SELECT, *_flags(server))
        assert rc == 1 and "8 failed" in err and reason in err
        # Nothing to simulate, nothing sent: the neurons are not "done already" (they said so).
        rc, _, err = cli("simulate", store, *SELECT, *_flags(server))
        assert rc == 2 and "none of the 8 selected neurons can be simulated: 8 failed at an earlier stage" in err
        assert "8 done already" not in err and "error: none" in err.strip().splitlines()[-1]
        rc, _, err = cli("score", store, *SELECT)
        assert rc == 2 and "none of the 8 selected neurons can be scored: 8 failed at an earlier stage" in err
        assert fake.calls["simulate-completion"] == 0
    s = open_store(store)
    for i in range(8):
        (r,) = s.explanations(0, i)
        assert r["status"] == "failed" and r["error"]["stage"] == "explain" and reason in r["error"]["message"]
        assert r["score"] is None and r["explanation"] is None


def test_an_explanation_with_half_a_character_is_recorded_and_simulated(store, fake_server, cli):
    # A lone surrogate ("\\ud800" in the reply's JSON) could be neither written as UTF-8 nor sent to
    # the simulator: the neuron failed with a traceback's message on every rerun (the reply stored).
    with fake_server(explain=lambda tokens, values: "the token \ud800 cat") as (server, fake):
        rc, _, err = cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))
        assert rc == 0, err
        rc, _, err = cli("simulate", store, *SELECT, *_flags(server))
        assert rc == 0, err
    for i in range(8):
        (r,) = open_store(store).explanations(0, i)
        assert r["explanation"] == "the token \ufffd cat" and r["status"] == "simulated"


def test_some_neurons_failing_do_not_stop_the_others(store, fake_server, cli):
    calls = []

    def explain(tokens, values):  # refuses every other request, explains the rest
        calls.append(1)
        return "Sorry, I cannot tell." if len(calls) % 2 == 0 else 'the token "the"'

    with fake_server(explain=explain) as (server, fake):
        rc, _, err = cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))
        statuses = [open_store(store).explanations(0, i)[0]["status"] for i in range(8)]
        assert rc == 1 and statuses.count("failed") == len(calls) // 2 >= 1
        assert statuses.count("explained") == len(calls) - len(calls) // 2
        assert f"{len(calls) // 2} failed" in err
        # A rerun has nothing to send, but its neurons are not all done well: still status 1.
        received = server.snapshot()["received"]
        rc, _, err = cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))
        assert server.snapshot()["received"] == received
        assert rc == 1 and f"{len(calls) // 2} of them failed" in err and "--retry-failed" in err


@pytest.mark.parametrize("mode", ["echo", "text"])
def test_simulated_values_that_do_not_line_up_are_recorded_failures(store, fake_server, cli, mode):
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))[0] == 0
    with fake_server(simulate="misaligned") as (server, fake):
        rc, _, err = cli("simulate", store, "--sim-mode", mode, *SELECT, *_flags(server))
        assert rc == 1 and "failed" in err
        received = server.snapshot()["received"]
        rc, _, err = cli("simulate", store, "--sim-mode", mode, *SELECT, *_flags(server))  # a rerun sends nothing
        assert rc == 1 and "of them failed" in err and server.snapshot()["received"] == received
        # Simulate's failures are simulate's to report (exit 1 there); score names them, and only
        # when it can do nothing at all (no neuron that never fires either) is that an error.
        quiet = sum(open_store(store).explanations(0, i)[0]["status"] == "never_fires" for i in range(8))
        rc, _, err = cli("score", store, *SELECT)
        assert rc == (0 if quiet else 2) and f"{8 - quiet} failed at an earlier stage" in err
        rc, out, _ = cli("top", store)
        assert "no neuron has a defined score" in out
    for i in range(8):
        (r,) = open_store(store).explanations(0, i)
        if r["status"] == "never_fires":
            continue
        assert r["status"] == "failed" and r["error"]["stage"] == "simulate" and r["score"] is None
        assert ("values for" in r["error"]["message"]) if mode == "text" else ("spell the prompt" in r["error"]["message"])
        assert r["explanation"].startswith("the token ")  # the explanation is kept; a rerun can retry
    if mode == "text":  # the stored replies stay unusable; another mode (new requests) recovers them
        with fake_server() as (server, fake):
            rc, _, err = cli("simulate", store, "--retry-failed", "--sim-mode", "chat-logprobs", *SELECT, *_flags(server))
            assert rc == 0, err
        assert all(open_store(store).explanations(0, i)[0]["status"] in ("simulated", "never_fires") for i in range(8))


def test_a_run_above_max_cost_is_refused_before_any_request(store, fake_server, cli):
    with fake_server() as (server, fake):
        for model in ("gpt-4o-mini", "unpriced-model"):
            rc, _, err = cli("explain", store, "--explainer-model", model, "--max-cost", "0.00001", *_flags(server))
            _one_error_line(rc, err, "--max-cost")
            assert ("unknown" in err) == (model == "unpriced-model")
        assert server.snapshot()["received"] == 0
    assert not (store / "explanations").exists()


def test_a_server_that_cannot_do_the_forced_mode_is_refused_before_any_request(store, fake_server, cli):
    with fake_server(completions=False) as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))[0] == 0
        before = served(server)
        files = {p: p.read_bytes() for p in (store / "explanations").rglob("*.json")}
        rc, _, err = cli("simulate", store, "--sim-mode", "echo", *SELECT, *_flags(server))
        _one_error_line(rc, err, "cannot simulate in mode echo", "--sim-mode auto")
        assert served(server) == before and fake.calls["simulate-chat"] == 0 and fake.calls["simulate-completion"] == 0
        assert {p: p.read_bytes() for p in (store / "explanations").rglob("*.json")} == files
        rc, _, err = cli("simulate", store, *SELECT, *_flags(server))  # auto picks what the server can do
        assert rc == 0 and "mode chat-logprobs" in err


def test_a_mode_probe_that_fails_for_a_passing_reason_stops_auto_instead_of_skipping_the_mode(store, fake_server,
                                                                                              cli):
    # A gateway's 200 wrapping an upstream error is retried, then given up: that says nothing of
    # whether the server can echo, so auto must not move on to another mode (and mix modes in a group).
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))[0] == 0

        def responder(kind, body):
            return {"error": {"message": "overloaded inside 200"}} if kind == "completion" else fake(kind, body)

        server.call(lambda: setattr(server.server, "responder", responder))
        rc, _, err = cli("simulate", store, "--max-attempts", "2", *SELECT, *_flags(server))
        _one_error_line(rc, err, "could not ask", "overloaded inside 200")
        assert fake.calls["simulate-chat"] == 0


def test_top_and_score_on_a_store_without_explanations(store, cli):
    _one_error_line(*cli("top", store)[::2], "no explanations")
    _one_error_line(*cli("score", store)[::2], "no explanations", "neuronatlas explain")
    for layers, needle in (("", "--layers is empty"), ("1,", "--layers '1,' has an empty item")):
        _one_error_line(*cli("top", store, "--layers", layers)[::2], needle)
        _one_error_line(*cli("score", store, "--layers", layers)[::2], needle)


def test_results_files_are_whole_json(store, fake_server, cli):
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
    files = list((store / "explanations").rglob("*.json"))
    assert files and all(isinstance(json.loads(p.read_text()), dict) for p in files)
    assert not list((store / "explanations").rglob(".*.tmp"))


def test_results_copied_from_another_recording_are_refused(store, tmp_path, fake_server, cli):
    import shutil

    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
    other = tmp_path / "other"
    shutil.copytree(store, other)
    root = zarr.open_group(str(other), mode="r+", zarr_format=3)
    run = dict(root.attrs["run"])
    run["identity"] = {**run["identity"], "corpus": {**run["identity"]["corpus"], "tokens_sha256": "0" * 64}}
    root.attrs["run"] = run  # as if recorded from another corpus
    for command in (["top", other], ["score", other]):
        _one_error_line(*cli(*command)[::2], "results made from another recording")
    with fake_server() as (server, fake):
        _one_error_line(*cli("simulate", other, "--explainer-model", "m", "--simulator-model", "m", *SELECT,
                             *_flags(server))[::2], "results made from another recording")
    assert cli("top", store)[0] == 0  # in their own store they still read
    with pytest.raises(UserError, match="results made from another recording"):
        open_store(other).explanations(0, 1)  # the reader refuses them too
    assert open_store(store).explanations(0, 1)
    # A damaged group (its zarr.json cut short) is no group without a fingerprint: refused everywhere.
    meta = other / "explanations" / "m__m__v1" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:10])
    for command in (["top", other], ["score", other], ["show", other, "0", "1"], ["export", other, "--out", tmp_path / "x"]):
        _one_error_line(*cli(*command)[::2], "zarr.json is damaged")
    with pytest.raises(UserError, match="zarr.json is damaged"):
        open_store(other).explanations(0, 1)


@pytest.mark.parametrize("damage", ["cut short", "nested", "empty", "a list"])
def test_a_damaged_neuron_file_is_named_not_redone_in_silence(store, fake_server, cli, damage):
    """Results files are written whole: a damaged one was damaged from outside. Every reader says
    which file, in one line (a deeply nested one gave a RecursionError traceback; the others were
    taken for a neuron without results: hidden by show and view, and made again by explain)."""
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
        path = store / "explanations" / "m__m__v1" / "neurons" / "000" / "000001.json"
        text = path.read_bytes()
        path.write_bytes({"cut short": text[:100], "nested": b"[" * 100_000 + b"]" * 100_000, "empty": b"",
                          "a list": b"[]"}[damage])
        received = server.snapshot()["received"]
        for command in (["explain", store, "--explainer-model", "m", *SELECT, *_flags(server)], ["top", store],
                        ["score", store], ["show", store, "0", "1"]):
            _one_error_line(*cli(*command)[::2], "000001.json is damaged")
        assert server.snapshot()["received"] == received
    with pytest.raises(UserError, match="000001.json is damaged"):
        open_store(store).explanations(0, 1)
    with pytest.raises(UserError, match="out of range"):
        open_store(store).explanations(5, 0)
    with pytest.raises(UserError, match="out of range"):
        open_store(store).explanations(0, 10**6)


def test_hand_edited_fields_do_not_break_top(store, fake_server, cli):
    """A neuron's file says which neuron it is by where it lies: a `layer` edited to text broke
    `top` with a TypeError traceback; a boolean score is no score."""
    with fake_server() as (server, fake):
        for stage in ("explain", "simulate"):
            assert cli(stage, store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] in (0, 1)
    assert cli("score", store, *SELECT)[0] in (0, 1)
    neurons = store / "explanations" / "m__m__v1" / "neurons" / "000"
    scored = [p for p in sorted(neurons.iterdir()) if json.loads(p.read_text()).get("status") == "scored"]
    assert len(scored) >= 2
    first, second = (json.loads(p.read_text()) for p in scored[:2])
    scored[0].write_text(json.dumps({**first, "layer": "x", "neuron": None}))
    scored[1].write_text(json.dumps({**second, "score": True}))
    rc, out, err = cli("top", store, "--json")
    assert rc == 0 and "Traceback" not in err, err
    listed = [(r["layer"], r["neuron"]) for r in map(json.loads, out.splitlines())]
    assert (0, int(scored[0].stem)) in listed and (0, int(scored[1].stem)) not in listed


def test_unscored_fields_top_json_notes_and_max_cost_values(store, fake_server, cli):
    """A neuron file carries its score fields as null until scored (they were absent); `top --json`
    says on standard error what it left out, as the text mode does; --max-cost must be a number of
    USD, 0 or more (nan and -1 were taken and refused later with '$nan')."""
    with fake_server() as (server, fake):
        for value in ("nan", "-1", "inf"):
            rc, _, err = cli("explain", store, "--explainer-model", "m", "--max-cost", value, *SELECT, *_flags(server))
            _one_error_line(rc, err, "--max-cost must be a finite number of USD")
        assert server.snapshot()["received"] == 0
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
        rec = json.loads((store / "explanations" / "m__m__v1" / "neurons" / "000" / "000002.json").read_text())
        assert all(k in rec and rec[k] is None for k in ("score", "score_random_only", "rsquared",
                                                          "absolute_dev_explained", "undefined", "calibration"))
        assert cli("simulate", store, "--layers", "0", "--neurons", "0-3", *_flags(server), "--no-fsync")[0] in (0, 1)
    assert cli("score", store, "--layers", "0", "--neurons", "0-3")[0] in (0, 1)
    rc, out, err = cli("top", store, "--json")
    assert rc == 0 and all(json.loads(line) for line in out.splitlines())
    assert "4 neurons are not scored yet" in err


def test_sigterm_during_the_server_check_says_so_and_writes_nothing(store):
    """A server that accepts and never answers keeps `explain` in its server check; SIGTERM there
    (a job scheduler's stop) is Ctrl-C: exit 130 with a message, not a silent death by signal."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(60)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "explain", str(store), "--explainer-model", "m",
                                 "--base-url", url, "--api-key", "k", "--progress", "off", *SELECT],
                                env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        conn, _ = listener.accept()  # the check has connected and waits for its reply
        try:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            conn.close()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (store / "explanations" / "m__m__v1" / "neurons").exists()
