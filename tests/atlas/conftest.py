"""Fixtures of the atlas tests: a tiny recorded store over a hostile corpus, a store imported
from hand-written published records, and a headless Chromium."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.atlas.helpers import (ARTIFACTS, EXCERPTS, HIST_BINS, RANDOM_K, TOP_K, T, Browser, find_chromium,
                                 hostile_docs, write_published)
from tests.tiny import corpus_texts, make_model


@pytest.fixture(scope="session")
def hostile_store(tmp_path_factory):
    """A gpt2-like tiny model recorded over a corpus that mixes words with hostile markup."""
    from engine.recorder import RecordConfig, record

    base = tmp_path_factory.mktemp("atlas")
    docs = hostile_docs()
    model = make_model("gpt2", base / "model", texts=corpus_texts() + docs * 20)
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = base / "store"
    summary = record(RecordConfig(model=str(model), corpus=str(corpus), out=str(out), excerpt_len=T,
                                  top_k=TOP_K, random_k=RANDOM_K, quantile_k=2, quantile_prefix=8,
                                  hist_bins=HIST_BINS, batch_size=16, max_excerpts=EXCERPTS, negatives=True,
                                  progress=False), log=lambda *a: None)
    assert summary.complete and summary.excerpts == EXCERPTS
    return out


@pytest.fixture(scope="session")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium: run tests/atlas/ci-setup.sh (apt-get install chromium) or set NEURONATLAS_CHROMIUM")
    try:
        subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"chromium at {binary} does not start: {exc}")
    return Browser(binary)


@pytest.fixture(scope="session")
def artifacts():
    """Where screenshots are kept (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def published_dir(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="session")
def imported_store(published_dir, tmp_path_factory):
    from engine.atlas.export import import_openai

    out = tmp_path_factory.mktemp("imported") / "store"
    import_openai(published_dir, out, progress=False)
    return out
