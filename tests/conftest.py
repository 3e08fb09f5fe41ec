import os
import sys
from pathlib import Path

import pytest

# Nothing may reach a model hub: loading code stays real, data is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny import corpus_texts, make_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A random-weight model directory per architecture, built once per session."""
    base = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, base / arch) for arch in ("gpt2", "llama", "neox")}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(corpus_texts(120)), encoding="utf-8")
    return path


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub client online but its endpoint a loopback port nothing listens on: an uncached hub
    id must fail at once, in one line, without the hub client's retries."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
