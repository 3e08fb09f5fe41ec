"""What the atlas tests share: a corpus full of markup, control characters and quotes, published
records written by hand, and a headless Chromium to look at the HTML atlas with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.tiny import corpus_texts

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "atlas"

HOSTILE = [
    '<script>document.body.setAttribute("data-pwned","script")</script>',
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "Tom & Jerry say \"hi\" & 'bye' </div></span><b>bold</b> &amp; &lt;i&gt;",
]
ESCAPE = "\x1b[31mRED\x1b[0m"
"""A terminal escape sequence in the corpus: `show` must print it as text, not send it."""

# Recording settings: every excerpt lands in the random sample (random_k > excerpts), so each
# neuron's page shows every excerpt, hostile ones included.
T, EXCERPTS, RANDOM_K, TOP_K, HIST_BINS = 24, 40, 48, 8, 12


def hostile_docs() -> list[str]:
    docs = []
    for i, text in enumerate(corpus_texts(24, seed=5)):
        docs.append(text)
        docs.append(f"{HOSTILE[i % 3]} {ESCAPE} {text[:40]}")
    return docs


def find_chromium() -> str | None:
    env = os.environ.get("NEURONATLAS_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """Debian's chromium, headless, one fresh profile per page, no network."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--virtual-time-budget=8000"]

    def __init__(self, binary: str):
        self.binary = binary

    def _run(self, args: list[str]) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            return subprocess.run([self.binary, *self.FLAGS, f"--user-data-dir={profile}", *args],
                                  capture_output=True, text=True, timeout=90)

    def dom(self, url: str) -> str:
        """The page's DOM after its scripts ran."""
        res = self._run(["--dump-dom", url])
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        return res.stdout

    def screenshot(self, url: str, path: Path, size: str = "1280,1500") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        res = self._run([f"--screenshot={path}", f"--window-size={size}", url])
        assert res.returncode == 0 and path.is_file(), res.stderr[-2000:]
        return path


# ---------------------------------------------------------------------------------------------
# Published records, written by hand in the shape of OpenAI's collated-activations.


def ar(tokens, acts):
    return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": acts}


SCRIPT_TOKEN = "<script>alert(1)</script>"
IMG_TOKEN = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
SHARED = ar([" the", " cat", " sat", "."], [0.0, 1.5, 0.25, -0.125])


def neuron_record(layer, index, top, random, quantiles, bounds, moments):
    mean, var, skew, kurt = moments
    return {"dataclass_name": "NeuronRecord",
            "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index},
            "random_sample": random, "random_sample_by_quantile": quantiles, "quantile_boundaries": bounds,
            "mean": mean, "variance": var, "skewness": skew, "kurtosis": kurt,
            "most_positive_activation_records": top}


def published_records() -> dict[tuple[int, int], dict]:
    """Three neurons in layers 0 and 2 (layer 1 and neurons 2/0..2 absent), excerpts of 3 and 4
    tokens, values that are not float32 numbers, hostile whole tokens, an excerpt shared by two
    neurons."""
    return {
        (0, 0): neuron_record(
            0, 0,
            top=[ar([SCRIPT_TOKEN, " cat", " &amp;", '"q"'], [0.5, 2.25, 0.1, -0.3]), SHARED,
                 ar([IMG_TOKEN, " cat", "\n"], [0.2, 1.1, 0.0])],
            random=[ar([" a", " b", " c", " d"], [0.0, 0.01, -0.02, 0.3]), ar([" dog", " &"], [0.0, 0.7])],
            quantiles=[[ar([" x", " y", " z"], [0.1, 0.2, 0.3])], [ar([" p", " q"], [1.0, 1.2]), SHARED]],
            bounds=[0.9], moments=[0.3, 0.7, 1.1, 4.2]),
        (0, 1): neuron_record(
            0, 1, top=[ar([" sat", " on", " mat"], [3.0, 0.5, 0.1])], random=[SHARED], quantiles=[[], [SHARED]],
            bounds=[0.4], moments=[0.1, 0.2, -0.3, 0.4]),
        (2, 3): neuron_record(
            2, 3, top=[ar([" cat", " cat", " cat", " cat"], [4.5, 4.0, 3.5, 3.25])],
            random=[ar([" one", " two", " three", " four"], [0.0, 0.0, 0.0, 0.0])], quantiles=[[], []],
            bounds=[1.0], moments=[0.05, 0.01, 2.5, 11.0]),
    }


PUBLISHED_EXPLANATIONS = {
    (0, 0): [("cat, and markup like <b>bold</b> & co", 0.61), ("html tags", 0.2)],
    (2, 3): [("the word cat", 0.35)],
}


def explanations_line(layer, index, items):
    return json.dumps({
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index},
        "scored_explanations": [
            {"dataclass_name": "ScoredExplanation", "explanation": text,
             "scored_simulation": {"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": [],
                                   "ev_correlation_score": score, "rsquared_score": None,
                                   "absolute_dev_explained_score": None}}
            for text, score in items]}) + "\n"


def write_published(root: Path) -> Path:
    for (layer, index), rec in published_records().items():
        p = root / "collated-activations" / str(layer) / f"{index}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec, indent=1), encoding="utf-8")
    for (layer, index), items in PUBLISHED_EXPLANATIONS.items():
        p = root / "explanations" / str(layer) / f"{index}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(explanations_line(layer, index, items), encoding="utf-8")
    return root
