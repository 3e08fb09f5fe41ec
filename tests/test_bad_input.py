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
    assert tree_digest(out) == before
    # The same command again finds the run complete and changes nothing.
    rc, _ = run(capsys, "--model", tiny_models["gpt2"], "--corpus", corpus_file, "--out", out,
                "--max-excerpts", 40, "--top-k", 3)
    assert rc == 0 and tree_digest(out) == before


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
    assert s.token_ids[29].shape == (12,) and np.asarray(s.token_ids).shape == (30, 12)


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
