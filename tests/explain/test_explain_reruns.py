"""Reruns with other options, gaps of an imported store, and what reaches the terminal: a rerun
never mixes results made with different options in silence, and --redo makes them again."""

from __future__ import annotations

import json

from tests.explain.helpers import served

SELECT = ["--layers", "0", "--neurons", "0-3"]


def _flags(server):
    return ["--base-url", server.base_url, "--progress", "off", "--no-fsync"]


def _files(store):
    return {p: p.read_bytes() for p in sorted((store / "explanations").rglob("*.json"))}


def _error(rc, err):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_a_rerun_with_other_options_is_refused_then_redone(store, fake_server, cli):
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))[0] == 0
        assert cli("simulate", store, *SELECT, *_flags(server))[0] == 0
        assert cli("score", store, *SELECT, "--no-fsync")[0] == 0
        before = _files(store)
        sent = sum(served(server).values())

        # Another split, another number of samples: refused before anything is sent or written.
        line = _error(*cli("simulate", store, *SELECT, "--split", "test", *_flags(server))[::2])
        assert "4 of the selected neurons were simulated with other options" in line
        assert "--split was valid, now test" in line and "--redo" in line
        line = _error(*cli("simulate", store, *SELECT, "--no-calibration", "--score-top", "3", *_flags(server))[::2])
        assert "--score-top was 5, now 3" in line and "--no-calibration was not given, now given" in line
        line = _error(*cli("explain", store, "--explainer-model", "m", *SELECT, "--samples", "2", *_flags(server))[::2])
        assert "were explained with other options" in line and "--samples was 1, now 2" in line
        assert _files(store) == before and sum(served(server).values()) == sent

        # The same options: nothing to do, nothing changed.
        assert cli("simulate", store, *SELECT, *_flags(server))[0] == 0
        assert _files(store) == before

        # --redo simulates them again on the test split; their old scores are gone until scored.
        rc, out, err = cli("simulate", store, *SELECT, "--split", "test", "--redo", *_flags(server))
        assert rc == 0, err
        assert "4 to do" in err
    recs = [json.loads(p.read_text()) for p in sorted((store / "explanations").rglob("0000*.json"))]
    assert len(recs) == 4
    for rec in recs:
        assert rec["status"] == "simulated" and rec["score"] is None and rec["rsquared"] is None
        assert rec["simulation"]["split"] == "test"
        assert {e["split"] for c in rec["candidates"] for e in c["simulation"]["excerpts"]} == {"test", "calibration"}
    assert cli("score", store, *SELECT, "--no-fsync")[0] == 0
    recs = [json.loads(p.read_text()) for p in sorted((store / "explanations").rglob("0000*.json"))]
    assert all(rec["status"] == "scored" and rec["split"] == "test" for rec in recs)


def test_explain_samples_below_one_names_the_flag(store, fake_server, cli):
    with fake_server() as (server, fake):
        line = _error(*cli("explain", store, "--explainer-model", "m", *SELECT, "--samples", "0", *_flags(server))[::2])
    assert "--samples must be at least 1" in line


def test_top_escapes_control_characters_of_explanations(store, fake_server, cli):
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server))[0] == 0
        assert cli("simulate", store, *SELECT, *_flags(server))[0] == 0
    assert cli("score", store, *SELECT, "--no-fsync")[0] == 0
    path = sorted((store / "explanations").rglob("000000.json"))[0]
    rec = json.loads(path.read_text())
    rec["explanation"] = "red \x1b[31mtext\u202e reversed\x07"
    path.write_text(json.dumps(rec))
    rc, out, err = cli("top", store)
    assert rc == 0
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "red \\x1b[31mtext\\u202e reversed\\x07" in out


def test_gaps_of_an_imported_store_are_skipped_not_failed(tmp_path, fake_server, cli):
    """OpenAI's published data downloaded in part: the neurons without a record are no failures."""
    from tests.atlas.helpers import write_published

    src = write_published(tmp_path / "published")
    store = tmp_path / "imported"
    assert cli("import", src, "--out", store, "--no-progress")[0] == 0
    with fake_server() as (server, fake):
        rc, out, err = cli("explain", store, "--explainer-model", "m", *_flags(server))
    assert rc == 0, err
    # Layer 0 has neurons 0 and 1, layer 2 neurons 3 only (0..2 are gaps); layer 1 has none.
    line = next(line for line in err.splitlines() if "to do in" in line)
    assert "3 explained, 3 have no record" in line and "failed" not in line, line
    done = sorted(p.relative_to(store / "explanations") for p in (store / "explanations").rglob("0*.json"))
    assert [(p.parent.name, p.name) for p in done] == [("000", "000000.json"), ("000", "000001.json"),
                                                       ("002", "000003.json")]


