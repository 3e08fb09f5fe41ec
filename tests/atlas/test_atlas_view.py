"""The HTML atlas, looked at in a real headless Chromium: what the pages show after their scripts
ran, that hostile corpus text stays text, and screenshots kept under artifacts/atlas/."""

from __future__ import annotations

import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from engine.atlas import view
from engine.cli import main
from engine.store import open_store
from tests.atlas.helpers import EXCERPTS, HOSTILE, IMG_TOKEN, PUBLISHED_EXPLANATIONS, SCRIPT_TOKEN

ALL = {"top": 1000, "random": 1000, "per_quantile": 1000, "negative": 1000}


class Dom(HTMLParser):
    """The few things the tests read from a dumped DOM."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {}
        self.tokens: list[tuple[str, str]] = []  # (text, title) of .tok spans
        self.excerpts: list[str] = []
        self.excerpt_ids: list[int] = []  # from each excerpt row's title "excerpt N"
        self.rows: list[list[str]] = []
        self._cur = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = (a.get("class") or "").split()
        if "excerpt" in cls:
            self.excerpt_ids.append(int(a["title"].split()[-1]))
        if "toks" in cls:
            self.excerpts.append("")
        if tag == "tr" and self.stack and any(t == "tbody" for t, _ in self.stack):
            self.rows.append([])
        if tag == "td" and self.rows:
            self.rows[-1].append("")
        if "tok" in cls:
            self.tokens.append(["", a.get("title")])
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, text):
        classes = [c for _, a in self.stack for c in (a.get("class") or "").split()]
        ids = [a.get("id") for _, a in self.stack if a.get("id")]
        for i in ids:
            self.texts.setdefault(i, []).append(text)
        if "tok" in classes:
            self.tokens[-1][0] += text
        if "toks" in classes:
            self.excerpts[-1] += text
        if any(t == "td" for t, _ in self.stack) and self.rows and any(t == "tbody" for t, _ in self.stack):
            self.rows[-1][-1] += text

    def text(self, id_: str) -> str:
        return "".join(self.texts.get(id_, []))

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


def fmt(v: float) -> str:
    """What the pages show for a value (atlas.js fmt: 4 significant digits)."""
    import math

    if v is None or not math.isfinite(v):
        return "\u2014"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.2e}".replace("e-0", "e-").replace("e+0", "e+")
    r = float(f"{v:.4g}")
    return str(int(r)) if r == int(r) else repr(r)


def assert_no_injection(dom: Dom):
    """Nothing from the corpus became markup: only the atlas's own elements and scripts."""
    names = {t for t, _ in dom.tags}
    assert not names & {"img", "b", "i", "iframe", "object", "embed"}, names
    scripts = [a.get("src", "<inline>") for t, a in dom.tags if t == "script"]
    assert all(s == "atlas.js" or s.startswith("data/") for s in scripts), scripts
    assert not [k for _, a in dom.tags for k in a if k.startswith("on")]
    body = dom.find("body")[0]
    assert "data-pwned" not in body and body.get("data-ready") == "1"


