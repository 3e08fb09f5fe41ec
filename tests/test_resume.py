"""A recording killed at any moment resumes from its last checkpoint and ends with the same store."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine import open_store
from engine.recorder import RecordConfig, record

ROOT = Path(__file__).resolve().parents[1]
N_EXC = 240


def args_for(model, corpus, out, every=0.2):
    return ["record", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
            "--excerpt-len", "12", "--top-k", "4", "--random-k", "6", "--quantile-k", "3",
            "--quantile-prefix", "30", "--batch-size", "4", "--max-excerpts", str(N_EXC),
            "--checkpoint-every", str(every), "--no-progress"]


def config_for(model, corpus, out):
    return RecordConfig(model=str(model), corpus=str(corpus), out=str(out), excerpt_len=12, top_k=4,
                        random_k=6, quantile_k=3, quantile_prefix=30, batch_size=4, max_excerpts=N_EXC,
                        progress=False)


def start(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def progress(out: Path) -> dict:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["progress"]
    except (OSError, ValueError, KeyError):
        return {}


def wait_for_checkpoint(proc, out: Path, at_least: int, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = progress(out)
        if p.get("checkpoint") and p["excerpts_done"] >= at_least:
            return p
        if proc.poll() is not None:
            raise AssertionError(f"recording ended before a checkpoint: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def assert_same_store(a: Path, b: Path, moments_rtol=1e-12):
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    pa, pb = ga.attrs["progress"], gb.attrs["progress"]
    assert pa["complete"] and pb["complete"]
    assert pa["excerpts_done"] == pb["excerpts_done"]
    np.testing.assert_array_equal(ga["tokens"][...], gb["tokens"][...])
    ca, cb = ga[pa["checkpoint"]], gb[pb["checkpoint"]]
    np.testing.assert_array_equal(ca["random_ids"][...], cb["random_ids"][...])
    n_layers = ga.attrs["run"]["n_layers"]
    for layer in range(n_layers):
        la, lb = ca[f"layers/{layer:03d}"], cb[f"layers/{layer:03d}"]
        assert dict(la.attrs) == dict(lb.attrs)
        names = sorted(k for k, _ in la.arrays())
        assert names == sorted(k for k, _ in lb.arrays())
        for name in names:
            x, y = la[name][...], lb[name][...]
            if name == "moments":  # float merges: equal to rounding (other batches: other order)
                np.testing.assert_allclose(x, y, rtol=moments_rtol, atol=moments_rtol)
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"layer {layer} {name}")


def test_sigkill_then_resume_equals_uninterrupted(tiny_models, corpus_file, tmp_path):
    model = tiny_models["llama"]
    record(config_for(model, corpus_file, tmp_path / "ref"), log=lambda *_: None)

    out = tmp_path / "killed"
    proc = start(args_for(model, corpus_file, out))
    p = wait_for_checkpoint(proc, out, at_least=40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < p["excerpts_done"] < N_EXC, "the kill must land part way"
    assert not progress(out)["complete"]
    # The killed store is readable at its last checkpoint.
    s = open_store(out)
    assert s.excerpts_done >= 40 and s.neuron(0, 0).most_positive_activation_records

    proc = start(args_for(model, corpus_file, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming" in err or "resuming" in _
    assert_same_store(tmp_path / "ref", out)


def test_ctrl_c_leaves_a_resumable_store(tiny_models, corpus_file, tmp_path):
    model = tiny_models["gpt2"]
    cfg = config_for(model, corpus_file, tmp_path / "ref_b1")
    cfg.batch_size = 1
    record(cfg, log=lambda *_: None)
    out = tmp_path / "int"
    # Batches of one excerpt: slow enough that the signal lands part way.
    args = args_for(model, corpus_file, out, every=60)
    args[args.index("--batch-size") + 1] = "1"
    proc = start(args)
    deadline = time.monotonic() + 120
    while not (out / "tokens" / "c").exists() and time.monotonic() < deadline:  # first batch written
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal landed: nothing to test
        raise AssertionError("recording finished before Ctrl-C; make the test run longer")
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in stdout + err
    p = progress(out)
    assert p["checkpoint"] and not p["complete"] and 0 < p["excerpts_done"] < N_EXC
    proc = start(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_store(tmp_path / "ref_b1", out)


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("every", [60, 0], ids=["final-checkpoint", "background-checkpoint"])
def test_write_failure_keeps_store_and_resumes(tiny_models, corpus_file, tmp_path, every):
    model = tiny_models["neox"]
    record(config_for(model, corpus_file, tmp_path / "ref"), log=lambda *_: None)
    out = tmp_path / "full"
    # Files over 6 KiB cannot be written: the store is created, the first checkpoint fails.
    proc = start(args_for(model, corpus_file, out, every=every), preexec_fn=_limit_file_size(6 * 1024))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("neuronatlas")]
    assert len(lines) == 1 and "cannot write a checkpoint" in lines[0], err
    assert "Traceback" not in err
    s = open_store(out)  # still a valid store, just without a checkpoint
    assert s.progress["checkpoint"] is None
    assert not [d for d in (out / "checkpoints").iterdir() if d.is_dir()], "no half-written checkpoint left"
    proc = start(args_for(model, corpus_file, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_store(tmp_path / "ref", out)


def assert_whole(s, rec) -> None:
    """A neuron record that belongs to the checkpoint its Store reads."""
    e = s.excerpts_done
    tops = [max(r.activations) for r in rec.most_positive_activation_records]
    assert tops == sorted(tops, reverse=True) and len(tops) == min(4, e)
    assert all(0 <= r.excerpt_id < e for r in rec.most_positive_activation_records + rec.random_sample)
    # Every excerpt is counted once the prefix has set the histogram's range.
    assert sum(rec.histogram) == (e if e >= s.spec["quantile_prefix"] else 0)


def test_reading_while_recording(tiny_models, corpus_file, tmp_path):
    """Readers of a store that a recording checkpoints after every batch: fresh ones polling, and
    one opened at the first checkpoint and held while that checkpoint is replaced and deleted.
    Every read succeeds and is whole."""
    out = tmp_path / "live"
    args = args_for(tiny_models["gpt2"], corpus_file, out, every=0)
    for option, value in (("--quantile-prefix", "8"), ("--max-excerpts", "56"), ("--batch-size", "8")):
        args[args.index(option) + 1] = value  # 7 checkpoints
    proc = start(args)
    try:
        wait_for_checkpoint(proc, out, at_least=1)
        held = open_store(out)
        first = held.progress["checkpoint"]
        assert_whole(held, held.neuron(1, 3))
        seen, reads = 0, 0
        while proc.poll() is None or reads < 3:
            s = open_store(out)
            assert s.excerpts_done >= seen  # never back to an older checkpoint
            seen = s.excerpts_done
            assert_whole(s, s.neuron(1, reads % 72))
            assert s.layer_summary(0)["max"].shape == (72,)
            reads += 1
            time.sleep(0.05)  # leave the recording some CPU
        assert proc.wait(timeout=120) == 0, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    final = open_store(out)
    assert final.complete and final.excerpts_done == 56
    assert [d.name for d in (out / "checkpoints").iterdir() if d.is_dir()] == [final.progress["checkpoint"].split("/")[1]]
    # The held Store's checkpoint is gone (unless the run ended with it): it reads the last one.
    assert first == final.progress["checkpoint"] or not (out / first).exists()
    assert_whole(held, held.neuron(1, 3))
    assert held.progress == final.progress


def test_a_store_held_across_checkpoints(tiny_models, corpus_file, tmp_path):
    """An open Store whose checkpoint a recording replaces (kept for one more checkpoint, then
    deleted) reads the newest one; only a committed checkpoint that is missing is damage."""
    import shutil

    from engine import UserError
    from engine import store as st

    out = tmp_path / "s"
    cfg = config_for(tiny_models["gpt2"], corpus_file, out)
    cfg.max_excerpts = 24
    record(cfg, log=lambda *_: None)
    held = open_store(out)
    first, gen = held.progress["checkpoint"], held.progress["generation"]
    before = held.neuron(1, 3)
    layers, random_ids = st.read_checkpoint(out, first, negatives=False)
    for arrays, _, _ in layers:
        arrays["amax"] = arrays["amax"] + 1  # the next checkpoints hold other values
    # Two periodic checkpoints, as a running recording writes them.
    st.write_checkpoint(out, gen + 1, layers, random_ids, 24, False, 2, False, keep_previous=True)
    assert (out / first).is_dir(), "the checkpoint before the newest one stays for readers"
    assert held.neuron(1, 3) == before
    st.write_checkpoint(out, gen + 2, layers, random_ids, 24, False, 2, False, keep_previous=True)
    assert not (out / first).exists()
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if d.is_dir()) == [f"g{gen + 1:06d}", f"g{gen + 2:06d}"]
    rec = held.neuron(1, 3)
    assert held.progress["checkpoint"] == f"checkpoints/g{gen + 2:06d}"
    assert rec.max == before.max + 1 and rec.most_positive_activation_records == before.most_positive_activation_records
    assert held.layer_summary(1)["max"][3] == rec.max
    # A committed checkpoint deleted by hand is damage, not a newer checkpoint.
    shutil.rmtree(out / held.progress["checkpoint"])
    with pytest.raises(UserError, match="is damaged or incomplete"):
        held.neuron(1, 4)
    with pytest.raises(UserError, match="is damaged or incomplete"):
        open_store(out).layer_summary(0)
