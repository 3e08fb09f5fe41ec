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
