"""The atlas's static files, kept here as strings so that the package needs no data files.

The pages hold no data: `index.html` and `neuron.html` load `atlas.js`, which builds everything
from the data scripts (`data/run.js`, `data/layers/L.js`, `data/n/L/N.js`) with DOM calls that
treat corpus text as text (`textContent`, `title`), never as markup. A Content-Security-Policy
allows scripts from the atlas's own files only, so even a token that slipped through could not run.
Data comes in as <script> files rather than fetch(): browsers refuse fetch() of file:// URLs.
"""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'")

_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>neuronatlas</title>
<link rel="stylesheet" href="atlas.css">
<script src="atlas.js"></script>
<script src="data/run.js"></script>
</head>
"""

INDEX_HTML = _HEAD.format(csp=CSP) + """<body data-page="index">
<header class="top"><a class="brand" href="index.html">neuronatlas</a><span id="run-title"></span></header>
<main>
<noscript><p class="note">This atlas is drawn by JavaScript from files next to this page (no network is used); enable JavaScript to see it.</p></noscript>
<section id="run"></section>
<section>
<h2>Layers</h2>
<table id="layers" class="grid"><thead><tr><th>layer</th><th>neurons</th><th>explained</th><th>best score</th><th>median max</th><th>median density</th></tr></thead><tbody></tbody></table>
</section>
<section>
<h2>Neurons</h2>
<form id="controls" class="controls">
<label>layer <select id="f-layer"></select></label>
<label>sort by <select id="f-sort">
<option value="score">score</option><option value="max">max activation</option>
<option value="density">density</option><option value="mean">mean</option><option value="neuron">layer, neuron</option>
</select></label>
<label><select id="f-dir"><option value="desc">descending</option><option value="asc">ascending</option></select></label>
<label>explanation contains <input id="f-q" type="search" placeholder="text in explanations" autocomplete="off"></label>
<label>go to <input id="f-go" type="text" placeholder="layer:neuron" size="9" autocomplete="off"></label>
</form>
<p id="count" class="muted"></p>
<table id="neurons" class="grid"><thead><tr>
<th data-sort="neuron">layer</th><th data-sort="neuron">neuron</th><th data-sort="max">max</th>
<th data-sort="density">density</th><th data-sort="mean">mean</th><th data-sort="score">score</th><th>explanation</th>
</tr></thead><tbody></tbody></table>
<p class="pager"><button id="prev" type="button">&larr; previous</button> <span id="page"></span> <button id="next" type="button">next &rarr;</button></p>
</section>
</main>
</body>
</html>
"""

NEURON_HTML = _HEAD.format(csp=CSP) + """<body data-page="neuron">
<header class="top"><a class="brand" href="index.html">neuronatlas</a><span id="run-title"></span>
<nav id="nav"></nav></header>
<main>
<noscript><p class="note">This page is drawn by JavaScript from data/n/LAYER/NEURON.js (no network is used); enable JavaScript to see it.</p></noscript>
<h1 id="neuron-title"></h1>
<section id="explanations"></section>
<div class="cols">
<section><h2>Statistics</h2><table id="stats" class="kv"><tbody></tbody></table></section>
<section><h2>Excerpt maxima</h2><div id="hist"></div>
<label class="muted"><input id="logscale" type="checkbox"> log scale</label></section>
</div>
<p id="notes" class="muted"></p>
<p id="legend" class="muted"></p>
<div id="sections"></div>
</main>
</body>
</html>
"""

CSS = """
:root { --fg: #1d2127; --muted: #68707c; --line: #dde1e6; --bg: #fff; --head: #f5f7f9; --accent: #1f6f3f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header.top { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em; border-bottom: 1px solid var(--line); background: var(--head); flex-wrap: wrap; }
.brand { font-weight: 700; color: var(--accent); text-decoration: none; }
#run-title { color: var(--muted); }
nav { margin-left: auto; display: flex; gap: 1em; }
main { padding: 0 1.2em 2em; max-width: 1400px; }
h1 { font-size: 1.5em; margin: .6em 0 .3em; }
h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
a { color: #1a55a8; }
.muted { color: var(--muted); }
.note { padding: .6em; background: #fff7d6; }
table.grid { border-collapse: collapse; width: 100%; }
table.grid th, table.grid td { border-bottom: 1px solid var(--line); padding: .25em .6em; text-align: left; vertical-align: top; }
table.grid th { background: var(--head); position: sticky; top: 0; }
table.grid th[data-sort] { cursor: pointer; }
table.grid th.sorted::after { content: " \\25BE"; }
table.grid th.sorted.asc::after { content: " \\25B4"; }
table.grid td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.grid td.expl { width: 55%; }
table#layers { width: auto; min-width: 50%; }
table.kv td { padding: .1em .8em .1em 0; font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: var(--muted); }
.controls { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; margin: .4em 0; }
.controls input[type=search] { width: 22em; }
.pager { display: flex; gap: 1em; align-items: center; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; align-items: flex-start; }
.expl-best { font-size: 1.15em; margin: .2em 0; }
.expl-best .score, .expl-list .score { color: var(--muted); font-size: .85em; margin-left: .6em; }
.expl-list { margin: .2em 0 0 1.2em; padding: 0; color: var(--muted); }
.excerpt { display: flex; gap: .8em; padding: .3em 0; border-bottom: 1px solid #eef0f2; }
.excerpt .emax { flex: 0 0 5em; text-align: right; color: var(--muted); font-variant-numeric: tabular-nums; }
.toks { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; }
.tok:hover { outline: 1px solid #333; }
.tok.ctl { color: #a33; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg .bar { fill: #3d8f5a; }
svg .bar.out { fill: #b9c0c8; }
svg .bar:hover { fill: #1f6f3f; }
svg .qline { stroke: #c0504d; stroke-dasharray: 3 3; }
svg .axis { stroke: #99a; }
.swatch { display: inline-block; width: 3em; height: .9em; vertical-align: middle; border: 1px solid var(--line); }
"""

JS = r"""
(function () {
  "use strict";
  var NA = window.NA = { _layers: {}, _waiting: {}, _requested: {}, _failed: {}, _run: null };
  NA.run = function (d) { NA._run = d; };
  NA.layer = function (l, d) {
    NA._layers[l] = d;
    var cbs = NA._waiting[l] || [];
    delete NA._waiting[l];
    cbs.forEach(function (f) { f(); });
  };
  NA.neuron = function (d) { NA._neuron = d; if (NA._onNeuron) NA._onNeuron(d); };

  // -- helpers: every piece of data enters the page as text, through these --------------------
  function el(tag, opts, kids) {
    var e = document.createElement(tag);
    opts = opts || {};
    if (opts.cls) e.className = opts.cls;
    if (opts.text !== undefined && opts.text !== null) e.textContent = String(opts.text);
    if (opts.title !== undefined) e.title = String(opts.title);
    if (opts.href) e.setAttribute("href", opts.href);
    if (opts.id) e.id = opts.id;
    (kids || []).forEach(function (k) { if (k) e.appendChild(k); });
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
  function num(v) { return typeof v === "number" && isFinite(v); }
  function fmt(v, digits) {
    if (!num(v)) return "\u2014";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(parseFloat(v.toPrecision(digits || 4)));
  }
  function pct(v) { return num(v) ? fmt(100 * v, 3) + "%" : "\u2014"; }
  function intParam(v) { return /^[0-9]+$/.test(v || "") ? parseInt(v, 10) : null; }
  function loadScript(src, onerror) {
    var s = document.createElement("script");
    s.src = src;
    if (onerror) s.onerror = onerror;
    document.head.appendChild(s);
  }
  function loadLayers(list, done) {
    var left = list.length;
    if (!left) { done(); return; }
    function one() { left -= 1; if (left === 0) done(); }
    list.forEach(function (l) {
      if (NA._layers[l] || NA._failed[l]) { one(); return; }
      (NA._waiting[l] = NA._waiting[l] || []).push(one);
      if (!NA._requested[l]) {
        NA._requested[l] = true;
        loadScript("data/layers/" + l + ".js", function () {
          NA._failed[l] = true;
          var cbs = NA._waiting[l] || []; delete NA._waiting[l];
          cbs.forEach(function (f) { f(); });
        });
      }
    });
  }
  function runTitle(run) {
    var t = document.getElementById("run-title");
    if (t && run) t.textContent = run.model + " \u00b7 " + run.excerpts.toLocaleString("en-US") + " excerpts of " + run.excerpt_len + " tokens";
  }
  // Visible stand-ins for whitespace and control characters (still plain text).
  function display(tok) {
    return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192").replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, function (c) {
      var h = c.charCodeAt(0).toString(16);
      return "\\u" + "0000".slice(h.length) + h;
    });
  }
  // Explanations are model output (or imported text): shown as text with their control and
  // direction-override characters made visible, in a <bdi> so that right-to-left text cannot
  // reorder what stands beside it (the score).
  function prose(text) {
    return display(String(text).replace(/[\r\n\t]+/g, " "));
  }
  function shade(a, pos, neg) {
    if (!num(a)) return "";
    var x = 0, rgb = "";
    if (a > 0 && pos > 0) { x = Math.min(a / pos, 1); rgb = "34, 160, 70"; }
    else if (a < 0 && neg > 0) { x = Math.min(-a / neg, 1); rgb = "50, 100, 220"; }
    if (x < 0.03) return "";
    return "rgba(" + rgb + ", " + (0.05 + 0.8 * x).toFixed(3) + ")";
  }

  // -- index page ------------------------------------------------------------------------------
  var PAGE = 100;
  function readState(run) {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var total = run.layers.reduce(function (s, l) { return s + (l.included ? l.n : 0); }, 0);
    var first = run.layers.filter(function (l) { return l.included; })[0];
    var layer = p.get("layer");
    if (layer !== "all" && intParam(layer) === null) layer = total <= 50000 || !first ? "all" : String(first.layer);
    var sort = p.get("sort");
    if (["score", "max", "density", "mean", "neuron"].indexOf(sort) < 0) sort = run.explained > 0 ? "score" : "max";
    var dir = p.get("dir") === "asc" ? "asc" : (p.get("dir") === "desc" ? "desc" : (sort === "neuron" ? "asc" : "desc"));
    return { layer: layer, sort: sort, dir: dir, q: p.get("q") || "", page: intParam(p.get("page")) || 0 };
  }
  function writeState(s) {
    var p = new URLSearchParams();
    p.set("layer", s.layer); p.set("sort", s.sort); p.set("dir", s.dir);
    if (s.q) p.set("q", s.q);
    if (s.page) p.set("page", String(s.page));
    location.replace("#" + p.toString());
  }
  function cmp(key, dir) {
    var sgn = dir === "asc" ? 1 : -1;
    return function (a, b) {
      if (key !== "neuron") {
        var x = a[key], y = b[key], nx = !num(x), ny = !num(y);
        if (nx !== ny) return nx ? 1 : -1;          // missing values last, either direction
        if (!nx && x !== y) return sgn * (x < y ? -1 : 1);
        return a.l - b.l || a.i - b.i;
      }
      return sgn * (a.l - b.l || a.i - b.i);
    };
  }
  function indexPage() {
    var run = NA._run;
    runTitle(run);
    var info = document.getElementById("run");
    var dl = el("table", { cls: "kv" }, [el("tbody")]);
    run.facts.forEach(function (f) { dl.tBodies[0].appendChild(el("tr", {}, [el("td", { text: f[0] }), el("td", { text: f[1] })])); });
    info.appendChild(dl);

    var lt = document.querySelector("#layers tbody");
    var sel = document.getElementById("f-layer");
    sel.appendChild(el("option", { text: "all layers" })).value = "all";
    run.layers.forEach(function (l) {
      if (!l.included) return;
      sel.appendChild(el("option", { text: String(l.layer) })).value = String(l.layer);
      var a = el("a", { text: "layer " + l.layer, href: "#layer=" + l.layer + "&sort=" + (run.explained > 0 ? "score" : "max") + "&dir=desc" });
      lt.appendChild(el("tr", {}, [el("td", {}, [a]), el("td", { cls: "num", text: l.n.toLocaleString("en-US") }),
        el("td", { cls: "num", text: l.explained.toLocaleString("en-US") }), el("td", { cls: "num", text: fmt(l.best_score, 3) }),
        el("td", { cls: "num", text: fmt(l.median_max) }), el("td", { cls: "num", text: pct(l.median_density) })]));
    });
    var fq = document.getElementById("f-q"), fs = document.getElementById("f-sort"), fd = document.getElementById("f-dir");
    var timer = null;
    function update(change) { var s = readState(run); Object.keys(change).forEach(function (k) { s[k] = change[k]; }); writeState(s); }
    sel.onchange = function () { update({ layer: sel.value, page: 0 }); };
    fs.onchange = function () { update({ sort: fs.value, dir: fs.value === "neuron" ? "asc" : "desc", page: 0 }); };
    fd.onchange = function () { update({ dir: fd.value, page: 0 }); };
    fq.oninput = function () { clearTimeout(timer); timer = setTimeout(function () { update({ q: fq.value, page: 0 }); }, 200); };
    document.getElementById("controls").onsubmit = function (ev) {
      ev.preventDefault();
      var m = /^\s*(\d+)\s*[:\/ ,.]\s*(\d+)\s*$/.exec(document.getElementById("f-go").value);
      if (m) location.href = "neuron.html?l=" + m[1] + "&n=" + m[2];
    };
    Array.prototype.forEach.call(document.querySelectorAll("#neurons th[data-sort]"), function (th) {
      th.onclick = function () {
        var s = readState(run), key = th.getAttribute("data-sort");
        update({ sort: key, dir: s.sort === key ? (s.dir === "asc" ? "desc" : "asc") : (key === "neuron" ? "asc" : "desc"), page: 0 });
      };
    });
    document.getElementById("prev").onclick = function () { var s = readState(run); if (s.page > 0) update({ page: s.page - 1 }); };
    document.getElementById("next").onclick = function () { var s = readState(run); update({ page: s.page + 1 }); };
    window.addEventListener("hashchange", function () { renderNeurons(run); });
    renderNeurons(run);
  }
  function renderNeurons(run) {
    var s = readState(run);
    document.getElementById("f-layer").value = s.layer;
    document.getElementById("f-sort").value = s.sort;
    document.getElementById("f-dir").value = s.dir;
    var fq = document.getElementById("f-q");
    if (document.activeElement !== fq) fq.value = s.q;
    var layers = s.layer === "all" ? run.layers.filter(function (l) { return l.included; }).map(function (l) { return l.layer; }) : [parseInt(s.layer, 10)];
    document.getElementById("count").textContent = "loading\u2026";
    loadLayers(layers, function () {
      var rows = [], q = s.q.toLowerCase();
      layers.forEach(function (l) {
        var d = NA._layers[l];
        if (!d) return;
        for (var i = 0; i < d.n; i++) {
          if (d.absent[i]) continue;
          var e = d.expl[i];
          if (q && !(e && e.toLowerCase().indexOf(q) >= 0)) continue;
          rows.push({ l: l, i: i, max: d.max[i], density: d.density[i], mean: d.mean[i], score: d.score[i], expl: e });
        }
      });
      rows.sort(cmp(s.sort, s.dir));
      var pages = Math.max(1, Math.ceil(rows.length / PAGE)), page = Math.min(s.page, pages - 1);
      var body = clear(document.querySelector("#neurons tbody"));
      rows.slice(page * PAGE, (page + 1) * PAGE).forEach(function (r) {
        var href = "neuron.html?l=" + r.l + "&n=" + r.i;
        body.appendChild(el("tr", {}, [el("td", { cls: "num", text: r.l }), el("td", { cls: "num" }, [el("a", { text: r.i, href: href })]),
          el("td", { cls: "num", text: fmt(r.max) }), el("td", { cls: "num", text: pct(r.density) }), el("td", { cls: "num", text: fmt(r.mean) }),
          el("td", { cls: "num", text: fmt(r.score, 3) }), el("td", { cls: "expl" }, [el("bdi", { text: prose(r.expl || "") })])]));
      });
      var missing = layers.filter(function (l) { return !NA._layers[l]; });
      document.getElementById("count").textContent = rows.length.toLocaleString("en-US") + " neurons" +
        (q ? " whose explanation contains \u201c" + s.q + "\u201d" : "") + (missing.length ? " (layer data missing: " + missing.join(", ") + ")" : "");
      document.getElementById("page").textContent = "page " + (page + 1) + " of " + pages;
      document.getElementById("prev").disabled = page <= 0;
      document.getElementById("next").disabled = page >= pages - 1;
      Array.prototype.forEach.call(document.querySelectorAll("#neurons th[data-sort]"), function (th) {
        var on = th.getAttribute("data-sort") === s.sort;
        th.classList.toggle("sorted", on); th.classList.toggle("asc", on && s.dir === "asc");
      });
      document.body.setAttribute("data-ready", "1");
    });
  }

  // -- neuron page -----------------------------------------------------------------------------
  function neuronPage() {
    var run = NA._run;
    runTitle(run);
    var p = new URLSearchParams(location.search);
    var l = intParam(p.get("l")), n = intParam(p.get("n"));
    var title = document.getElementById("neuron-title");
    if (l === null || n === null) { title.textContent = "Which neuron? Open this page as neuron.html?l=LAYER&n=NEURON."; return; }
    document.title = "layer " + l + " neuron " + n + " \u00b7 neuronatlas";
    var nav = document.getElementById("nav");
    if (n > 0) nav.appendChild(el("a", { text: "\u2190 neuron " + (n - 1), href: "neuron.html?l=" + l + "&n=" + (n - 1) }));
    nav.appendChild(el("a", { text: "layer " + l, href: "index.html#layer=" + l }));
    var layerInfo = run.layers.filter(function (x) { return x.layer === l; })[0];
    if (layerInfo && n + 1 < layerInfo.n) nav.appendChild(el("a", { text: "neuron " + (n + 1) + " \u2192", href: "neuron.html?l=" + l + "&n=" + (n + 1) }));
    title.textContent = "Layer " + l + " \u00b7 neuron " + n;
    NA._onNeuron = renderNeuron;
    loadScript("data/n/" + l + "/" + n + ".js", function () {
      title.textContent = "Layer " + l + " \u00b7 neuron " + n + " is not in this atlas";
      document.body.setAttribute("data-ready", "1");
    });
  }
  function histogram(d, log) {
    var box = clear(document.getElementById("hist"));
    var h = d.hist;
    if (!h || !h.counts || !h.counts.length || !num(h.lo) || !num(h.hi)) { box.appendChild(el("p", { cls: "muted", text: "no histogram recorded" })); return; }
    var c = h.counts, H = c.length - 2, W = 560, Ht = 170, ml = 44, mr = 10, mt = 10, mb = 34;
    var under = c[0], over = c[H + 1], gap = 6, side = (under ? 14 + gap : 0), sideR = (over ? 14 + gap : 0);
    var pw = W - ml - mr - side - sideR, ph = Ht - mt - mb;
    var f = function (v) { return log ? Math.log(1 + v) : v; };
    var top = Math.max.apply(null, c.map(f)) || 1;
    var s = svg("svg", { id: "hist-svg", width: W, height: Ht, viewBox: "0 0 " + W + " " + Ht, role: "img" });
    s.appendChild(svg("title", {}, "Histogram of excerpt maxima (" + c.reduce(function (a, b) { return a + b; }, 0) + " excerpts)"));
    var x0 = ml + side, bw = pw / H, lo = h.lo, hi = h.hi, step = (hi - lo) / H;
    function bar(x, w, v, label, cls) {
      var bh = ph * f(v) / top;
      var r = svg("rect", { x: x.toFixed(2), y: (mt + ph - bh).toFixed(2), width: Math.max(w - 1, 1).toFixed(2), height: bh.toFixed(2), "class": cls });
      r.appendChild(svg("title", {}, label + ": " + v + " excerpt" + (v === 1 ? "" : "s")));
      s.appendChild(r);
    }
    if (under) bar(ml, 14, under, "below " + fmt(lo), "bar out");
    for (var i = 0; i < H; i++) bar(x0 + i * bw, bw, c[i + 1], "[" + fmt(lo + i * step) + ", " + fmt(lo + (i + 1) * step) + ")", "bar");
    if (over) bar(x0 + pw + gap, 14, over, "above " + fmt(hi), "bar out");
    s.appendChild(svg("line", { x1: ml, x2: W - mr, y1: mt + ph, y2: mt + ph, "class": "axis" }));
    s.appendChild(svg("line", { x1: ml, x2: ml, y1: mt, y2: mt + ph, "class": "axis" }));
    (d.quantiles || []).forEach(function (q) {
      if (!num(q.v) || q.v < lo || q.v > hi) return;
      var x = x0 + (q.v - lo) / (hi - lo) * pw;
      var ln = svg("line", { x1: x.toFixed(2), x2: x.toFixed(2), y1: mt, y2: mt + ph, "class": "qline" });
      ln.appendChild(svg("title", {}, (num(q.p) ? "p" + fmt(100 * q.p) : "boundary") + " = " + fmt(q.v)));
      s.appendChild(ln);
    });
    s.appendChild(svg("text", { x: x0, y: Ht - mb + 14, "text-anchor": "start" }, fmt(lo)));
    s.appendChild(svg("text", { x: x0 + pw / 2, y: Ht - mb + 14, "text-anchor": "middle" }, fmt((lo + hi) / 2)));
    s.appendChild(svg("text", { x: x0 + pw, y: Ht - mb + 14, "text-anchor": "end" }, fmt(hi)));
    s.appendChild(svg("text", { x: ml + pw / 2 + side, y: Ht - 4, "text-anchor": "middle" }, "maximum activation of an excerpt"));
    s.appendChild(svg("text", { x: ml - 4, y: mt + 9, "text-anchor": "end" }, String(Math.max.apply(null, c))));
    s.appendChild(svg("text", { x: ml - 4, y: mt + ph, "text-anchor": "end" }, "0"));
    box.appendChild(s);
    if (h.note) box.appendChild(el("p", { cls: "muted", text: h.note }));
  }
  function scoreText(e) {
    return (num(e.score) ? "score " + fmt(e.score, 3) : e.undefined ? "score undefined (" + e.undefined + ")" : "not scored")
      + (e.source ? " \u00b7 " + e.source : "");
  }
  function renderNeuron(d) {
    var l = d.layer, n = d.index;
    if (d.absent) {
      document.getElementById("neuron-title").textContent = "Layer " + l + " \u00b7 neuron " + n + " has no excerpts in this recording";
    }
    var ex = document.getElementById("explanations");
    var best = d.explanations[0];
    if (best) {
      ex.appendChild(el("p", { cls: "expl-best" }, [el("bdi", { text: prose(best.text) }), el("span", { cls: "score", text: scoreText(best) })]));
      if (d.explanations.length > 1) {
        var ul = el("ul", { cls: "expl-list" });
        d.explanations.slice(1).forEach(function (e) { ul.appendChild(el("li", {}, [el("bdi", { text: prose(e.text) }), el("span", { cls: "score", text: scoreText(e) })])); });
        ex.appendChild(ul);
      }
    } else {
      ex.appendChild(el("p", { cls: "muted", text: "No explanation yet." }));
    }
    var st = document.querySelector("#stats tbody");
    var S = d.stats;
    [["max", fmt(S.max)], ["min", fmt(S.min)], ["mean", fmt(S.mean)], ["variance", fmt(S.variance)], ["skewness", fmt(S.skewness, 3)],
     ["kurtosis (excess)", fmt(S.kurtosis, 3)], ["density (activation > 0)", pct(S.density)]].forEach(function (r) {
      st.appendChild(el("tr", {}, [el("td", { text: r[0] }), el("td", { cls: "v", text: r[1] })]));
    });
    (d.quantiles || []).forEach(function (q) {
      st.appendChild(el("tr", {}, [el("td", { text: "excerpt max " + (num(q.p) ? "p" + fmt(100 * q.p) : "boundary") }), el("td", { cls: "v", text: fmt(q.v) })]));
    });
    document.getElementById("notes").textContent = (d.notes || []).join(" ");
    var logBox = document.getElementById("logscale");
    histogram(d, logBox.checked);
    logBox.onchange = function () { histogram(d, logBox.checked); };

    var pos = d.scale.pos, neg = d.scale.neg;
    var legend = document.getElementById("legend");
    var sw = el("span", { cls: "swatch" }); sw.style.background = shade(pos, pos, neg);
    legend.appendChild(sw);
    legend.appendChild(document.createTextNode(" " + fmt(pos) + (neg > 0 ? " " : "")));
    if (neg > 0) { var sn = el("span", { cls: "swatch" }); sn.style.background = shade(-neg, pos, neg); legend.appendChild(sn); legend.appendChild(document.createTextNode(" " + fmt(-neg))); }
    legend.appendChild(document.createTextNode(" \u2014 hover a token for its activation"));

    var box = document.getElementById("sections");
    var strs = d.strings;
    d.sections.forEach(function (sec) {
      if (!sec.records.length) return;
      var sect = el("section", { cls: "records" });
      sect.setAttribute("data-kind", sec.kind);
      sect.appendChild(el("h2", { text: sec.title + " (" + sec.records.length + (sec.total > sec.records.length ? " of " + sec.total : "") + ")" }));
      sec.records.forEach(function (r) {
        var toks = el("div", { cls: "toks" });
        var m = null;
        for (var i = 0; i < r.t.length; i++) {
          var a = r.a[i], raw = strs[r.t[i]], shown = display(raw);
          if (num(a) && (m === null || a > m)) m = a;
          var sp = el("span", { cls: shown === raw ? "tok" : "tok ctl", text: shown, title: fmt(a) });
          var bg = shade(a, pos, neg);
          if (bg) sp.style.backgroundColor = bg;
          toks.appendChild(sp);
        }
        var row = el("div", { cls: "excerpt", title: "excerpt " + r.e }, [el("span", { cls: "emax", text: fmt(m) }), toks]);
        sect.appendChild(row);
      });
      box.appendChild(sect);
    });
    document.body.setAttribute("data-ready", "1");
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!NA._run) { document.body.appendChild(el("p", { cls: "note", text: "data/run.js is missing: regenerate this atlas with neuronatlas view." })); return; }
    var page = document.body.getAttribute("data-page");
    if (page === "index") indexPage();
    else if (page === "neuron") neuronPage();
  });
})();
"""
