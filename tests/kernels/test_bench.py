"""`neuronatlas bench` runs end to end on a tiny model (numbers are not checked: no speed in tests)."""

from __future__ import annotations

import json

import pytest

from engine.cli import main

from tests.kernels.kdevice import DEVICE

TINY = ["--batch-sizes", "3", "--excerpt-len", "8", "--steps", "1", "--warmup", "0", "--quantile-prefix", "3",
        "--top-k", "2", "--device", DEVICE, "--dtype", "float32"]


def test_bench_writes_table_and_json(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # A gated model with random weights from its config: negatives on, both backends, both modes.
    rc = main(["bench", "--model", str(tiny_models["llama"]), "--random-weights", "--backends", "torch,triton",
               "--out", str(out)] + TINY)
    assert rc == 0
    text = capsys.readouterr().out
    assert "record triton tok/s" in text and "copy GB/s" in text
    result = json.loads(out.read_text())
    assert {r["mode"] for r in result["rows"]} == {"eager", "compiled"}
    for r in result["rows"]:
        assert r["forward_tok_s"] > 0 and r["record_torch_tok_s"] > 0 and r["record_triton_tok_s"] > 0
    (u,) = result["updates"]
    assert u["triton_ms"] > 0 and u["copy_GBps"] > 0 and u["activation_bytes_per_batch"] == 3 * 8 * 48 * 3 * 4
    assert result["env"]["torch"] and result["model"]["n_layers"] == 3


def test_bench_bad_input(tiny_models, capsys):
    assert main(["bench", "--model", "shape:gpt5"] + TINY) == 2
    assert "unknown shape 'gpt5'" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_models["gpt2"]), "--backends", "cuda-magic"] + TINY) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'cuda-magic'" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--model", str(tiny_models["gpt2"]), "--modes", "jit"] + TINY) == 2
    assert "unknown mode 'jit'" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_models["gpt2"]), "--compile-backend", "nope"] + TINY) == 2
    err = capsys.readouterr().err
    assert "--compile-backend 'nope' is not a torch.compile backend" in err and len(err.strip().splitlines()) == 1


def test_bench_one_line_errors_found_by_probing(tiny_models, tmp_path, capsys):
    """Failures that came as tracebacks or an out-of-memory kill: a damaged GGUF read for its
    config, a torch.compile backend that is listed but cannot run here, a batch size far beyond
    memory. Also: bench's own backend names in its messages."""
    import importlib.util
    import struct

    gguf = tmp_path / "cut.gguf"  # a GGUF header promising 100 metadata entries, then nothing
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 100) + b"\x05\x00")
    gpt2 = str(tiny_models["gpt2"])
    cases = [
        (["--model", str(gguf), "--random-weights"], "cannot load the config of"),
        (["--model", gpt2, "--modes", "eager", "--batch-sizes", "100000000"], "lower --batch-sizes"),
        (["--model", gpt2, "--backends", "auto"], "use torch, triton, triton-fused, triton-side"),
    ]
    if importlib.util.find_spec("torch_xla") is None:
        cases.append((["--model", gpt2, "--modes", "compiled", "--compile-backend", "openxla"],
                      "torch.compile with backend 'openxla' failed: ImportError"))
    for extra, fragment in cases:
        assert main(["bench"] + TINY + extra) == 2, extra
        captured = capsys.readouterr()
        lines = [l for l in captured.err.splitlines() if l.startswith("neuronatlas")]
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in captured.err, (extra, captured.err)
        assert "tok/s" not in captured.out, extra


def test_bench_measures_each_size_mode_and_backend_once(tiny_models, tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_models["gpt2"]), "--modes", "eager,eager", "--backends", "torch,torch",
            "--out", str(out)] + TINY + ["--batch-sizes", "3,3"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["config"]["backends"] == ["torch"] and result["config"]["modes"] == ["eager"]
    assert [(r["batch"], r["mode"]) for r in result["rows"]] == [(3, "eager")] and len(result["updates"]) == 1
    assert capsys.readouterr().out.count("record torch tok/s") == 1


def test_bench_refuses_what_record_refuses_before_measuring(tiny_models, tmp_path, capsys):
    """Values record refuses, an empty mode list and an --out that cannot be written: one line, exit
    2, nothing measured (no table) and nothing written."""
    base = ["bench", "--model", str(tiny_models["gpt2"]), "--modes", "eager"] + TINY
    cases = [
        (["--excerpt-len", "0"], "--excerpt-len must be at least 1"),
        (["--excerpt-len", "129"], "--excerpt-len 129 is longer than the model's context of 128 positions"),
        (["--quantile-prefix", "-1"], "--quantile-prefix must be at least 1"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--modes", ""], "--modes must name eager and/or compiled"),
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "missing" / "b.json")], "is not a directory"),
        (["--out", ""], "--out needs a file name"),                        # wrote nothing, exit 0 before
        (["--batch-sizes", "2,,3"], "expected comma-separated integers"),  # read as 2,3 before
    ]
    for extra, fragment in cases:
        try:
            rc = main(base + extra)
        except SystemExit as exc:  # argparse's own refusal of a flag's value
            rc = exc.code
        assert rc == 2, extra
        captured = capsys.readouterr()
        lines = [l for l in captured.err.splitlines() if l.startswith("neuronatlas")]
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in captured.err, (extra, captured.err)
        assert "forward tok/s" not in captured.out, extra
    assert list(tmp_path.iterdir()) == []


