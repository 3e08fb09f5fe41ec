"""Fixtures of the explain / simulate / score tests: a tiny recorded store, a loopback test server
playing explainer and simulator (client.fake_llm), and a way to run the CLI in process."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

from tests.tiny import corpus_texts, make_model

# Recording settings: 12-token excerpts, 8 top excerpts per neuron (2 per split), 8 random.
T, TOP_K, RANDOM_K, EXCERPTS = 12, 8, 8, 160


@pytest.fixture(scope="session")
def recorded_store(tmp_path_factory):
    """A gpt2-like tiny model (random weights) recorded over a small corpus made in code."""
    from engine.recorder import RecordConfig, record

    base = tmp_path_factory.mktemp("explain")
    model = make_model("gpt2", base / "model")
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_texts(120, seed=7)), encoding="utf-8")
    out = base / "store"
    summary = record(RecordConfig(model=str(model), corpus=str(corpus), out=str(out), excerpt_len=T, top_k=TOP_K,
                                  random_k=RANDOM_K, quantile_k=2, quantile_prefix=16, hist_bins=8, batch_size=32,
                                  max_excerpts=EXCERPTS, progress=False), log=lambda *a: None)
    assert summary.complete
    return out


@pytest.fixture
def store(recorded_store, tmp_path):
    """A fresh copy of the recorded store that a test may write results into."""
    dst = tmp_path / "store"
    shutil.copytree(recorded_store, dst)
    return dst


@pytest.fixture
def fake_server():
    """fake_server(**FakeLLM options) -> a context manager giving (ServerThread, FakeLLM)."""
    from client.fake_llm import FakeLLM
    from client.testserver import ServerConfig, ServerThread

    @contextmanager
    def start(config: ServerConfig | None = None, **options):
        fake = FakeLLM(**options)
        with ServerThread(config or ServerConfig(), fake) as server:
            yield server, fake

    return start


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `neuronatlas ARGV` run in this process."""
    from engine.cli import main

    def run(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
