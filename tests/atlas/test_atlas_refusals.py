"""`show`, `view` and `export` refuse what `explain` and `score` refuse: explanation results copied
from another recording's store, and an empty `--layers` selection; one line, exit status 2, and
nothing already written is touched."""

from __future__ import annotations

import shutil

import pytest
import zarr

from engine.cli import main


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    for needle in needles:
        assert needle in err, err


def test_results_from_another_recording_are_refused(imported_store, tmp_path, capsys):
    from client.results import ResultsGroup

    store = tmp_path / "store"
    shutil.copytree(imported_store, store)
    group = ResultsGroup.for_models(store, "e", "s", "v1")
    group.create(durable=False)  # made from this recording: it carries this store's fingerprint
    group.write(0, 1, {"status": "scored", "explanation": "copied cats", "score": 0.9, "candidates": []},
                durable=False)
    atlas, export = tmp_path / "atlas", tmp_path / "export"
    # In its own store the result is shown, put in the atlas and exported.
    assert main(["show", str(store), "0", "1", "--color", "none"]) == 0
    assert "explanation: copied cats (score 0.900, explained by e)" in capsys.readouterr().out
    assert main(["view", str(store), "--out", str(atlas), "--no-progress"]) == 0
    assert main(["export", str(store), "--out", str(export), "--no-progress"]) == 0
    assert b"copied cats" in (export / "explanations" / "0" / "1.jsonl").read_bytes()
    before = {"atlas": _tree(atlas), "export": _tree(export)}

    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    run = dict(root.attrs["run"])
    run["identity"] = {"imported": "/elsewhere"}
    root.attrs["run"] = run  # the results now sit in a store of another recording
    capsys.readouterr()
    for argv in (["show", store, "0", "1"], ["view", store, "--out", atlas, "--no-progress"],
                 ["export", store, "--out", export, "--no-progress"]):
        assert main([str(a) for a in argv]) == 2, argv
        _one_error_line(capsys, f"neuronatlas {argv[0]}: error:", "results made from another recording",
                        str(group.path))
    assert {"atlas": _tree(atlas), "export": _tree(export)} == before  # neither replaced nor damaged
    for argv in (["view", store, "--out", tmp_path / "new-atlas"], ["export", store, "--out", tmp_path / "new-export"]):
        assert main([str(a) for a in argv] + ["--no-progress"]) == 2
        assert not argv[-1].exists()
    capsys.readouterr()


@pytest.mark.parametrize("layers, needle", [("", "--layers is empty"), ("0,", "--layers '0,' has an empty item"),
                                            ("0,,2", "--layers '0,,2' has an empty item"),
                                            (" ", "--layers is empty")])
@pytest.mark.parametrize("command", ["view", "export"])
def test_an_empty_layer_selection_is_refused(imported_store, tmp_path, capsys, command, layers, needle):
    out = tmp_path / "out"
    assert main([command, str(imported_store), "--out", str(out), "--layers", layers, "--no-progress"]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()
    assert main([command, str(imported_store), "--out", str(out), "--layers", "all", "--no-progress"]) == 0
