"""Bad input gets one clear line, a non-zero exit, and no damaged store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from tests.tiny import make_tokenizer, corpus_texts


def run(capsys, *args):
    rc = main(["record", "--no-progress", "--excerpt-len", "12", "--batch-size", "8", *map(str, args)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("neuronatlas")]
    return rc, lines


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def expect_error(capsys, fragment, *args):
    rc, lines = run(capsys, *args)
    assert rc == 2
    assert len(lines) == 1, lines
    assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_model(capsys, tmp_path, corpus_file):
    expect_error(capsys, "unknown model 'nobody/no-such-model'", "--model", "nobody/no-such-model",
                 "--corpus", corpus_file, "--out", tmp_path / "s")
    expect_error(capsys, "does not exist", "--model", tmp_path / "missing", "--corpus", corpus_file,
                 "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists(), "nothing is created for a run that cannot start"


def test_a_hub_id_without_a_network_fails_at_once(capsys, tmp_path, corpus_file, unreachable_hub):
    """Not cached and the hub unreachable: one line, without huggingface_hub's minute of retries."""
    import time

    start = time.monotonic()
    line = expect_error(capsys, "unknown model 'nobody/no-such-model': no such local path, not in the Hugging Face "
                        "cache, and the hub (127.0.0.1) cannot be reached", "--model", "nobody/no-such-model",
                        "--corpus", corpus_file, "--out", tmp_path / "s")
    assert time.monotonic() - start < 20, line
    assert not (tmp_path / "s").exists()


def test_unsupported_architecture(capsys, tmp_path, corpus_file):
    from transformers import AutoModelForCausalLM, MambaConfig, MixtralConfig

    tok = make_tokenizer(corpus_texts(20))
    # A state-space model: no MLP neurons at all.
    model = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=16, num_hidden_layers=1,
                                                         vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    line = expect_error(capsys, "unsupported architecture 'mamba'", "--model", tmp_path / "mamba",
                        "--corpus", corpus_file, "--out", tmp_path / "s")
    assert "gpt2" in line and "llama" in line and "gpt_neox" in line  # lists what is supported
    assert not (tmp_path / "s").exists()

    # A mixture of experts: refused with its own reason.
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    expect_error(capsys, "'mixtral': it is a mixture-of-experts model", "--model", tmp_path / "moe",
                 "--corpus", corpus_file, "--out", tmp_path / "s")


