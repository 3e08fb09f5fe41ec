"""Export to OpenAI's published layout and import from it: shape, round trip, hand-written
records, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.atlas import data
from engine.atlas.export import export_openai, import_openai, moments_for
from engine.cli import main
from engine.store import open_store
from tests.atlas.helpers import (PUBLISHED_EXPLANATIONS, SHARED, explanations_line, published_records,
                                 write_published)

RECORD_KEYS = ["dataclass_name", "neuron_id", "random_sample", "random_sample_by_quantile", "quantile_boundaries",
               "mean", "variance", "skewness", "kurtosis", "most_positive_activation_records"]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_same_records(a, b):
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.activations for r in a] == [r.activations for r in b]  # exact


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parts[len(root.parts)] in ("collated-activations", "explanations")}


@pytest.fixture(scope="module")
def exported(hostile_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "openai"
    export_openai(open_store(hostile_store), out, progress=False)
    return out


def test_export_layout_and_shape(hostile_store, exported):
    s = open_store(hostile_store)
    paths = sorted(exported.glob("collated-activations/*/*.json"))
    assert len(paths) == sum(s.n_neurons)
    assert not (exported / "explanations").exists()  # the store has no explanations yet
    for layer, index in [(0, 0), (1, 7), (s.n_layers - 1, s.n_neurons[-1] - 1)]:
        obj = json.loads((exported / "collated-activations" / str(layer) / f"{index}.json").read_text())
        assert list(obj) == RECORD_KEYS
        assert obj["dataclass_name"] == "NeuronRecord"
        assert obj["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index}
        rec = s.neuron(layer, index)
        for key, records in [("most_positive_activation_records", rec.most_positive_activation_records),
                             ("random_sample", rec.random_sample)]:
            assert [list(r) for r in obj[key]] == [["dataclass_name", "tokens", "activations"]] * len(records)
            assert [r["tokens"] for r in obj[key]] == [r.tokens for r in records]
            assert [r["activations"] for r in obj[key]] == [r.activations for r in records]
        assert [[r["tokens"] for r in b] for b in obj["random_sample_by_quantile"]] == [
            [r.tokens for r in b] for b in rec.random_sample_by_quantile]
        assert obj["quantile_boundaries"] == rec.quantile_boundaries
        for k in ("mean", "variance", "skewness", "kurtosis"):
            assert same(obj[k], getattr(rec, k))


def test_round_trip(hostile_store, exported, tmp_path):
    """import(export(store)) reads back the original records; export of that equals the export."""
    store2 = tmp_path / "imported"
    import_openai(exported, store2, progress=False)
    a, b = open_store(hostile_store), open_store(store2)
    assert b.n_neurons == a.n_neurons and b.run["imported"]["source"] == str(exported.resolve())
    assert b.run["model"]["weights"] is None
    # Every neuron's record through the reader for a sample of neurons; the byte-equal second
    # export below covers every neuron.
    for layer in range(a.n_layers):
        for index in range(layer, a.n_neurons[layer], 5):
            ra, rb = a.neuron(layer, index), b.neuron(layer, index)
            assert_same_records(ra.most_positive_activation_records, rb.most_positive_activation_records)
            assert_same_records(ra.random_sample, rb.random_sample)
            assert len(ra.random_sample_by_quantile) == len(rb.random_sample_by_quantile)
            for qa, qb in zip(ra.random_sample_by_quantile, rb.random_sample_by_quantile):
                assert_same_records(qa, qb)
            assert ra.quantile_boundaries == rb.quantile_boundaries
            for k in ("mean", "variance", "skewness", "kurtosis"):
                assert same(getattr(ra, k), getattr(rb, k)), (layer, index, k)
            assert rb.max == ra.max  # the top excerpts hold the maximum
            assert math.isnan(rb.min)  # unknown from a published record
            assert rb.most_negative_activation_records is None
    # Excerpts shared between neurons are stored once (by token strings: the corpus repeats one).
    assert len(b.token_ids) == len({tuple(a.tokens(i)) for i in range(a.excerpts_done)})
    again = tmp_path / "again"
    export_openai(b, again, progress=False)
    assert files(again) == files(exported)


def test_import_handwritten(published_dir, imported_store, tmp_path):
    s = open_store(imported_store)
    assert s.n_layers == 3 and s.n_neurons == [2, 0, 4]
    want = published_records()
    for (layer, index), obj in want.items():
        rec = s.neuron(layer, index)
        for key, got in [("most_positive_activation_records", rec.most_positive_activation_records),
                         ("random_sample", rec.random_sample)]:
            # Excerpts of 3 tokens are padded to 4 with "" and activation 0 (run attrs say so).
            assert [r.tokens[: len(w["tokens"])] for r, w in zip(got, obj[key])] == [w["tokens"] for w in obj[key]]
            assert [r.activations[: len(w["tokens"])] for r, w in zip(got, obj[key])] == [w["activations"] for w in obj[key]]
            assert len(got) == len(obj[key])
        assert [[r.activations[: len(w["activations"])] for r, w in zip(b, wb)]
                for b, wb in zip(rec.random_sample_by_quantile, obj["random_sample_by_quantile"])] == [
            [w["activations"] for w in wb] for wb in obj["random_sample_by_quantile"]]
        assert (rec.mean, rec.variance, rec.skewness, rec.kurtosis) == (obj["mean"], obj["variance"], obj["skewness"], obj["kurtosis"])
        assert rec.quantile_boundaries == obj["quantile_boundaries"]
        assert rec.max == max(max(r["activations"]) for r in obj["most_positive_activation_records"])
        expl = data.explanations(s, layer, index)
        assert [(e.text, e.score) for e in expl] == PUBLISHED_EXPLANATIONS.get((layer, index), [])
    assert s.run["imported"]["padded"] is True and s.run["dtype"] == "float64"
    # One excerpt id for the excerpt that three records share.
    ids = {r.excerpt_id for r in s.neuron(0, 0).most_positive_activation_records if r.tokens == SHARED["tokens"]}
    ids |= {r.excerpt_id for r in s.neuron(0, 1).random_sample}
    assert len(ids) == 1
    # Gaps: neurons without a file have no excerpts and are not exported.
    assert data.is_absent(s.neuron(2, 0))
    out = tmp_path / "out"
    export_openai(s, out, progress=False)
    got = {p.relative_to(out / "collated-activations").as_posix(): json.loads(p.read_text())
           for p in out.glob("collated-activations/*/*.json")}
    assert got == {f"{layer}/{index}.json": obj for (layer, index), obj in want.items()}
    for (layer, index) in PUBLISHED_EXPLANATIONS:
        assert (out / "explanations" / str(layer) / f"{index}.jsonl").read_bytes() == (
            published_dir / "explanations" / str(layer) / f"{index}.jsonl").read_bytes()


def test_moments_are_consistent():
    """The moments written for published statistics give them back through moment_stats
    (to an ulp; the reader returns the published values themselves from `stats`)."""
    from kernels.reference import moment_stats

    rng = np.random.default_rng()
    for _ in range(200):
        want = [rng.normal(), rng.uniform(1e-4, 1e3), rng.normal() * 3, rng.uniform(-2, 60)]
        got = moment_stats(2**20, moments_for(*want)[None])
        assert [float(got[k][0]) for k in ("mean", "variance", "skewness", "kurtosis")] == pytest.approx(want, rel=1e-13)


def bad_layouts(tmp: Path):
    cases = {}
    cases["missing"] = (tmp / "nope", "is not a directory")
    (tmp / "empty").mkdir(parents=True)
    cases["no layout"] = (tmp / "empty", "holds no collated-activations")

    def one(name, text, message, extra=None):
        d = tmp / name
        for rel, content in {"collated-activations/0/1.json": text, **(extra or {})}.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        cases[name] = (d, message)

    rec = published_records()[(0, 1)]
    one("invalid json", "{not json", "is not valid JSON")
    one("nested too deeply", "[" * 100_000 + "]" * 100_000, "is JSON nested too deeply to read")
    one("explanations nested too deeply", json.dumps(rec), "explanations/0/1.jsonl: not a NeuronSimulationResults "
        "JSON line", {"explanations/0/1.jsonl": "[" * 100_000 + "]" * 100_000 + "\n"})
    one("wrong neuron", json.dumps({**rec, "neuron_id": {"layer_index": 0, "neuron_index": 5}}), "path says layer 0 neuron 1")
    short = json.loads(json.dumps(rec))
    short["most_positive_activation_records"][0]["activations"].pop()
    one("length mismatch", json.dumps(short), "has 3 tokens but 2 activations")
    one("not a record", json.dumps({**rec, "dataclass_name": "Explanation"}), "not a NeuronRecord")
    one("bad number", json.dumps({**rec, "mean": "high"}), "'mean' is not a number")
    one("no top records", json.dumps({k: v for k, v in rec.items() if k != "most_positive_activation_records"}),
        "has no most_positive_activation_records")

    def with_activation(value):
        r = json.loads(json.dumps(rec))
        r["random_sample"][0]["activations"][1] = value
        return json.dumps(r)  # NaN and Infinity as Python's json writes them (bare tokens)

    one("nan activation", with_activation(math.nan), "random_sample[0] has an activation that is not a finite number (NaN)")
    one("infinite activation", with_activation(-math.inf), "not a finite number (-Infinity)")
    one("null activation", with_activation(None), "random_sample[0] has an activation that is not a number (null)")
    one("huge activation", with_activation(1e308).replace("1e+308", "1e999"), "not a finite number (Infinity)")
    good = json.dumps(rec)
    one("record name not a number", good, "0b.json: not a NeuronRecord file named NEURON.json",
        {"collated-activations/0/0b.json": good})
    one("layer name not a number", good, "collated-activations/x: not a layer directory",
        {"collated-activations/x/0.json": good})
    one("one neuron twice", good, "1.json: 01.json is neuron 1 too", {"collated-activations/0/01.json": good})
    surrogate = json.loads(json.dumps(rec))
    surrogate["random_sample"][0]["tokens"][0] = "\ud800b"
    one("token with a lone surrogate", json.dumps(surrogate), "random_sample[0] has a token with an unpaired surrogate")
    # Neuron numbers index dense arrays: a stray number is refused at once, not allocated (149 GiB).
    one("neuron beyond any width", good, "1000000000.json: neuron 1,000,000,000 is beyond any model's MLP width",
        {"collated-activations/0/1000000000.json": good})
    one("layer beyond any depth", good, "collated-activations/99999: layer 99,999 is beyond any model's depth",
        {"collated-activations/99999/1.json": good})
    expl = json.loads(explanations_line(0, 1, [("cats", 0.5)]))
    expl["scored_explanations"][0]["explanation"] = 42
    one("explanation not a string", good, "explanations/0/1.jsonl: line 1: scored_explanations[0].explanation is 42, "
        "not a string", {"explanations/0/1.jsonl": json.dumps(expl) + "\n"})
    one("explanation name not a number", good, "explanations/0/one.jsonl: not a NeuronSimulationResults file",
        {"explanations/0/one.jsonl": explanations_line(0, 1, [("cats", 0.5)])})
    return cases


def test_import_bad_input(tmp_path, capsys):
    for name, (src, message) in bad_layouts(tmp_path / "in").items():
        out = tmp_path / "out" / name.replace(" ", "-")
        rc = main(["import", str(src), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists(), name  # no damaged store
        assert not [p for p in (tmp_path / "out").glob(".*")], name  # no temporary leftovers


def test_import_ignores_hidden_files(published_dir, tmp_path, capsys):
    """Hidden files (a desktop's .DS_Store) are not records: ignored, not refused."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(published_dir, src)
    for rel in ("collated-activations/.DS_Store", "collated-activations/0/.DS_Store", "explanations/2/._3.jsonl"):
        (src / rel).write_text("junk")
    assert main(["import", str(src), "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    assert "Imported 3 neurons in 2 layers (2 with explanations)" in capsys.readouterr().out


def test_import_refuses_existing_store(imported_store, published_dir, tmp_path, capsys):
    before = sorted(p.name for p in imported_store.iterdir())
    assert main(["import", str(published_dir), "--out", str(imported_store), "--no-progress"]) == 2
    assert "already a neuronatlas store" in capsys.readouterr().err
    assert sorted(p.name for p in imported_store.iterdir()) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(imported_store), "--out", str(busy), "--no-progress"]) == 2
    assert "not a neuronatlas export" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_cli_round_trip(published_dir, tmp_path, capsys):
    """The commands themselves, and a second export over the first."""
    store, out = tmp_path / "store", tmp_path / "out"
    assert main(["import", str(published_dir / "collated-activations"), "--out", str(store), "--no-progress",
                 "--quantile-probs", "0.5"]) == 0
    assert open_store(store).spec["quantile_probs"] == [0.5]
    assert main(["export", str(store), "--format", "openai", "--out", str(out), "--no-progress"]) == 0
    assert main(["export", str(store), "--out", str(out), "--layers", "2", "--no-progress"]) == 0
    assert [p.relative_to(out).as_posix() for p in sorted(out.glob("collated-activations/*/*.json"))] == [
        "collated-activations/2/3.json"]
    assert "Exported 1 neurons" in capsys.readouterr().out
    assert main(["import", str(published_dir), "--out", str(tmp_path / "s2"), "--quantile-probs", "0.5,0.9"]) == 2
    assert "--quantile-probs gives 2 quantiles" in capsys.readouterr().err


def test_write_published_matches_docs(tmp_path):
    """The hand-written layout is the one the importer finds from DIR or DIR/collated-activations."""
    root = write_published(tmp_path / "p")
    from engine.atlas.export import find_layout

    assert find_layout(root) == (root / "collated-activations", root / "explanations")
    assert find_layout(root / "collated-activations")[0] == root / "collated-activations"


def test_parallel_export_equals_serial(hostile_store, exported, tmp_path, monkeypatch):
    """Worker processes (each opening the store itself) write the same files."""
    monkeypatch.setattr(data, "PARALLEL_MIN", 0)
    out = tmp_path / "parallel"
    export_openai(open_store(hostile_store), out, jobs=2, progress=False)
    assert files(out) == files(exported)


def test_store_explanations_are_shown_and_exported(imported_store, tmp_path, monkeypatch, capsys):
    """Explanations from the explain/score commands (Store.explanations' dicts) join the imported
    ones: best first in show and view, appended as ScoredExplanations on export."""
    from engine.atlas import view
    from engine.store import Store

    own = {(2, 3): [{"explanation": "cats <again>", "score": 0.9, "explainer_model": "gpt-x", "status": "done"},
                    {"explanation": None, "score": None, "status": "error"}]}
    monkeypatch.setattr(Store, "explanations", lambda self, layer, index: own.get((layer, index), []))
    s = open_store(imported_store)
    assert [(e.text, e.score, e.source) for e in data.explanations(s, 2, 3)] == [
        ("cats <again>", 0.9, "explained by gpt-x"), ("the word cat", 0.35, "imported")]
    assert main(["show", str(imported_store), "2", "3", "--color", "none"]) == 0
    assert "explanation: cats <again> (score 0.900, explained by gpt-x)" in capsys.readouterr().out
    payload, _ = view.neuron_payload(s, 2, 3, {"top": 1, "random": 1, "per_quantile": 1, "negative": 1})
    assert [e["text"] for e in payload["explanations"]] == ["cats <again>", "the word cat"]
    out = tmp_path / "out"
    export_openai(s, out, progress=False)
    line = json.loads((out / "explanations" / "2" / "3.jsonl").read_text())
    assert [(e["explanation"], e["scored_simulation"]["ev_correlation_score"]) for e in line["scored_explanations"]] == [
        ("the word cat", 0.35), ("cats <again>", 0.9)]
    assert line["dataclass_name"] == "NeuronSimulationResults"


def test_show_and_view_say_undefined_failed_and_never_fires(imported_store, monkeypatch, capsys):
    """A scored explanation whose score is undefined says so (not 'not scored'); a neuron whose
    explain or simulate stage failed shows the error, one that never fires says that."""
    from engine.atlas import view
    from engine.store import Store

    own = {(2, 3): [{"explanation": "the token tree", "score": None, "status": "scored", "explainer_model": "e",
                     "undefined": {"score": "the simulation is constant"}},
                    {"explanation": "not yet", "score": None, "status": "simulated", "explainer_model": "e2"},
                    {"explanation": None, "score": None, "status": "failed", "explainer_model": "e3",
                     "error": {"stage": "explain", "message": "the explainer's reply is empty"}},
                    {"explanation": "x", "score": None, "status": "failed", "explainer_model": "e", "simulator_model": "s",
                     "error": {"stage": "simulate", "message": "values do not line up"}}],
           (2, 2): [{"explanation": None, "score": None, "status": "never_fires", "explainer_model": "e"}]}
    monkeypatch.setattr(Store, "explanations", lambda self, layer, index: own.get((layer, index), []))
    assert main(["show", str(imported_store), "2", "3", "--color", "none"]) == 0
    out = capsys.readouterr().out
    assert "explanation: the token tree (score undefined (the simulation is constant), explained by e)" in out
    assert "explanation: not yet (not scored, explained by e2)" in out
    assert "explain failed (explainer e3): the explainer's reply is empty" in out
    assert "simulate failed (simulator s): values do not line up" in out and "no explanation yet" not in out
    assert main(["show", str(imported_store), "2", "2", "--color", "none"]) == 0
    out = capsys.readouterr().out
    assert "not explained (explainer e): it never fires above 0" in out and "no explanation yet" not in out
    payload, _ = view.neuron_payload(open_store(imported_store), 2, 3, {"top": 1, "random": 1, "per_quantile": 1,
                                                                       "negative": 1})
    (tree,) = [e for e in payload["explanations"] if e["text"] == "the token tree"]
    assert tree["undefined"] == "the simulation is constant" and tree["score"] is None


def test_import_checks_explanation_files_against_records(published_dir, tmp_path, capsys):
    """An explanation file whose neuron_id disagrees with its path is refused; one for a neuron
    without a record is left out and said so, never counted as imported."""
    import shutil

    expl = sorted((published_dir / "explanations").glob("*/*.jsonl"))
    layer, index = int(expl[0].parent.name), int(expl[0].stem)
    swapped = tmp_path / "swapped"
    shutil.copytree(published_dir, swapped)
    line = json.loads(expl[0].read_text().splitlines()[0])
    line["neuron_id"] = {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index + 1000}
    (swapped / "explanations" / str(layer) / f"{index}.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["import", str(swapped), "--out", str(tmp_path / "s1"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"neuron {index + 1000}, but its path says layer {layer} neuron {index}" in err and err.count("\n") == 1
    assert not (tmp_path / "s1").exists()

    orphan = tmp_path / "orphan"
    shutil.copytree(published_dir, orphan)
    (orphan / "collated-activations" / str(layer) / f"{index}.json").unlink()
    assert main(["import", str(orphan), "--out", str(tmp_path / "s2"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 explanation files of neurons without a record left out" in out
    n_with = len(expl) - 1
    assert f"({n_with:,} with explanations;" in out


def test_import_refuses_a_layer_larger_than_memory(published_dir, tmp_path, capsys, monkeypatch):
    """Dense arrays up to the largest neuron number: where they would not fit the machine, one line
    naming the layer, before anything is written (here the machine is made to have 1 KiB free)."""
    from engine.atlas import export

    monkeypatch.setattr(export, "_memory_budget", lambda: 1024)
    out = tmp_path / "store"
    assert main(["import", str(published_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "layer 0: its neuron numbers go up to 1, so the store would hold 2 neurons of which 2 have a record" in err
    assert err.count("\n") == 1 and not out.exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("value", [1e17, 1e300, -1e300, 1.7976931348623157e308])
def test_import_takes_any_finite_magnitude(tmp_path, capsys, value):
    """Finite numbers are accepted, however large: a constant 1e17 neuron (which export writes)
    made the histogram's range zero wide and the import crash."""
    rec = json.loads(json.dumps(published_records()[(0, 1)]))
    for group in (rec["most_positive_activation_records"], rec["random_sample"]):
        for r in group:
            r["activations"] = [value] * len(r["tokens"])
    src = tmp_path / "src" / "collated-activations" / "0" / "1.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps(rec))
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "store"), "--no-progress"]) == 0, \
        capsys.readouterr().err
    got = open_store(tmp_path / "store").neuron(0, 1)
    assert got.most_positive_activation_records[0].activations[:3] == [value] * 3  # then padding
    assert sum(open_store(tmp_path / "store").neuron(0, 1).histogram) == len(rec["random_sample"])


def test_a_checkpoint_committed_while_reading_is_named(imported_store, capsys):
    """view and export of a store being recorded warn when the recording moved on meanwhile."""
    store = open_store(imported_store)
    store.progress = dict(store.progress, complete=False)  # as if a recording were writing it
    with data.one_snapshot(store, "view"):
        pass
    assert capsys.readouterr().err == ""  # the same checkpoint before and after
    store.progress = dict(store.progress, checkpoint="checkpoints/g000000")  # opened at an older one
    with data.one_snapshot(store, "view"):
        pass
    err = capsys.readouterr().err
    assert err.startswith("view: warning:") and "neurons come from different checkpoints" in err


def _edited(tmp_path, layer, index, edit) -> Path:
    """The hand-written published set with one record changed by `edit(record)` (or its raw text
    replaced when `edit` returns a string)."""
    from tests.atlas.helpers import write_published

    src = write_published(tmp_path / "src")
    path = src / "collated-activations" / str(layer) / f"{index}.json"
    rec = json.loads(path.read_text())
    got = edit(rec)
    path.write_text(got if isinstance(got, str) else json.dumps(rec))
    return src


def _set(rec, path, value):
    *head, last = path
    for key in head:
        rec = rec[key]
    rec[last] = value


@pytest.mark.parametrize("edit, needle", [
    # Each came out as a traceback, was taken silently, or changed the other neurons' records.
    (lambda r: json.dumps(r).replace("2.25", "1" + "0" * 5000), "a number too long to read"),
    (lambda r: _set(r, ["neuron_id", "neuron_index"], "0"), "neuron_id.neuron_index that is not an integer (\"0\")"),
    (lambda r: _set(r, ["neuron_id", "neuron_index"], False), "neuron_id.neuron_index that is not an integer (false)"),
    (lambda r: _set(r, ["neuron_id", "layer_index"], 0.0), "neuron_id.layer_index that is not an integer (0.0)"),
    (lambda r: r["most_positive_activation_records"].reverse(), "not in decreasing order of their maximum"),
    (lambda r: _set(r, ["quantile_boundaries"], [0.9, 1.0, 2.0]), "has 1 quantile boundaries where others have 3"),
    (lambda r: r["random_sample_by_quantile"].append([]), "has 2 quantile buckets where others have 3"),
])
def test_import_refuses_records_it_cannot_keep_as_they_are(tmp_path, capsys, edit, needle):
    src = _edited(tmp_path, 0, 0, edit)
    assert main(["import", str(src), "--out", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".*"))


def test_import_refuses_values_beyond_the_asked_dtype(tmp_path, capsys):
    def edit(rec):
        rec["most_positive_activation_records"][0]["activations"][1] = 1e308
    src = _edited(tmp_path, 0, 0, edit)
    assert main(["import", str(src), "--out", str(tmp_path / "f32"), "--no-progress", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "an activation (1e+308) is beyond the range of float32; import with --dtype float64" in err, err
    assert main(["import", str(src), "--out", str(tmp_path / "auto"), "--no-progress"]) == 0   # float64
    assert open_store(tmp_path / "auto").neuron(0, 0).max == 1e308


def test_import_removes_what_a_killed_import_left(tmp_path, capsys):
    import subprocess
    import sys

    from tests.atlas.helpers import write_published

    src = write_published(tmp_path / "src")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone
    left = [tmp_path / f".import-work-{dead.pid}-abc", tmp_path / f".store.importing-{dead.pid}-def"]
    alive = tmp_path / f".import-work-{1}-xyz"  # pid 1 is alive: not ours to remove
    for d in left + [alive]:
        d.mkdir()
        (d / "layer0.npz").write_bytes(b"x" * 1000)
    assert main(["import", str(src), "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    assert not any(d.exists() for d in left) and alive.exists()
    assert sorted(p.name for p in tmp_path.glob(".*")) == [alive.name]


def test_a_damaged_imported_explanations_group_is_one_line(imported_store, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(imported_store, bad)
    shutil.rmtree(bad / data.IMPORTED_EXPLANATIONS / "bytes")
    for argv in (["show", str(bad), "0", "0"], ["export", str(bad), "--out", str(tmp_path / "e"), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged or incomplete" in err and "Traceback" not in err, err
