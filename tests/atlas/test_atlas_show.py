"""`neuronatlas show`: truecolor in a real pseudo-terminal, 256 colours, a plain fallback, and
corpus text that cannot reach the terminal as control sequences."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys

import pytest

from engine.atlas.show import clean_token, color_mode, render
from engine.cli import main
from engine.store import open_store
from tests.atlas.helpers import ROOT

SGR = re.compile(r"\x1b\[[0-9;]*m")


def run_in_pty(args: list[str], env: dict) -> str:
    """Run the CLI with stdout on a pseudo-terminal (so isatty() is true) and return its output."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 60)
        if not r:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read().decode()
    return b"".join(chunks).decode("utf-8")


def test_truecolor_in_a_terminal(hostile_store):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLORTERM="truecolor", TERM="xterm-256color", PYTHONPATH=str(ROOT))
    out = run_in_pty(["show", str(hostile_store), "1", "3", "--top", "3", "--random", "2", "--width", "120"], env)
    rec = open_store(hostile_store).neuron(1, 3)
    assert "\x1b[48;2;" in out  # 24-bit background shading
    assert f"max {rec.max:.4g}" in out and f"layer 1 · neuron 3" in SGR.sub("", out)
    top = rec.most_positive_activation_records[0]
    # The top excerpt's strongest token, shaded darkest (the end of the green ramp).
    k = max(range(len(top.activations)), key=top.activations.__getitem__)
    assert f"\x1b[48;2;22;140;52m\x1b[97m{clean_token(top.tokens[k], False)}\x1b[0m" in out.replace("\r\n", "\n")


