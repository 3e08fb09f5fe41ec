"""`neuronatlas show STORE LAYER NEURON`: one neuron in the terminal.

Each token is shaded by its activation: green for positive values, blue for negative ones, both
relative to the larger of the neuron's maximum and the magnitude of its minimum. Truecolor where the terminal says it
has it (COLORTERM=truecolor or 24bit), the 256-colour cube on other colour terminals, and plain text
with the strong tokens bracketed as [token:value] where there is no colour (not a terminal,
NO_COLOR, TERM=dumb). Corpus text is untrusted: control characters in tokens are printed as
escapes, never sent to the terminal.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import unicodedata

from engine.atlas import data
from engine.errors import UserError

MODES = ("auto", "truecolor", "256", "none")
BRACKET_AT = 0.25
"""Without colour, tokens whose activation is at least this fraction of the scale are bracketed."""
RESET = "\x1b[0m"

# Ramps from faint to strong; the foreground turns white on the dark end.
_POS = ((222, 245, 222), (22, 140, 52))
_NEG = ((222, 230, 250), (40, 80, 200))
_POS_256 = (194, 157, 120, 77, 34, 28)
_NEG_256 = (189, 153, 111, 69, 26, 19)


def color_mode(requested: str = "auto", stream=None, env=None) -> str:
    """truecolor, 256 or none for `stream` under the conventions of NO_COLOR, FORCE_COLOR,
    COLORTERM and TERM."""
    env = os.environ if env is None else env
    if requested != "auto":
        return requested
    if env.get("NO_COLOR"):
        return "none"
    forced = env.get("FORCE_COLOR", "") not in ("", "0")
    tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    if not forced and (not tty or env.get("TERM") == "dumb"):
        return "none"
    if env.get("COLORTERM", "").lower() in ("truecolor", "24bit"):
        return "truecolor"
    return "256"


def clean_token(tok: str, plain: bool) -> str:
    """The token as terminal-safe text: whitespace made visible, control characters escaped."""
    out = []
    for ch in tok:
        if ch == "\n":
            out.append("\\n" if plain else "↵")
        elif ch == "\t":
            out.append("\\t" if plain else "→")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co"):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _width(text: str) -> int:
    w = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def _fmt(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"


def shade(a: float, pos_scale: float, neg_scale: float, mode: str) -> str:
    """The SGR prefix that shades a token with activation `a` ('' for none)."""
    if mode == "none" or not math.isfinite(a):
        return ""
    if a > 0 and pos_scale > 0:
        x, ramp, cube = min(a / pos_scale, 1.0), _POS, _POS_256
    elif a < 0 and neg_scale > 0:
        x, ramp, cube = min(-a / neg_scale, 1.0), _NEG, _NEG_256
    else:
        return ""
    if x < 0.02:
        return ""
    fg = "\x1b[97m" if x >= 0.6 else "\x1b[30m"
    if mode == "truecolor":
        (r0, g0, b0), (r1, g1, b1) = ramp
        r, g, b = (round(c0 + x * (c1 - c0)) for c0, c1 in ((r0, r1), (g0, g1), (b0, b1)))
        return f"\x1b[48;2;{r};{g};{b}m{fg}"
    return f"\x1b[48;5;{cube[min(int(x * len(cube)), len(cube) - 1)]}m{fg}"


def excerpt_lines(tokens: list[str], acts: list[float], pos_scale: float, neg_scale: float,
                  mode: str, width: int, indent: int) -> list[str]:
    """One excerpt as shaded lines of at most `width` columns (continuations indented)."""
    plain = mode == "none"
    pieces = []
    for tok, a in zip(tokens, acts):
        text = clean_token(tok, plain)
        if plain:
            strong = (a > 0 and pos_scale > 0 and a >= BRACKET_AT * pos_scale) or (
                a < 0 and neg_scale > 0 and -a >= BRACKET_AT * neg_scale)
            if strong:
                text = f"[{text}:{a:.2f}]" if abs(a) < 1e5 else f"[{text}:{a:.3e}]"  # not 309 digits
            pieces.append((text, text))
        else:
            sgr = shade(a, pos_scale, neg_scale, mode)
            pieces.append((text, f"{sgr}{text}{RESET}" if sgr else text))
    lines, cur, used = [], [], 0
    room = max(20, width - indent)
    for text, styled in pieces:
        w = _width(text)
        if cur and used + w > room:
            lines.append("".join(cur))
            cur, used = [], 0
        cur.append(styled)
        used += w
    lines.append("".join(cur))
    return lines


def _section(title: str, records, limit: int, pos: float, neg: float, mode: str, width: int,
             lowest: bool = False) -> list[str]:
    """Excerpts headed by their maximum, or with `lowest` by their minimum (what the most
    negative excerpts are ranked by)."""
    if limit <= 0 or not records:
        return []
    bold = (lambda s: f"\x1b[1m{s}{RESET}") if mode != "none" else (lambda s: s)
    out = [bold(f"{title} ({min(limit, len(records))} of {len(records)})")]
    for r in records[:limit]:
        m = (min if lowest else max)(r.activations) if r.activations else float("nan")
        head = f"{_fmt(m):>9}  "
        body = excerpt_lines(r.tokens, r.activations, pos, neg, mode, width, len(head))
        out.append(head + body[0])
        out += [" " * len(head) + line for line in body[1:]]
    out.append("")
    return out


def _sparkline(counts: list[int]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    top = max(counts) if counts else 0
    if top <= 0:
        return ""
    return "".join(" " if c == 0 else bars[min(len(bars) - 1, int(len(bars) * c / (top + 1e-9)))] for c in counts)


def render(store, layer: int, index: int, mode: str = "none", width: int = 100, top: int = 10,
           random: int = 5, per_quantile: int = 2, negative: int = 5) -> str:
    """The terminal view of neuron `index` of `layer`."""
    rec = store.neuron(layer, index)
    layer, index = rec.neuron_id.layer_index, rec.neuron_id.neuron_index  # -1: the last, named as such
    expls = data.explanations(store, layer, index)
    recs = rec.most_positive_activation_records + rec.random_sample + [
        r for b in rec.random_sample_by_quantile for r in b]
    finite = [a for r in recs for a in r.activations if math.isfinite(a)]
    pos = rec.max if math.isfinite(rec.max) and rec.max > 0 else max([a for a in finite if a > 0], default=0.0)
    neg_recs = rec.most_negative_activation_records or []
    neg_vals = [a for r in neg_recs for a in r.activations if math.isfinite(a)] + finite
    neg = -rec.min if math.isfinite(rec.min) and rec.min < 0 else -min([a for a in neg_vals if a < 0], default=0.0)
    # One scale for both signs, so that GELU's small negative dip does not look like a strong signal.
    pos = neg = max(pos, neg) if neg > 0 else pos
    bold = (lambda s: f"\x1b[1m{s}{RESET}") if mode != "none" else (lambda s: s)

    run = store.run
    name = clean_token(str(run["model"].get("name", "?")), True)
    out = [bold(f"layer {layer} · neuron {index}") + f"   {name}, {store.excerpts_done:,} excerpts of "
           f"{run.get('excerpt_len', '?')} tokens" + ("" if store.complete else " (recording incomplete)")]
    out.append(f"  max {_fmt(rec.max)}   min {_fmt(rec.min)}   mean {_fmt(rec.mean)}   variance "
               f"{_fmt(rec.variance)}   skewness {_fmt(rec.skewness, 3)}   kurtosis {_fmt(rec.kurtosis, 3)}   "
               f"density {_fmt(100 * rec.frac_positive, 3)}%")
    if rec.quantile_boundaries:
        qs = []
        for i, b in enumerate(rec.quantile_boundaries):
            p = rec.quantile_probs[i] if i < len(rec.quantile_probs) else None
            qs.append(f"{'p' + format(100 * p, 'g') if isinstance(p, (int, float)) else '?'} {_fmt(b)}")
        out.append("  excerpt-maximum quantiles: " + "   ".join(qs))
    if rec.histogram and sum(rec.histogram) > 0:
        lo, hi = rec.histogram_range
        h = rec.histogram
        out.append(f"  excerpt maxima  {_fmt(lo)} {_sparkline(h[1:-1])} {_fmt(hi)}   "
                   f"({sum(h):,} excerpts; {h[0]} below, {h[-1]} above)")
    if expls:
        for e in sorted(expls, key=lambda e: -(e.score if e.score is not None else -math.inf))[:3]:
            out.append(f"  explanation: {clean_token(e.text, True)} ({clean_token(e.score_text, True)}, "
                       f"{clean_token(e.source, True)})")
    failed = data.notes(store, layer, index)
    for line in failed[:3]:
        out.append(f"  {clean_token(line, True)}")
    if not expls and not failed:
        out.append("  no explanation yet")
    if mode != "none":
        out.append(f"  shading: green to {_fmt(pos)}" + (f", blue to {_fmt(-neg)}" if neg > 0 else ""))
    else:
        out.append(f"  [token:value] marks activations of magnitude at least {BRACKET_AT:g} × {_fmt(pos)}")
    out.append("")
    out += _section("Top activating excerpts", rec.most_positive_activation_records, top, pos, neg, mode, width)
    out += _section("Random sample", rec.random_sample, random, pos, neg, mode, width)
    probs = list(rec.quantile_probs)
    for q, bucket in enumerate(rec.random_sample_by_quantile):
        lo_p = probs[q - 1] if 0 < q <= len(probs) else (0.0 if q == 0 else None)
        hi_p = probs[q] if q < len(probs) else (1.0 if q == len(probs) else None)
        name_q = (f"quantiles {lo_p:g}–{hi_p:g}" if isinstance(lo_p, (int, float)) and isinstance(hi_p, (int, float))
                  else f"bucket {q}")
        out += _section(f"Sampled from excerpt-maximum {name_q}", bucket, per_quantile, pos, neg, mode, width)
    out += _section("Most negative excerpts", neg_recs, negative, pos, neg, mode, width, lowest=True)
    return "\n".join(out).rstrip("\n") + "\n"


def cmd_show(args) -> int:
    from engine.store import open_store

    if args.width is not None and args.width < 20:
        raise UserError(f"--width {args.width}: give at least 20 columns (excerpts wrap at 20 at the least)")
    store = open_store(args.store)
    data.refuse_foreign_results(store)
    mode = color_mode(args.color, sys.stdout)
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    text = render(store, args.layer, args.neuron, mode, width, args.top, args.random, args.per_quantile,
                  args.negative)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        pass
    return 0