def test_a_model_that_loads_but_cannot_run(capsys, tmp_path, corpus_file):
    """StableLM's config defaults to 32 key/value heads: with 2 attention heads the model loads and
    its first forward pass fails. One line, before any store exists."""
    from transformers import AutoModelForCausalLM, StableLmConfig

    tok = make_tokenizer(corpus_texts(20))
    model = AutoModelForCausalLM.from_config(StableLmConfig(
        hidden_size=32, intermediate_size=52, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    line = expect_error(capsys, "loads but its forward pass fails: RuntimeError", "--model", tmp_path / "broken",
                        "--corpus", corpus_file, "--out", tmp_path / "s")
    assert str(tmp_path / "broken") in line
    assert not (tmp_path / "s").exists()


def test_empty_and_short_corpora(capsys, tmp_path, tiny_models):
    (tmp_path / "empty.txt").write_text("")
    expect_error(capsys, "is empty", "--model", tiny_models["gpt2"], "--corpus", tmp_path / "empty.txt",
                 "--out", tmp_path / "s")
    (tmp_path / "short.txt").write_text("the cat")
    expect_error(capsys, "shorter than one excerpt", "--model", tiny_models["gpt2"],
                 "--corpus", tmp_path / "short.txt", "--out", tmp_path / "s")
    expect_error(capsys, "does not exist", "--model", tiny_models["gpt2"], "--corpus", tmp_path / "nope.txt",
                 "--out", tmp_path / "s")
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{oops\n')
    expect_error(capsys, "bad.jsonl:2", "--model", tiny_models["gpt2"], "--corpus", tmp_path / "bad.jsonl",
                 "--out", tmp_path / "s")
    (tmp_path / "field.jsonl").write_text('{"body": "a b c"}\n')
    expect_error(capsys, "no text field 'text'", "--model", tiny_models["gpt2"],
                 "--corpus", tmp_path / "field.jsonl", "--out", tmp_path / "s")


def test_store_of_another_run_is_refused_and_untouched(capsys, tmp_path, tiny_models, corpus_file):
    out = tmp_path / "s"
    rc, _ = run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", out,
                "--max-excerpts", 40, "--top-k", 3)
    assert rc == 0
    before = tree_digest(out)
    expect_error(capsys, "holds another run", "--model", tiny_models["gpt2"], "--corpus", corpus_file,
                 "--out", out, "--max-excerpts", 40, "--top-k", 4)
    expect_error(capsys, "holds another run", "--model", tiny_models["llama"], "--corpus", corpus_file,
                 "--out", out, "--max-excerpts", 40, "--top-k", 3)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(corpus_texts(80, seed=9)))
    expect_error(capsys, "holds another run", "--model", tiny_models["gpt2"], "--corpus", other,
                 "--out", out, "--max-excerpts", 40, "--top-k", 3)
    # Another dtype is named as such, not as the weights' fingerprint it also changes.
    line = expect_error(capsys, "(dtype: store has 'float32', asked 'bfloat16')", "--model", tiny_models["gpt2"],
                        "--corpus", corpus_file, "--out", out, "--max-excerpts", 40, "--top-k", 3, "--dtype", "bfloat16")
    assert "weights" not in line
    # Another excerpt length is named as such, not as the corpus token hash it also changes.
    line = expect_error(capsys, "(spec.excerpt_len: store has 12, asked 8", "--model", tiny_models["gpt2"],
                        "--corpus", corpus_file, "--out", out, "--max-excerpts", 40, "--top-k", 3,
                        "--excerpt-len", 8)
    assert "sha256" not in line
    assert tree_digest(out) == before
    # The same command again finds the run complete and changes nothing, and says so once (it also
    # said "Recorded 40 excerpts ... in 0.0 s, recording at 0 tokens/s").
    rc = main(["record", "--no-progress", "--excerpt-len", "12", "--batch-size", "8", "--model",
               str(tiny_models["gpt2"]), "--corpus", str(corpus_file), "--out", str(out), "--max-excerpts", "40",
               "--top-k", "3"])
    said = capsys.readouterr()
    assert rc == 0 and tree_digest(out) == before
    assert f"Nothing to do: {out} already holds the complete recording (40 excerpts" in said.out + said.err
    assert "Recorded" not in said.out + said.err and "tokens/s" not in said.out + said.err


def test_unusable_output_paths(capsys, tmp_path, tiny_models, corpus_file):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    expect_error(capsys, "not a neuronatlas store", "--model", tiny_models["gpt2"], "--corpus", corpus_file,
                 "--out", junk)
    assert (junk / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    expect_error(capsys, "is a file", "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", afile)
    expect_error(capsys, "cannot write to", "--model", tiny_models["gpt2"], "--corpus", corpus_file,
                 "--out", afile / "below")
    expect_error(capsys, "cannot", "--model", tiny_models["gpt2"], "--corpus", corpus_file,
                 "--out", "/proc/neuronatlas-store")


def test_bad_options(capsys, tmp_path, tiny_models, corpus_file):
    common = ("--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", tmp_path / "s")
    expect_error(capsys, "--batch-size", *common, "--batch-size", 0)
    expect_error(capsys, "unknown dtype", *common, "--dtype", "float8")
    expect_error(capsys, "unknown backend", *common, "--backend", "cuda-magic")
    expect_error(capsys, "no CUDA GPU", *common, "--device", "cuda")
    expect_error(capsys, "--checkpoint-every must be", *common, "--checkpoint-every", -5)
    expect_error(capsys, "--checkpoint-every must be", *common, "--checkpoint-every", "nan")
    assert not (tmp_path / "s").exists()


def test_memory_that_will_not_fit_is_refused(capsys, tmp_path, tiny_models, corpus_file):
    # 10^7 top excerpts per neuron cannot fit in this machine's memory: refused before the run.
    expect_error(capsys, "recording needs about", "--model", tiny_models["gpt2"], "--corpus", corpus_file,
                 "--out", tmp_path / "s", "--top-k", 10_000_000)
    assert not (tmp_path / "s").exists()


def test_info_and_reader_errors(capsys, tmp_path, tiny_models, corpus_file):
    out = tmp_path / "s"
    assert run(capsys, "--model", tiny_models["llama"], "--corpus", corpus_file, "--out", out,
               "--max-excerpts", 30)[0] == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "30 / 30 excerpts (100.0%), complete" in text and "llama" in text
    assert main(["info", str(out), "--json"]) == 0
    attrs = json.loads(capsys.readouterr().out)
    assert attrs["format"] == "neuronatlas" and attrs["run"]["spec"]["negatives"] is True
    assert main(["info", str(tmp_path)]) == 2
    assert "not a neuronatlas store" in capsys.readouterr().err

    from engine import UserError, open_store

    s = open_store(out)
    with pytest.raises(UserError, match="layer 9 out of range"):
        s.neuron(9, 0)
    with pytest.raises(UserError, match="neuron 48 out of range"):
        s.neuron(0, 48)
    with pytest.raises(IndexError):
        s.token_ids[30]
    with pytest.raises(UserError, match=r"excerpt 1000000 out of range: the store has excerpts 0\.\.29$"):
        s.tokens(10**6)
    assert s.tokens(-1) == s.tokens(29)
    assert s.token_ids[29].shape == (12,) and np.asarray(s.token_ids).shape == (30, 12)
    # Negative layers and neurons count from the last, as tokens(-1) does.
    last = s.neuron(-1, -1)
    top = s.n_layers - 1
    assert (last.neuron_id.layer_index, last.neuron_id.neuron_index) == (top, 47)
    assert last.mean == s.neuron(top, 47).mean and last.max == s.neuron(top, 47).max
    assert np.array_equal(s.layer_summary(-s.n_layers)["max"], s.layer_summary(0)["max"])
    with pytest.raises(UserError, match="neuron -49 out of range"):
        s.neuron(0, -49)
    with pytest.raises(UserError, match=f"layer {-s.n_layers - 1} out of range"):
        s.layer_summary(-s.n_layers - 1)
    assert all(type(e) is float for e in last.histogram_edges)
    # A store pickles as its path (handed to worker processes) and reads the same on arrival.
    import pickle

    again = pickle.loads(pickle.dumps(s))
    assert again.path == s.path and again.neuron(0, 5) == s.neuron(0, 5)
    # Zarr data of another kind is "not a neuronatlas store", not a damaged one.
    import zarr

    zarr.open_array(str(tmp_path / "arr.zarr"), mode="w", shape=(3,), dtype="i4")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "zarr.json").write_text("[1, 2]")
    for other, why in (("arr.zarr", "it is a Zarr array"), ("list", "its zarr.json is not Zarr metadata")):
        with pytest.raises(UserError, match=f"is not a neuronatlas store \\({why}\\)$"):
            open_store(tmp_path / other)


@pytest.mark.parametrize("fault", ["bypassed", "wrong width"])
def test_model_variant_that_breaks_the_hook_point(fault, capsys, tmp_path, corpus_file, tiny_models, monkeypatch):
    """A variant whose forward pass skips the hooked module (as Bloom's tensor-parallel path skips
    dense_4h_to_h), or hands it another width than the config says, stops with one line instead
    of recording wrong statistics."""
    import torch

    import engine.recorder as rec

    real_load = rec.load_model

    def load(*a, **k):
        lm = real_load(*a, **k)
        if fault == "bypassed":
            lm.modules[1] = torch.nn.GELU()  # a module the forward pass never calls
        else:
            lm.n_neurons[1] += 3
        return lm

    monkeypatch.setattr(rec, "load_model", load)
    rc, lines = run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", tmp_path / "s",
                    "--max-excerpts", "16")
    assert rc == 2 and len(lines) == 1
    if fault == "bypassed":
        assert "reached 1 of 2 hooked 'mlp.act' modules" in lines[0] and "not supported" in lines[0]
    else:
        assert "layer 1: the hooked module 'mlp.act' gave a tensor of shape (8, 12, 72)" in lines[0]


