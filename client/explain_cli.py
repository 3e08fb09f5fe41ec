"""`neuronatlas explain`, `simulate`, `score` and `top`: the second half of the method over a store.

register_explain() only builds parsers (cheap); each command imports what it needs when it runs.
docs/EXPLAIN.md describes the commands, the prompts, the modes and the results layout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def _selection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which neurons")
    g.add_argument("--layers", default=None, help="layers: 'all' (default) or ranges like 0-3,7")
    g.add_argument("--neurons", default=None, help="neurons within each selected layer: 'all' (default) or ranges like 0-99,200")
    g.add_argument("--ids", default=None, metavar="FILE", help="a file of LAYER:NEURON lines instead of --layers/--neurons")
    g.add_argument("--limit", type=int, default=None, help="at most this many of the selected neurons")


def _group_flags(p: argparse.ArgumentParser, explain: bool) -> None:
    g = p.add_argument_group("models (they name the results group)")
    g.add_argument("--explainer-model", default=None,
                   help="explainer model" + (" (required for a first run)" if explain else
                                             " (default: the store's only results group)"))
    g.add_argument("--simulator-model", default=None, help="simulator model (default: the explainer model)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--requests", default=None, metavar="PATH",
                   help="durable request store, SQLite (default: STORE/explanations/requests.sqlite)")
    g.add_argument("--retry-failed", action="store_true",
                   help="redo neurons whose stage failed, resending requests that failed for good")
    g.add_argument("--redo", action="store_true",
                   help="redo the neurons this stage finished with other options than this run's (without it, "
                   "such neurons refuse the run, so that results made with different options do not mix)")
    g.add_argument("--dry-run", action="store_true", help="print the selection and the cost estimate, then exit")
    g.add_argument("--max-cost", type=float, default=None, metavar="USD",
                   help="refuse to start when the estimated cost is above this, and stop sending before this "
                   "run's spending could pass it")
    g.add_argument("--concurrency", type=int, default=None, help="neurons worked on at once (default: --max-in-flight)")
    g.add_argument("--allow-incomplete", action="store_true", help="work on the last checkpoint of an unfinished recording")


def register_explain(sub) -> None:
    """Add explain, simulate, score and top to `neuronatlas`'s subparsers."""
    from client.cli import _add_client_flags

    p = sub.add_parser(
        "explain", help="explain neurons of a store with an LLM (resumable)",
        description="Ask an explainer LLM on any OpenAI-compatible server for a short explanation of each selected "
        "neuron, from its top excerpts of the train split (activations scaled to 0..10). Results go into "
        "STORE/explanations/<explainer>__<simulator>__<prompt version>/; a rerun skips finished neurons and pays "
        "for no request twice. Then run `simulate` and `score`.")
    p.add_argument("store", help="store directory")
    _selection_flags(p)
    _group_flags(p, explain=True)
    g = p.add_argument_group("explainer")
    g.add_argument("--excerpts", type=int, default=5, help="top train excerpts shown (default 5)")
    g.add_argument("--samples", type=int, default=1, help="explanations sampled per neuron; score keeps the best (default 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="explainer temperature (default 1.0)")
    g.add_argument("--max-tokens", type=int, default=60,
                   help="longest explanation in tokens (default 60); the explanation kept is the reply's first "
                   "line, cut to 300 characters")
    _run_flags(p)
    _add_client_flags(p)
    p.set_defaults(func=lambda args: _stage("explain", args))

    p = sub.add_parser(
        "simulate", help="simulate explained neurons from their explanations (resumable)",
        description="Predict each explained neuron's activation at every token of held-out excerpts (top and random "
        "excerpts of the valid or test split, plus the calibration split) from its explanation alone, with a "
        "simulator LLM. The mode is chosen from what the server can do (--sim-mode forces one; a server that "
        "cannot do it is refused before any simulation request). Then run `score`.")
    p.add_argument("store", help="store directory")
    _selection_flags(p)
    _group_flags(p, explain=False)
    g = p.add_argument_group("simulator")
    g.add_argument("--sim-mode", default="auto", choices=["auto", "echo", "prompt-logprobs", "chat-logprobs", "text"],
                   help="auto (default): the first the server can do of echo (completions echo+logprobs), "
                   "prompt-logprobs (vLLM), chat-logprobs (chat top_logprobs), text (chat, values parsed)")
    g.add_argument("--top-logprobs", type=int, default=None,
                   help="alternatives per position (default 5 for completions, 10 for chat)")
    g.add_argument("--sim-retries", type=int, default=2,
                   help="retries of a malformed written-out reply before the excerpt fails (default 2)")
    g.add_argument("--max-slots", type=int, default=768,
                   help="echo / prompt-logprobs: most subject tokens in one prompt; a neuron's excerpts share "
                   "prompts up to this (default 768)")
    g.add_argument("--split", default="valid", choices=["valid", "test"], help="split scored (default valid)")
    g.add_argument("--score-top", type=int, default=5, help="top excerpts of the split simulated (default 5)")
    g.add_argument("--score-random", type=int, default=5, help="random excerpts of the split simulated (default 5)")
    g.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="do not simulate the calibration split (R^2 and deviation explained then use raw 0..10 values)")
    _run_flags(p)
    _add_client_flags(p)
    p.set_defaults(func=lambda args: _stage("simulate", args))

    p = sub.add_parser(
        "score", help="score simulated neurons (pooled correlation, R^2, deviation explained)",
        description="Score each simulated neuron: the Pearson correlation of true and simulated activations pooled "
        "over all tokens of the scored excerpts (top and random: the headline; random only), and R^2 and absolute "
        "deviation explained after a line fitted on the calibration split. Undefined scores (a neuron that never "
        "fires, a constant simulation) are reported as undefined, never as 0. Sends no requests.")
    p.add_argument("store", help="store directory")
    _selection_flags(p)
    _group_flags(p, explain=False)
    p.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="R^2 and deviation explained of the raw 0..10 simulation (always so for neurons "
                   "simulated with --no-calibration)")
    p.add_argument("--rescore", action="store_true", help="recompute neurons already scored")
    p.add_argument("--allow-incomplete", action="store_true", help="work on an unfinished recording")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync results files")
    p.add_argument("--dry-run", action="store_true", help="print what would be scored, then exit")
    p.set_defaults(func=lambda args: _stage("score", args))

    p = sub.add_parser("top", help="list the best-explained neurons of a store",
                       description="List neurons by score (best first), with their explanations.")
    p.add_argument("store", help="store directory")
    p.add_argument("--by", default="score", choices=["score", "random-only", "rsquared", "absolute-dev"],
                   help="score: top+random correlation (default); random-only; rsquared; absolute-dev")
    p.add_argument("-n", "--count", type=int, default=20, help="rows to list (default 20)")
    p.add_argument("--worst", action="store_true", help="list the worst instead")
    p.add_argument("--layers", default=None, help="only these layers, e.g. 0-3,7")
    p.add_argument("--explainer-model", default=None, help="only this explainer's results")
    p.add_argument("--simulator-model", default=None, help="only this simulator's results")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=top_command)