def test_a_temperature_no_server_takes_is_refused(store, fake_server, cli):
    with fake_server() as (server, fake):
        for bad in ("nan", "inf", "-1", "2.5"):
            line = _error(*cli("explain", store, "--explainer-model", "m", *SELECT, "--temperature", bad,
                               *_flags(server))[::2])
            assert "--temperature must be a number from 0 to 2" in line
        assert sum(served(server).values()) == 0


def test_results_files_written_at_once_by_many_writers(tmp_path):
    """Two first runs of other groups write STORE/explanations/zarr.json at the same moment: a
    shared temporary name made one of them fail ('No such file or directory')."""
    import threading

    from client.results import read_json, write_json_atomic

    path = tmp_path / "zarr.json"
    errors = []

    def write(i):
        try:
            for j in range(40):
                write_json_atomic(path, {"writer": i, "n": j}, durable=False)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and read_json(path)["n"] == 39 and not list(tmp_path.glob(".*.tmp"))


def test_one_run_at_a_time_per_results_group(store):
    """A second run on the same results group is refused while the first holds it, then admitted."""
    import pytest

    from client.results import ResultsGroup
    from engine.errors import UserError

    group = ResultsGroup.for_models(store, "e", "s", "v1")
    with group.lock():
        with pytest.raises(UserError, match="another neuronatlas run is writing to"):
            with group.lock():
                pass
    with group.lock():
        pass


def test_a_run_refused_by_the_group_lock_writes_nothing(store, fake_server, cli, tmp_path):
    """Held by another run, the group refuses this one before its request store exists (it was
    created, with its lock file, before the group lock was tried)."""
    from client.results import ResultsGroup

    requests = tmp_path / "other.sqlite"
    first, later = ["--layers", "0", "--neurons", "0-1"], ["--layers", "0", "--neurons", "2-3"]
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
        assert cli("simulate", store, *first, *_flags(server), "--no-fsync")[0] == 0
        received = server.snapshot()["received"]
        with ResultsGroup.for_models(store, "m", "m", "v1").lock():
            for command in (["explain", store, "--explainer-model", "m", "--layers", "0", "--neurons", "4-7"],
                            ["simulate", store, *later]):
                rc, _, err = cli(*command, "--requests", requests, *_flags(server))
                assert rc == 2 and "another neuronatlas run is writing to" in err, err
            rc, _, err = cli("score", store, *first)
            assert rc == 2 and "another neuronatlas run is writing to" in err, err
        assert not list(tmp_path.glob("other.sqlite*"))
        assert server.snapshot()["received"] - received <= 2  # simulate's mode probe, nothing else


def test_score_refuses_to_mix_calibrated_and_raw_scores(store, fake_server, cli):
    """Some neurons scored with --no-calibration, then a plain `score` over more: refused, naming
    the option (it skipped them as done and scored the rest calibrated, in silence); --rescore
    scores them all again the same way."""
    with fake_server() as (server, fake):
        assert cli("explain", store, "--explainer-model", "m", *SELECT, *_flags(server), "--no-fsync")[0] == 0
        assert cli("simulate", store, *SELECT, *_flags(server), "--no-fsync")[0] == 0
    assert cli("score", store, "--layers", "0", "--neurons", "0-1", "--no-calibration")[0] == 0
    before = _files(store)
    line = _error(*cli("score", store, *SELECT)[::2])
    assert "were scored with other options" in line and "--no-calibration was given, now not" in line
    assert "--rescore" in line and _files(store) == before
    assert cli("score", store, *SELECT, "--rescore")[0] == 0
    recs = [json.loads(p.read_text()) for p in sorted((store / "explanations").rglob("0000*.json"))]
    assert all(r["scoring"] == {"calibration": True} for r in recs if r["status"] == "scored")
    assert cli("score", store, *SELECT)[0] == 0  # the same options again: nothing to refuse