def test_options_checked_before_the_store_exists(capsys, tmp_path, tiny_models, corpus_file):
    """Each is refused before anything is written, so the corrected command is not 'another run'."""
    out = tmp_path / "s"
    common = ("--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", out)
    expect_error(capsys, "--hist-bins must be at least 1", *common, "--hist-bins", 0)
    expect_error(capsys, "--seed must be an integer from 0", *common, "--seed", -1)
    expect_error(capsys, "--seed must be an integer from 0", *common, "--seed", 2**64)
    expect_error(capsys, "--quantile-prefix must be at least 1", *common, "--quantile-prefix", 0)
    expect_error(capsys, "--quantile-prefix must be at least 1", *common, "--quantile-prefix", -1)
    expect_error(capsys, "is not supported", *common, "--device", "meta")
    # The tiny GPT-2 has 128 learned positions: 200 tokens (or 128 and a BOS) cannot be fed to it.
    line = run(capsys, *common, "--excerpt-len", 200)[1][0]
    assert "longer than the model's context of 128 positions" in line
    assert not out.exists()
    rc, _ = run(capsys, *common, "--max-excerpts", 20)
    assert rc == 0


def test_unusable_corpora_and_tokenizers(capsys, tmp_path, tiny_models):
    common = ("--model", tiny_models["gpt2"], "--out", tmp_path / "s")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    expect_error(capsys, "latin1.jsonl:1: not UTF-8 text", *common, "--corpus", tmp_path / "latin1.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    expect_error(capsys, "not a readable Parquet file", *common, "--corpus", tmp_path / "fake.parquet")
    (tmp_path / "nested.jsonl").write_text('{"text": {"a": 1}}\n')
    expect_error(capsys, "nested.jsonl:1: field 'text' holds a JSON dict", *common, "--corpus", tmp_path / "nested.jsonl")
    # Numbers and booleans are not documents either (they read as "5", "True", "nan" before).
    for n, value in enumerate(["true", "5", "NaN"]):
        (tmp_path / f"v{n}.jsonl").write_text('{"text": "the cat sat on the mat"}\n{"text": %s}\n' % value)
        expect_error(capsys, f"v{n}.jsonl:2: field 'text' holds a JSON", *common, "--corpus", tmp_path / f"v{n}.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"text": "a\tb\u0001 \x01"}\n')
    expect_error(capsys, "bad.jsonl:2: not valid JSON (Invalid control character at column", *common,
                 "--corpus", tmp_path / "bad.jsonl")
    # An object cut short: the column is where the line ends, not "column 1" of the next line.
    (tmp_path / "cut.jsonl").write_text('{"text": "ok"\n')
    expect_error(capsys, "cut.jsonl:1: not valid JSON (Expecting ',' delimiter at column 14)", *common,
                 "--corpus", tmp_path / "cut.jsonl")
    # White space only is no text, as blank .jsonl lines are none.
    (tmp_path / "ws.txt").write_text("   \n\n\t  \n")
    expect_error(capsys, "is empty", *common, "--corpus", tmp_path / "ws.txt")
    assert not (tmp_path / "s").exists()
    # Null texts are missing documents (as Parquet's nulls), never the word "None".
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n' * 3)
    expect_error(capsys, "is empty", *common, "--corpus", tmp_path / "nulls.jsonl")
    # A model directory without tokenizer files: this transformers builds an empty tokenizer.
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_models["gpt2"], bare)
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    (tmp_path / "c.txt").write_text("the cat sat on the mat " * 50)
    expect_error(capsys, "cannot load the tokenizer", "--model", bare, "--corpus", tmp_path / "c.txt",
                 "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_damaged_stores_are_reported_in_one_line(capsys, tmp_path, tiny_models, corpus_file):
    import shutil

    out = tmp_path / "s"
    assert run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", out,
               "--max-excerpts", 20)[0] == 0
    from engine import UserError, open_store

    with pytest.raises(UserError, match="layer must be an integer"):
        open_store(out).neuron(0.0, 1)
    # One chunk file gone (a shard of top activations, the maxima, a block of token rows) would read
    # as the arrays' fill value (zeros, -1): every chunk is written, and a missing one is damage.
    for damage in ("layer", "tokens", "attrs", "top_acts chunk", "small chunk", "token chunk"):
        bad = tmp_path / f"bad-{damage}".replace(" ", "-")
        shutil.copytree(out, bad)
        layer = next(bad.glob("checkpoints/*/layers/001"))
        if damage == "layer":
            shutil.rmtree(layer)
        elif damage == "tokens":
            shutil.rmtree(bad / "tokens")
        elif damage == "top_acts chunk":
            (layer / "top_acts" / "c" / "0" / "0" / "0").unlink()
        elif damage == "small chunk":
            (layer / "amax" / "c" / "0").unlink()
        elif damage == "token chunk":
            (bad / "tokens" / "c" / "0" / "0").unlink()
        else:
            (bad / "zarr.json").write_text("{not json")
        assert main(["show", str(bad), "1", "0"]) == 2, damage
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is damaged or incomplete" in err[0], (damage, err)
    # info too, when the committed checkpoint itself is gone (it said "complete").
    bad = tmp_path / "bad-checkpoint"
    shutil.copytree(out, bad)
    shutil.rmtree(next(bad.glob("checkpoints/*/layers")).parent)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged or incomplete" in err[0] and "committed checkpoint" in err[0], err
    # Resuming from a checkpoint with a chunk gone is refused the same way, not continued from zeros;
    # so is a complete store whose token rows are gone (it was "complete, nothing to do").
    for name in ("bad-top_acts-chunk", "bad-token-chunk"):
        rc, lines = run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", tmp_path / name,
                        "--max-excerpts", 20)
        assert rc == 2 and "is damaged or incomplete" in lines[0], (name, lines)
    assert "the tokens of excerpts 0..19" in lines[0]