def test_plain_fallback_and_256(hostile_store, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("COLORTERM", "truecolor")
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["show", str(hostile_store), "0", "5", "--top", "4", "--width", "100"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    rec = open_store(hostile_store).neuron(0, 5)
    top = rec.most_positive_activation_records[0]
    k = max(range(len(top.activations)), key=top.activations.__getitem__)
    assert f"[{clean_token(top.tokens[k], True)}:{top.activations[k]:.2f}]" in out
    assert "Top activating excerpts (4 of 8)" in out and "no explanation yet" in out
    # Not a terminal: plain, whatever COLORTERM says.
    monkeypatch.delenv("NO_COLOR")
    assert main(["show", str(hostile_store), "0", "5"]) == 0
    assert "\x1b" not in capsys.readouterr().out
    assert main(["show", str(hostile_store), "0", "5", "--color", "256"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[48;5;" in out and "\x1b[48;2;" not in out


def test_color_mode_conventions():
    class Tty:
        def isatty(self):
            return True

    tty = Tty()
    assert color_mode("auto", tty, {"COLORTERM": "truecolor"}) == "truecolor"
    assert color_mode("auto", tty, {"COLORTERM": "24bit", "TERM": "xterm"}) == "truecolor"
    assert color_mode("auto", tty, {"TERM": "xterm-256color"}) == "256"
    assert color_mode("auto", tty, {"TERM": "dumb"}) == "none"
    assert color_mode("auto", tty, {"COLORTERM": "truecolor", "NO_COLOR": "1"}) == "none"
    assert color_mode("auto", sys.stdin if not sys.stdin.isatty() else None, {"COLORTERM": "truecolor"}) == "none"
    assert color_mode("auto", None, {"FORCE_COLOR": "1", "COLORTERM": "truecolor"}) == "truecolor"
    assert color_mode("256", None, {}) == "256"


def test_corpus_cannot_drive_the_terminal(hostile_store):
    """The corpus holds ESC [ 31 m: it is printed as the text \\x1b, never as an escape."""
    s = open_store(hostile_store)
    for mode in ("truecolor", "256", "none"):
        out = render(s, 0, 11, mode, 120, top=100, random=100, per_quantile=100, negative=100)
        assert "\x1b" not in SGR.sub("", out)  # only our own colour sequences
        assert "\\x1b[31mRED\\x1b[0m" in SGR.sub("", out)


def test_bad_neuron(hostile_store, capsys):
    assert main(["show", str(hostile_store), "1", "999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neuron 999 out of range: layer 1 has neurons 0..71" in err
    assert main(["show", str(hostile_store), "7", "0"]) == 2
    assert "layer 7 out of range" in capsys.readouterr().err
    for width in ("0", "-5"):
        assert main(["show", str(hostile_store), "1", "3", "--width", width]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--width {width}: give at least 20 columns" in err


def test_negative_numbers_are_named_as_the_neuron_they_select(hostile_store, capsys):
    assert main(["show", str(hostile_store), "-1", "-72", "--color", "none"]) == 0
    out = capsys.readouterr().out
    assert main(["show", str(hostile_store), "1", "0", "--color", "none"]) == 0
    assert out.startswith("layer 1 · neuron 0") and out == capsys.readouterr().out


def test_huge_values_are_printed_in_exponent_form(tmp_path, capsys):
    import json

    from tests.atlas.helpers import published_records

    rec = json.loads(json.dumps(published_records()[(0, 1)]))
    rec["most_positive_activation_records"][0]["activations"][0] = 1e308
    src = tmp_path / "src" / "collated-activations" / "0" / "1.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps(rec))
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "s"), "0", "1", "--color", "none"]) == 0
    out = capsys.readouterr().out
    assert "[ sat:1.000e+308]" in out and "0000000000" not in out


def test_a_layer_without_neurons(imported_store, capsys):
    """Layer 1 is missing from the imported records: it has no neurons (not 'neurons 0..-1')."""
    assert main(["show", str(imported_store), "1", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neuron 0 out of range: layer 1 has no neurons" in err and "0..-1" not in err


def test_imported_store_shows_explanations(imported_store, capsys):
    assert main(["show", str(imported_store), "0", "0", "--color", "none"]) == 0
    out = capsys.readouterr().out
    assert "explanation: cat, and markup like <b>bold</b> & co (score 0.610, imported)" in out
    assert "<script>alert(1)</script>[ cat:2.25] &amp;" in out and "min —" in out


@pytest.mark.parametrize("tok,plain,want", [("a\nb", True, "a\\nb"), ("a\nb", False, "a↵b"),
                                            ("\x1b[2J", False, "\\x1b[2J"), ("\u202eevil", True, "\\u202eevil")])
def test_clean_token(tok, plain, want):
    assert clean_token(tok, plain) == want


def test_most_negative_excerpts_are_headed_by_their_minimum():
    """They are ranked by their minimum: the column shows it, not each excerpt's maximum."""
    from engine.atlas.show import _section
    from engine.store import ActivationRecord

    recs = [ActivationRecord(tokens=["a", "b"], activations=[-3.0625, 0.5], excerpt_id=1),
            ActivationRecord(tokens=["c", "d"], activations=[0.75, -1.5], excerpt_id=2)]
    lines = _section("Most negative excerpts", recs, 10, 1.0, 3.0, "none", 80, lowest=True)
    assert [line.split()[0] for line in lines[1:3]] == ["-3.062", "-1.5"]
    lines = _section("Top", recs, 10, 1.0, 3.0, "none", 80)
    assert [line.split()[0] for line in lines[1:3]] == ["0.5", "0.75"]


def test_top_ranks_the_explanations_imported_with_a_recording(imported_store, capsys):
    """It said "no explanations: run explain" while show, view and export showed them."""
    import json

    assert main(["top", str(imported_store), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["layer"], r["neuron"], r["score"], r["explanation"]) for r in rows] == [
        (0, 0, 0.61, "cat, and markup like <b>bold</b> & co"), (2, 3, 0.35, "the word cat")]
    assert main(["top", str(imported_store), "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "the word cat" in out and "markup" not in out
    assert main(["top", str(imported_store), "--by", "rsquared"]) == 2
    assert "carry only a score" in capsys.readouterr().err
