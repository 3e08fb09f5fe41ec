"""`neuronatlas bench` runs end to end on a tiny model (numbers are not checked: no speed in tests)."""

from __future__ import annotations

import json

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