def test_a_different_model_at_the_same_path_is_another_run(capsys, tmp_path, tiny_models, corpus_file):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_models["gpt2"], model_dir)
    out = tmp_path / "s"
    args = ("--model", model_dir, "--corpus", corpus_file, "--out", out, "--max-excerpts", 40)
    assert run(capsys, *args)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3)
    model.save_pretrained(model_dir)  # new weights, same path, config and shapes
    expect_error(capsys, "model.weights", *args)


def test_the_same_model_by_another_spelling_of_its_path_resumes(capsys, tmp_path, tiny_models, corpus_file,
                                                                 monkeypatch):
    out = tmp_path / "s"
    monkeypatch.chdir(tiny_models["gpt2"].parent)
    name = tiny_models["gpt2"].name
    common = ("--corpus", corpus_file, "--out", out, "--top-k", 3)
    assert run(capsys, "--model", name, *common, "--max-excerpts", 40)[0] == 0
    # The same directory as ./NAME/ and as an absolute path: the same run (complete, nothing to do).
    assert run(capsys, "--model", f"./{name}/", *common, "--max-excerpts", 40)[0] == 0
    assert run(capsys, "--model", tiny_models["gpt2"].resolve(), *common, "--max-excerpts", 40)[0] == 0
    # From another working directory: the absolute path, and a relative one from there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run(capsys, "--model", tiny_models["gpt2"].resolve(), *common, "--max-excerpts", 40)[0] == 0
    assert run(capsys, "--model", Path("..") / ".." / tiny_models["gpt2"].parent.name / name, *common,
               "--max-excerpts", 40)[0] == 0
    # A store from before the resolved directory was kept (only the name as typed): the same.
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["run"]["model"]["local_dir"]
    (out / "zarr.json").write_text(json.dumps(meta))
    assert run(capsys, "--model", tiny_models["gpt2"].resolve(), *common, "--max-excerpts", 40)[0] == 0
    # Another local model is still another run.
    expect_error(capsys, "holds another run (model.name", "--model", tiny_models["llama"].resolve(), *common,
                 "--max-excerpts", 40)