@pytest.fixture(scope="module")
def atlas(hostile_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "site"
    view.build(open_store(hostile_store), out, limits=ALL, progress=False)
    return out


def url(path: Path, query: str = "") -> str:
    return path.resolve().as_uri() + query


def test_layout_scales_per_neuron(hostile_store, atlas):
    s = open_store(hostile_store)
    assert sorted(p.name for p in atlas.iterdir()) == sorted(
        ["index.html", "neuron.html", "atlas.js", "atlas.css", "data", view.MARKER])
    pages = list(atlas.glob("data/n/*/*.js"))
    assert len(pages) == sum(s.n_neurons)
    assert len(list(atlas.glob("data/layers/*.js"))) == s.n_layers
    # No file grows with the model: the largest is one neuron's or one layer's data.
    biggest = max(p.stat().st_size for p in atlas.rglob("*") if p.is_file())
    assert biggest < 200_000
    # Data files carry no raw markup characters at all.
    for p in pages[:20] + list(atlas.glob("data/layers/*.js")):
        text = p.read_text()
        assert "<" not in text and ">" not in text and "&" not in text.replace("&&", "")


def test_neuron_page(hostile_store, atlas, browser, artifacts):
    s = open_store(hostile_store)
    layer, index = 1, 3
    rec = s.neuron(layer, index)
    dom = Dom(browser.dom(url(atlas / "neuron.html", f"?l={layer}&n={index}")))
    assert_no_injection(dom)
    assert dom.text("neuron-title") == f"Layer {layer} \u00b7 neuron {index}"
    assert "No explanation yet." in dom.text("explanations")
    stats = dom.text("stats")
    assert f"max{fmt(rec.max)}" in stats and f"mean{fmt(rec.mean)}" in stats
    # Every excerpt, each token with its value on hover.
    shown = (rec.most_positive_activation_records + rec.random_sample
             + [r for b in rec.random_sample_by_quantile for r in b] + rec.most_negative_activation_records)
    assert len(dom.excerpts) == len(shown)
    first = rec.most_positive_activation_records[0]
    toks = dom.tokens[: len(first.tokens)]
    assert [t for _, t in toks] == [fmt(a) for a in first.activations]
    display = [t.replace("\n", "\u21b5").replace("\x1b", "\\u001b") for t in first.tokens]
    assert [t for t, _ in toks] == display
    # The histogram of excerpt maxima: a bar per bin (and for under/overflow when not empty).
    assert dom.find("svg", id="hist-svg")
    bars = [a for t, a in dom.tags if t == "rect" and "bar" in a.get("class", "")]
    H = len(rec.histogram) - 2
    assert len(bars) == H + (rec.histogram[0] > 0) + (rec.histogram[-1] > 0)
    assert any(t == "line" and a.get("class") == "qline" for t, a in dom.tags) or not rec.quantile_boundaries
    browser.screenshot(url(atlas / "neuron.html", f"?l={layer}&n={index}"), artifacts / "neuron.png")


def test_hostile_corpus_renders_as_text(atlas, browser):
    """Markup, quotes, ampersands and escape sequences in the corpus show up as the text they are."""
    dom = Dom(browser.dom(url(atlas / "neuron.html", "?l=0&n=11")))
    assert_no_injection(dom)
    # The random sample holds every excerpt: in excerpt order they are the whole corpus stream,
    # whose hostile strings may straddle excerpts.
    stream = "".join(dict(sorted(zip(dom.excerpt_ids, dom.excerpts))).values())
    assert len(set(dom.excerpt_ids)) == EXCERPTS
    for h in HOSTILE:
        assert h in stream, (h, stream[:2000])
    assert "\\u001b[31mRED\\u001b[0m" in stream


def test_index_sorts_and_pages(hostile_store, atlas, browser, artifacts):
    s = open_store(hostile_store)
    page = url(atlas / "index.html", "#layer=all&sort=max&dir=desc")
    dom = Dom(browser.dom(page))
    assert_no_injection(dom)
    total = sum(s.n_neurons)
    assert dom.text("count").startswith(f"{total} neurons")
    rows = [r for r in dom.rows if len(r) == 7]  # the neuron table's rows
    assert len(rows) == min(100, total)
    maxima = [float(r[2]) for r in rows]
    assert maxima == sorted(maxima, reverse=True)
    best = max(((float(s.layer_summary(lay)["max"][i]), lay, i) for lay in range(s.n_layers)
                for i in range(s.n_neurons[lay])), key=lambda x: x[0])
    assert (int(rows[0][0]), int(rows[0][1])) == (best[1], best[2])
    assert dom.text("page") == f"page 1 of {-(-total // 100)}"
    browser.screenshot(page, artifacts / "index.png", size="1280,1000")
    # Density ascending, one layer, second page.
    dom = Dom(browser.dom(url(atlas / "index.html", "#layer=1&sort=density&dir=asc&page=0")))
    rows = [r for r in dom.rows if len(r) == 7]
    dens = [float(r[3].rstrip("%")) for r in rows]
    assert dens == sorted(dens) and {r[0] for r in rows} == {"1"}


def test_imported_atlas_filters_by_explanation(imported_store, browser, artifacts, tmp_path):
    out = tmp_path / "site"
    view.build(open_store(imported_store), out, limits=ALL, progress=False)
    # Gaps in the published data have no page and no row.
    assert sorted(p.relative_to(out / "data" / "n").as_posix() for p in out.glob("data/n/*/*.js")) == [
        "0/0.js", "0/1.js", "2/3.js"]
    dom = Dom(browser.dom(url(out / "index.html", "#layer=all&sort=score&dir=desc")))
    rows = [r for r in dom.rows if len(r) == 7]
    assert [(r[0], r[1], r[5]) for r in rows] == [("0", "0", "0.61"), ("2", "3", "0.35"), ("0", "1", "\u2014")]
    dom = Dom(browser.dom(url(out / "index.html", "#layer=all&sort=score&dir=desc&q=CAT")))
    rows = [r for r in dom.rows if len(r) == 7]
    assert [(r[0], r[1]) for r in rows] == [("0", "0"), ("2", "3")]
    assert rows[0][6] == PUBLISHED_EXPLANATIONS[(0, 0)][0][0]  # markup in an explanation stays text
    assert_no_injection(dom)
    page = url(out / "neuron.html", "?l=0&n=0")
    dom = Dom(browser.dom(page))
    assert_no_injection(dom)
    assert [t for t, _ in dom.tokens[:4]] == [SCRIPT_TOKEN, " cat", " &amp;", '"q"']
    assert IMG_TOKEN in [t for t, _ in dom.tokens]
    assert PUBLISHED_EXPLANATIONS[(0, 0)][0][0] in dom.text("explanations")
    assert "score 0.61" in dom.text("explanations")
    browser.screenshot(page, artifacts / "imported-neuron.png", size="1280,1000")


def test_explanations_cannot_reorder_the_page(published_dir, browser, tmp_path):
    """An explanation is untrusted text: a right-to-left override or an escape sequence in it is
    shown as visible \\uXXXX (as in tokens), inside a <bdi>, so that the score beside it reads as
    written (it read "derocs" mirrored)."""
    import shutil

    from engine.atlas.export import import_openai
    from tests.atlas.helpers import explanations_line

    src = tmp_path / "pub"
    shutil.copytree(published_dir, src)
    hostile = "\u202eevil\u202c cats \u001b[31mred\n\u2067x"
    (src / "explanations" / "2" / "3.jsonl").write_text(explanations_line(2, 3, [(hostile, 0.35)]), encoding="utf-8")
    store = tmp_path / "s.zarr"
    import_openai(src, store, progress=False)
    out = tmp_path / "site"
    view.build(open_store(store), out, limits=ALL, progress=False)
    for page in (url(out / "neuron.html", "?l=2&n=3"), url(out / "index.html", "#layer=all&sort=score&dir=desc")):
        html = browser.dom(page)
        assert not any(c in html for c in "\u202e\u202c\u001b\u2067"), page
        dom = Dom(html)
        assert_no_injection(dom)
        shown = "\\u202eevil\\u202c cats \\u001b[31mred \\u2067x"
        assert shown in (dom.text("explanations") or "".join(r[6] for r in dom.rows if len(r) == 7)), page
        assert any(t == "bdi" for t, _ in dom.tags)


def test_view_command_and_serve(hostile_store, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["view", str(hostile_store), "--out", str(out), "--layers", "1", "--top", "2", "--random", "1",
                 "--per-quantile", "0", "--negative", "0", "--no-progress"]) == 0
    assert "Wrote an atlas of 72 neurons in 1 layers" in capsys.readouterr().out
    assert not (out / "data" / "n" / "0").exists() and (out / "data" / "n" / "1" / "71.js").is_file()
    # Again over the same directory: replaced, but a file of the user's in it stays.
    (out / "NOTES.txt").write_text("mine")
    assert main(["view", str(hostile_store), "--out", str(out), "--layers", "0", "--no-progress"]) == 0
    assert (out / "data" / "n" / "0" / "0.js").is_file() and not (out / "data" / "n" / "1").exists()
    assert (out / "NOTES.txt").read_text() == "mine"
    # Never over someone else's files.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["view", str(hostile_store), "--out", str(busy), "--no-progress"]) == 2
    assert "not a neuronatlas atlas" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    servers = []
    t = threading.Thread(target=lambda: view.serve(out, 0, servers.append), daemon=True)
    t.start()
    for _ in range(200):
        if servers:
            break
        threading.Event().wait(0.02)
    host, port = servers[0].server_address[:2]
    try:
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
            assert r.status == 200 and b"atlas.js" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/n/0/5.js", timeout=10) as r:
            assert r.read().startswith(b"NA.neuron(")
    finally:
        servers[0].shutdown()
        t.join(10)


def test_a_run_that_fails_halfway_leaves_the_previous_outputs_whole(hostile_store, tmp_path, capsys):
    """A store damaged in layer 1 (one chunk gone): view and export fail there, one line, exit 2;
    the atlas and the export made before from the good store are kept as they were, and nothing
    half-written is left beside them."""
    import shutil

    site, pub = tmp_path / "site", tmp_path / "pub"
    assert main(["view", str(hostile_store), "--out", str(site), "--no-progress"]) == 0
    assert main(["export", str(hostile_store), "--out", str(pub), "--no-progress"]) == 0
    capsys.readouterr()

    def snapshot(d):
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    before = snapshot(site), snapshot(pub)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(hostile_store, broken)
    chunks = sorted((broken / "checkpoints").glob("g*/layers/001/amax/c/*"))
    assert chunks
    chunks[0].unlink()
    for command, out in (("view", site), ("export", pub)):
        assert main([command, str(broken), "--out", str(out), "--no-progress", "--jobs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "damaged" in err[-1] and all("Traceback" not in line for line in err), err
        fresh = tmp_path / f"fresh-{command}"  # nor is a new output left half-written
        assert main([command, str(broken), "--out", str(fresh), "--no-progress", "--jobs", "1"]) == 2
        assert not fresh.exists()
    capsys.readouterr()
    assert (snapshot(site), snapshot(pub)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zarr", "pub", "site"]