def settings_from_args(stage: str, args):
    from client.pipeline import RunSettings
    from engine.errors import UserError

    s = RunSettings(store=args.store, layers=args.layers, neurons=args.neurons, ids=args.ids, limit=args.limit,
                    explainer_model=args.explainer_model, simulator_model=args.simulator_model,
                    dry_run=args.dry_run, allow_incomplete=args.allow_incomplete, durable=not args.no_fsync)
    if stage == "score":
        s.calibration = args.calibration
        s.rescore = args.rescore
        return s
    s.requests = args.requests
    s.retry_failed = args.retry_failed
    s.redo = args.redo
    if args.max_cost is not None and not (math.isfinite(args.max_cost) and args.max_cost >= 0):
        raise UserError(f"--max-cost must be a finite number of USD, 0 or more, not {args.max_cost:g}")
    s.max_cost = args.max_cost
    s.concurrency = args.concurrency
    s.progress = args.progress
    s.check = not args.no_check
    if stage == "explain":
        s.excerpts, s.n, s.temperature, s.max_tokens = args.excerpts, args.samples, args.temperature, args.max_tokens
    else:
        s.sim_mode, s.top_logprobs, s.sim_retries = args.sim_mode, args.top_logprobs, args.sim_retries
        s.max_slots = args.max_slots
        s.split, s.score_top, s.score_random, s.calibration = args.split, args.score_top, args.score_random, args.calibration
    return s