def test_a_forward_pass_that_fails_mid_run_keeps_the_checkpoint(capsys, tmp_path, tiny_models, corpus_file,
                                                                monkeypatch):
    """A failure inside the model after the run started (a driver error, memory) is one line naming
    the batch; the store keeps its last checkpoint and the same command resumes."""
    import engine.recorder as rec

    real_load = rec.load_model
    calls = {"n": 0}

    def failing_load(*a, **k):
        lm = real_load(*a, **k)

        def fail(mod, args, out):
            calls["n"] += 1
            if calls["n"] == 4:  # the trial excerpt, then the third batch
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

        lm.modules[0].register_forward_hook(fail)
        return lm

    monkeypatch.setattr(rec, "load_model", failing_load)
    args = ("--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", tmp_path / "s", "--max-excerpts", 40,
            "--batch-size", 8, "--checkpoint-every", 0)
    line = expect_error(capsys, "the forward pass failed on the batch starting at excerpt 16: RuntimeError: CUDA "
                        "error: an illegal memory access was encountered; the store keeps its last checkpoint", *args)
    assert "more detail" not in line
    from engine.store import open_store

    assert open_store(tmp_path / "s").progress["excerpts_done"] == 16  # batches 0-7 and 8-15 kept
    monkeypatch.setattr(rec, "load_model", real_load)
    rc, _ = run(capsys, *args)
    assert rc == 0