def test_bench_side_stream_row(tiny_models, tmp_path, capsys):
    """triton-side (record --side-stream) is an eager row on CUDA; elsewhere one line refuses it."""
    args = ["bench", "--model", str(tiny_models["gpt2"]), "--random-weights", "--backends", "triton,triton-side"]
    if DEVICE != "cuda":
        assert main(args + TINY) == 2
        err = capsys.readouterr().err
        assert "backend triton-side needs a CUDA device" in err and len(err.strip().splitlines()) == 1
        return
    out = tmp_path / "bench.json"
    assert main(args + ["--out", str(out)] + TINY) == 0
    assert "record triton-side tok/s" in capsys.readouterr().out
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["record_triton-side_tok_s"] > 0 and rows["compiled"]["record_triton-side_tok_s"] is None


def test_kernel_sweep_runs_through_the_interpreter(tmp_path):
    """benchmarks/kernel_sweep.py keeps working without a GPU: a launch shape, a TUNING variant and
    an ablation, each a row of its JSON (the ablated one times the plain update only)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if DEVICE != "cpu":
        pytest.skip("the interpreter run of the sweep; on a GPU benchmarks/gpu_session.sh runs the real one")
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "benchmarks/kernel_sweep.py", "--shapes", "tiny", "--configs", "64:4:4",
                        "--variants", "finish_warps=2", "--ablate", "31", "--reps", "1", "--layers", "1", "--excerpt-len", "8",
                        "--out", str(out)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["block_n"], row["tuning"]["finish_warps"], row["ablate"]) for row in rows] == [(64, 4, 0), (512, 2, 0), (512, 4, 31)]
    assert all(row["update_ms"] > 0 for row in rows)
    assert [("fused_ms" in row) for row in rows] == [True, True, False]
    bad = subprocess.run([sys.executable, "benchmarks/kernel_sweep.py", "--ablate", "64"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected bitmasks 1..31" in bad.stderr


def test_launch_overhead_runs_anywhere(tmp_path):
    """benchmarks/launch_overhead.py (host time per update call, kernels stubbed) keeps working."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "overhead.json"
    r = subprocess.run([sys.executable, "benchmarks/launch_overhead.py", "--neurons", "40", "--batch", "3",
                        "--excerpt-len", "4", "--reps", "5", "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["update_layer_us"] > 0 and result["custom_op_us"] > 0 and result["custom_op_ordinary_state_us"] > 0
    assert "host time per layer call" in r.stdout


_COMPILE_EVENTS: list = []  # the test's compile backend stays registered for the process


def test_compilation_is_never_timed(tiny_models, monkeypatch, capsys):
    """Every graph is compiled before a timed loop starts, also with --warmup 0 and a prefix of
    one batch (whose batch runs outside the graph): compile time once entered the recording's
    figure and made its ratio 0.001."""
    import time

    from torch._dynamo import list_backends, register_backend

    from engine import bench

    events = _COMPILE_EVENTS
    events.clear()
    if "neuronatlas_counting" not in list_backends(exclude_tags=()):
        @register_backend
        def neuronatlas_counting(gm, example_inputs):  # compiles nothing: notes when it is asked to
            _COMPILE_EVENTS.append(("compile", time.perf_counter()))
            return gm.forward

    real_timed = bench._timed

    def timed(device, fn, n):
        events.append(("start", time.perf_counter()))
        try:
            return real_timed(device, fn, n)
        finally:
            events.append(("end", time.perf_counter()))

    monkeypatch.setattr(bench, "_timed", timed)
    args = ["bench", "--model", str(tiny_models["gpt2"]), "--modes", "compiled", "--backends", "torch",
            "--compile-backend", "neuronatlas_counting"] + TINY
    assert main(args) == 0, capsys.readouterr().err
    kinds = [k for k, _ in events]
    assert "compile" in kinds and kinds.count("start") >= 2
    inside = False
    for kind, _ in events:
        inside = {"start": True, "end": False}.get(kind, inside)
        assert not (kind == "compile" and inside), kinds


def test_bench_random_weights_of_an_uncached_hub_id_offline_fails_at_once(capsys, unreachable_hub):
    """As record does: one line, without the hub client's retries (11 lines and 25 s before)."""
    import time

    start = time.monotonic()
    assert main(["bench", "--model", "nobody/no-such-model", "--random-weights"] + TINY) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 20 and len(err.strip().splitlines()) == 1, err
    assert "unknown model 'nobody/no-such-model'" in err and "cannot be reached" in err


def test_bench_names_small_parameter_counts():
    from engine.bench import _count

    assert [_count(n) for n in (38_728, 124_439_808, 1_557_611_200, 999)] == ["38.7k", "124M", "1.56B", "999"]