def _stage(stage: str, args) -> int:
    from client.pipeline import run_stage
    from client.results import DIRNAME, REQUESTS_FILE
    from engine.errors import UserError

    settings = settings_from_args(stage, args)
    if settings.concurrency is not None and settings.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, not {settings.concurrency}")
    for flag in ("score_top", "score_random", "sim_retries"):
        if stage == "simulate" and getattr(settings, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more")
    if stage == "explain" and not (math.isfinite(settings.temperature) and 0 <= settings.temperature <= 2):
        raise UserError(f"--temperature must be a number from 0 to 2, not {settings.temperature}")
    if stage == "simulate" and settings.max_slots < 1:
        raise UserError(f"--max-slots must be at least 1, not {settings.max_slots}")
    if stage == "simulate" and settings.top_logprobs is not None and not 1 <= settings.top_logprobs <= 20:
        raise UserError(f"--top-logprobs must be 1..20, not {settings.top_logprobs}")
    if stage == "simulate" and settings.score_top + settings.score_random < 1:
        raise UserError("--score-top and --score-random are both 0: nothing would be scored")
    if stage == "score":
        return run_stage(stage, settings)
    from client.cli import client_config

    requests = settings.requests or os.path.join(settings.store, DIRNAME, REQUESTS_FILE)
    config = client_config(args, requests, retry_dead=settings.retry_failed, check=not settings.dry_run)
    return run_stage(stage, settings, config)


# ---------------------------------------------------------------------------------------------
# top


def top_command(args) -> int:
    import json
    import math

    from client import results as res
    from client.neurons import parse_ranges
    from client.scoring import fmt
    from engine.atlas.show import clean_token
    from engine.errors import UserError
    from engine.store import open_store

    store = open_store(args.store)
    layers = set(parse_ranges(args.layers, store.n_layers, "layer", "--layers")) if args.layers is not None else None
    if args.count < 1:
        raise UserError(f"--count must be at least 1, not {args.count}")
    field = {"score": "score", "random-only": "score_random_only", "rsquared": "rsquared",
             "absolute-dev": "absolute_dev_explained"}[args.by]
    groups = [g for g in res.ResultsGroup.all(args.store)
              if (args.explainer_model is None or g.explainer_model == args.explainer_model)
              and (args.simulator_model is None or g.simulator_model == args.simulator_model)]
    imported = []
    if not groups and args.explainer_model is None and args.simulator_model is None:
        # An imported recording's published explanations (OpenAI's, scored by them): ranked by
        # their score (ev_correlation_score), the best of each neuron.
        from engine.atlas import data

        for layer, index in data.imported_neurons(store):
            if layers is not None and layer not in layers:
                continue
            expls = data.explanations(store, layer, index)
            best = data.best([e for e in expls if e.source == "imported"])
            if best is not None:
                imported.append({"layer": layer, "neuron": index, "explanation": best.text, "status": "scored",
                                 "score": best.score, "key": "imported"})
        if imported and field != "score":
            raise UserError(f"the explanations imported with {args.store} carry only a score: use --by score")
    if not groups and not imported:
        raise UserError(f"no explanations in {args.store}" + (" for those models" if args.explainer_model or
                        args.simulator_model else "") + ": run `neuronatlas explain`, `simulate` and `score` first")
    rows, undefined, unscored, failed = [], 0, 0, 0
    for records in [g.records(layers) for g in groups] + [imported]:
        for rec in records:
            value = rec.get(field)
            if rec.get("status") == "failed":
                failed += 1
            elif rec.get("status") not in ("scored", "never_fires"):
                unscored += 1
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                rows.append((value, rec))
            else:
                undefined += 1
    rows.sort(key=lambda r: (r[0], -r[1]["layer"], -r[1]["neuron"]), reverse=not args.worst)
    rows = rows[: args.count]
    notes = []
    if undefined:
        notes.append(f"{undefined:,} scored neurons have an undefined {args.by} and are not ranked")
    if unscored:
        notes.append(f"{unscored:,} neurons are not scored yet")
    if failed:
        notes.append(f"{failed:,} neurons failed (`neuronatlas show` gives each error; rerun the step with "
                     "--retry-failed to try them again)")
    if args.json:
        for value, rec in rows:
            print(json.dumps({"layer": rec["layer"], "neuron": rec["neuron"], args.by: value,
                              **res.reader_view(rec)}, ensure_ascii=False))
        if notes:  # standard output stays JSON lines; what was left out goes to standard error
            print("; ".join(notes) + ".", file=sys.stderr)
        return 0
    many = len(groups) > 1
    print(f"{'neuron':>10}  {args.by:>11}  {'random':>9}  explanation" + ("  [group]" if many else ""))
    for value, rec in rows:  # explanations are an LLM's text: control characters escaped, as `show` does
        print(f"{rec['layer']:>5}:{rec['neuron']:<4}  {fmt(value):>11}  {fmt(rec.get('score_random_only')):>9}  "
              f"{clean_token(str(rec.get('explanation')), True)}"
              + (f"  [{clean_token(str(rec.get('key')), True)}]" if many else ""))
    if not rows:
        print("(no neuron has a defined score yet: run `neuronatlas score`)")
    if notes:
        print("; ".join(notes) + ".")
    return 0