def test_a_store_being_recorded_is_not_recorded_into_twice(capsys, tmp_path, tiny_models, corpus_file):
    """Two recorders on one store interleaved their token rows and removed each other's
    checkpoints. While another process holds the store, a second record is refused untouched."""
    import subprocess
    import sys

    out = tmp_path / "s"
    args = ("--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", out, "--max-excerpts", 40)
    assert run(capsys, *args, "--checkpoint-every", 0)[0] == 0
    before = tree_digest(out)
    assert not list(tmp_path.glob(".s.creating-*")), "the store was built beside --out and renamed into place"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom engine.store import writer_lock\n"
         f"with writer_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        expect_error(capsys, f"another neuronatlas run is recording into '{out}'", *args)
        assert tree_digest(out) == before
    finally:
        holder.communicate("")
    assert run(capsys, *args)[0] == 0 and tree_digest(out) == before  # released with its process


def test_a_store_whose_creation_was_cut_short(capsys, tmp_path, tiny_models, corpus_file):
    """A store killed while it was created in place (older versions) is named as such, not resumed
    into a traceback; what a killed creation leaves beside --out now is removed by the next run."""
    import zarr

    half = tmp_path / "half"
    zarr.open_group(str(half), mode="w", zarr_format=3).attrs.update({"format": "neuronatlas", "format_version": 1})
    expect_error(capsys, "is a store whose creation was cut short (it has no 'tokens'", "--model",
                 tiny_models["gpt2"], "--corpus", corpus_file, "--out", half)
    stale = tmp_path / ".s.creating-999999999-deadbeef"  # no such process
    (stale / "tokens").mkdir(parents=True)
    assert run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", tmp_path / "s",
               "--max-excerpts", 20)[0] == 0
    assert not stale.exists() and (tmp_path / "s" / "checkpoints").is_dir()


def test_paths_with_a_tilde_not_expanded_by_the_shell(capsys, tmp_path, tiny_models, corpus_file, monkeypatch):
    """`--model=~/m` reaches the program with its tilde (a shell expands only a word's start)."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_models["gpt2"], tmp_path / "m")
    shutil.copy(corpus_file, tmp_path / "c.txt")
    rc, lines = run(capsys, "--model=~/m", "--corpus=~/c.txt", "--out=~/s", "--max-excerpts", 16)
    assert rc == 0, lines
    assert (tmp_path / "s" / "checkpoints").is_dir() and not Path("~").exists()


def test_a_gguf_file_cut_short_is_named_as_such(capsys, tmp_path, corpus_file):
    """Its tokenizer is read first: the failure was reported as the tokenizer's ("cannot reshape")."""
    from engine.models import embedded_gguf

    cut = tmp_path / "cut.gguf"
    with open(embedded_gguf(), "rb") as f:
        cut.write_bytes(f.read(5 << 20))
    line = expect_error(capsys, f"cannot read the GGUF file of '{cut}' (cut short or damaged?)", "--model", cut,
                        "--corpus", corpus_file, "--out", tmp_path / "s")
    assert "tokenizer" not in line
    assert not (tmp_path / "s").exists()
