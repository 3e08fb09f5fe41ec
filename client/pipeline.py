"""explain -> simulate -> score over many neurons of a store: selection, cost estimate, progress,
resume, and the summary a run ends with.

Each stage walks the selected neurons with a pool of workers sharing one Client (its rate limits,
retries, single-flight and durable request store). A neuron is written to its results file only
once its stage is complete for it; a neuron whose requests were interrupted is left as it was, so
that a rerun does it again, and the request store answers every request that had come back. A
failure that will not go away by asking again (a refusal, a reply that cannot be read, a request
that failed for good) is recorded in the neuron's file, with its reason, and the run goes on.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from client import explain as ex
from client import neurons as sel
from client import prompts
from client import results as res
from client import simulate as sim
from client.scoring import fmt, pearson, pooled, score_simulation
from engine.atlas.data import is_absent
from engine.errors import UserError

STAGES = ("explain", "simulate", "score")
SCORE_KEYS = ("score_random_only", "rsquared", "absolute_dev_explained", "undefined", "calibration", "scoring")
"""What scoring adds to a neuron's file (besides `score` and the candidates' scores)."""


@dataclass
class RunSettings:
    """Everything one explain / simulate / score command takes, flags included."""

    store: str
    """The store directory."""
    layers: str | None = None
    """Layers to cover ('all', '0-3,7'); None = all."""
    neurons: str | None = None
    """Neurons within each layer ('all', '0-99'); None = all."""
    ids: str | None = None
    """A file of LAYER:NEURON lines (instead of layers/neurons)."""
    limit: int | None = None
    """At most this many of the selected neurons (the first ones)."""
    explainer_model: str | None = None
    """Explainer model; None = the store's only results group."""
    simulator_model: str | None = None
    """Simulator model; None = the explainer model (or the only group's)."""
    requests: str | None = None
    """The durable request store; None = STORE/explanations/requests.sqlite."""
    retry_failed: bool = False
    """Redo neurons whose stage failed (and resend dead-lettered requests)."""
    redo: bool = False
    """explain/simulate: redo the neurons finished with other options than this run's."""
    rescore: bool = False
    """score: recompute neurons already scored."""
    dry_run: bool = False
    """Print the selection and the cost estimate, send nothing, write nothing."""
    max_cost: float | None = None
    """Refuse to start when the estimated cost is above this (USD)."""
    allow_incomplete: bool = False
    """Work on a store whose recording has not finished."""
    concurrency: int | None = None
    """Neurons worked on at once (default: from the client's max in flight)."""
    progress: str = "auto"
    """auto, bar, log or off."""
    durable: bool = True
    """fsync results files."""
    check: bool = True
    """GET /models before sending."""
    excerpts: int = 5
    """explain: top train excerpts shown."""
    n: int = 1
    """explain: explanations sampled per neuron."""
    temperature: float = 1.0
    """explain: temperature."""
    max_tokens: int = 60
    """explain: longest explanation in tokens."""
    sim_mode: str = "auto"
    """simulate: auto or one of simulate.MODES."""
    top_logprobs: int | None = None
    """simulate: alternatives per position (default 5 for completions, 10 for chat)."""
    sim_retries: int = 2
    """simulate: retries of a malformed written-out reply."""
    max_slots: int = 768
    """simulate: all-at-once modes put up to this many subject tokens in one prompt."""
    split: str = "valid"
    """simulate: the split scored (valid or test)."""
    score_top: int = 5
    """simulate: top excerpts of the split scored."""
    score_random: int = 5
    """simulate: random excerpts of the split scored."""
    calibration: bool = True
    """simulate/score: also simulate the calibration split and calibrate R^2 / deviation on it."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Opening and resolving


def open_checked(settings: RunSettings):
    """The store, refused with one clear line when it holds no usable recording."""
    from engine.store import open_store

    path = Path(settings.store)
    if not path.exists():
        raise UserError(f"store {settings.store} not found: record one with `neuronatlas record --out {settings.store}`")
    store = open_store(path)
    if not store.progress.get("checkpoint"):
        raise UserError(f"store {settings.store} holds no recording yet (no checkpoint): let `neuronatlas record` "
                        "run to its first checkpoint, or to the end")
    if not store.complete and not settings.allow_incomplete:
        raise UserError(f"the recording in {settings.store} is not complete ({store.excerpts_done:,} of "
                        f"{store.run.get('n_excerpts', 0):,} excerpts): finish it by running the same record command "
                        "again, or pass --allow-incomplete to explain its last checkpoint")
    return store


def resolve_group(stage: str, settings: RunSettings) -> res.ResultsGroup:
    """The results group a command works on."""
    groups = res.ResultsGroup.all(settings.store)
    if settings.explainer_model:
        simulator = settings.simulator_model or settings.explainer_model
        group = res.ResultsGroup.for_models(settings.store, settings.explainer_model, simulator, prompts.PROMPT_VERSION)
        if stage != "explain" and not group.exists:
            have = ", ".join(g.key for g in groups) or "none"
            raise UserError(f"no explanations by {settings.explainer_model} (simulator {simulator}, prompts "
                            f"{prompts.PROMPT_VERSION}) in {settings.store} (groups: {have}): run `neuronatlas explain` "
                            "with these models first")
        return group
    if settings.simulator_model:
        groups = [g for g in groups if g.simulator_model == settings.simulator_model]
    if stage != "score":
        groups = [g for g in groups if g.prompt_version == prompts.PROMPT_VERSION]
    if len(groups) == 1:
        return groups[0]
    if not groups:
        if stage == "explain":
            raise UserError("no explainer model given: pass --explainer-model (e.g. gpt-4o-mini)")
        raise UserError(f"no explanations in {settings.store} yet: run `neuronatlas explain {settings.store} "
                        "--explainer-model MODEL` first")
    raise UserError(f"{settings.store} holds results of several models ({', '.join(g.key for g in groups)}): "
                    "pass --explainer-model (and --simulator-model) to choose")


def status_for(stage: str, rec: dict | None, settings: RunSettings) -> str:
    """'todo', 'done' (finished, or failed for good) or 'not_ready' (an earlier stage is missing)."""
    status = rec.get("status") if rec else None
    failed_at = ((rec or {}).get("error") or {}).get("stage")
    if stage == "explain":
        if status is None:
            return "todo"
        return "todo" if status == "failed" and failed_at == "explain" and settings.retry_failed else "done"
    if stage == "simulate":
        if status is None:
            return "not_ready"
        if status == "explained":
            return "todo"
        return "todo" if status == "failed" and failed_at == "simulate" and settings.retry_failed else "done"
    if status in (None, "explained"):
        return "not_ready"
    if status == "simulated":
        return "todo"
    return "todo" if status == "scored" and settings.rescore else "done"


# ---------------------------------------------------------------------------------------------
# One neuron


@dataclass
class Context:
    store: object
    group: res.ResultsGroup
    settings: RunSettings
    client: object = None
    explain: ex.ExplainOptions | None = None
    sim: sim.SimOptions | None = None
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="store-io"))

    async def io(self, fn, *args):
        # One thread for store reads and results writes: zarr reads and fsyncs stay off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def write(self, layer: int, index: int, rec: dict) -> None:
        self.group.write(layer, index, rec, durable=self.settings.durable)


def _failure(stage: str, message: str) -> dict:
    return {"stage": stage, "message": message}


def _common_reason(errors: list[str]) -> str:
    counts = Counter(errors)
    return "; ".join(f"{n} x {e}" if n > 1 else e for e, n in counts.most_common(3))


async def explain_one(ctx: Context, layer: int, index: int) -> tuple[str, str | None]:
    """Explain one neuron; returns (outcome, failure reason)."""
    record = await ctx.io(ctx.store.neuron, layer, index)
    opts = ctx.explain
    if is_absent(record):  # a gap in an imported store: nothing to explain, nothing written
        return "absent", None
    try:
        tokens, values = ex.explain_listing(record, opts)
    except ex.NothingToExplain as exc:
        if exc.never_fires:
            rec = {"status": "never_fires", "explanation": None, "score": None, "score_random_only": None,
                   "undefined": {"score": str(exc)}, "explain": {"options": opts.to_json()}, "candidates": []}
            await ctx.io(ctx.write, layer, index, rec)
            return "never_fires", None
        rec = {"status": "failed", "error": _failure("explain", str(exc)), "explain": {"options": opts.to_json()},
               "candidates": []}
        await ctx.io(ctx.write, layer, index, rec)
        return "failed", str(exc)
    outcome = await ex.explain_neuron(ctx.client, tokens, values, opts)
    if outcome.interrupted:
        return "pending", None
    shown = [r.excerpt_id for r in record.split("train").top[: max(1, opts.excerpts)]]
    explain_info = {"options": opts.to_json(), "shown_excerpts": shown, "requests": outcome.requests,
                    "errors": outcome.errors}
    unique = list(dict.fromkeys(outcome.explanations))
    if not unique:
        reason = _common_reason(outcome.errors)
        rec = {"status": "failed", "error": _failure("explain", reason), "explanation": None, "score": None,
               "explain": explain_info, "candidates": []}
        await ctx.io(ctx.write, layer, index, rec)
        return "failed", reason
    rec = {"status": "explained", "explanation": unique[0], "score": None, "explain": explain_info,
           "candidates": [{"explanation": e} for e in unique]}
    await ctx.io(ctx.write, layer, index, rec)
    return "explained", None


def excerpt_sets(record, settings: RunSettings) -> list[tuple[str, str, object]]:
    """(set, split, ActivationRecord) of every excerpt simulated for a neuron: top and random
    excerpts of the scored split, then of the calibration split."""
    splits = [settings.split] + (["calibration"] if settings.calibration else [])
    out = []
    for split in splits:
        s = record.split(split)
        out += [("top", split, r) for r in s.top[: settings.score_top]]
        out += [("random", split, r) for r in s.random[: settings.score_random]]
    return out


async def simulate_one(ctx: Context, layer: int, index: int) -> tuple[str, str | None]:
    rec = await ctx.io(ctx.group.read, layer, index)
    record = await ctx.io(ctx.store.neuron, layer, index)
    settings = ctx.settings
    items = excerpt_sets(record, settings)
    sim_info = {"options": ctx.sim.to_json(), "split": settings.split, "score_top": settings.score_top,
                "score_random": settings.score_random, "calibration": settings.calibration}
    rec = dict(rec)
    for key in SCORE_KEYS:  # a neuron simulated again (--redo, --retry-failed) is scored again
        rec.pop(key, None)
    rec.update(simulation=sim_info, simulation_mode=ctx.sim.mode, split=settings.split, error=None, score=None)
    candidates = [{"explanation": c["explanation"]} for c in rec.get("candidates") or [] if c.get("explanation")]
    if candidates:
        rec["explanation"] = candidates[0]["explanation"]
    if not any(split == settings.split for _, split, _ in items):
        reason = f"the neuron has no excerpts in the {settings.split} split (record more excerpts)"
        rec.update(status="failed", error=_failure("simulate", reason), candidates=candidates)
        await ctx.io(ctx.write, layer, index, rec)
        return "failed", reason
    excerpts = [list(r.tokens) for _, _, r in items]
    per_set = await asyncio.gather(*(sim.simulate_set(ctx.client, ctx.sim, c["explanation"], excerpts)
                                     for c in candidates))
    jobs = [(c, item) for c in candidates for item in items]
    outcomes = [o for outs in per_set for o in outs]
    if any(o.interrupted for o in outcomes):
        return "pending", None
    per_candidate: dict[int, list] = {id(c): [] for c in candidates}
    for (c, (kind, split, r)), o in zip(jobs, outcomes):
        if o.error is not None:
            c.setdefault("error", f"excerpt {r.excerpt_id} ({split} {kind}): {o.error}")
            continue
        if len(o.values) != len(r.activations):  # never expected: the parsers check the count
            c.setdefault("error", f"excerpt {r.excerpt_id}: {len(o.values)} values for {len(r.activations)} tokens")
            continue
        per_candidate[id(c)].append({"excerpt_id": r.excerpt_id, "split": split, "set": kind,
                                     "true": list(r.activations), "sim": o.values, "requests": o.requests})
    for c in candidates:
        if "error" not in c:
            c["simulation"] = {"excerpts": per_candidate[id(c)]}
    rec["candidates"] = candidates
    if all("error" in c for c in candidates):
        reason = _common_reason([c["error"].split(": ", 1)[-1] for c in candidates])
        rec.update(status="failed", error=_failure("simulate", reason))
        await ctx.io(ctx.write, layer, index, rec)
        return "failed", reason
    rec["status"] = "simulated"
    await ctx.io(ctx.write, layer, index, rec)
    return "simulated", None


def score_record(rec: dict, calibration: bool = True) -> dict:
    """A simulated neuron's file with scores filled in and the best explanation on top. A neuron
    simulated with --no-calibration has no calibration excerpts by design: its R^2 and deviation
    explained are of the raw 0..10 values (as with `score --no-calibration`), not undefined."""
    rec = dict(rec)
    simulation = rec.get("simulation") or {}
    split = simulation.get("split", rec.get("split", "valid"))
    calibration_asked = calibration  # what `score` was told (--no-calibration), kept in the file
    calibration = calibration and simulation.get("calibration", True) is not False
    best = None
    candidates = []
    # Best of n is chosen on the calibration excerpts, not on the scored split: choosing by the
    # reported score would inflate it. Only a neuron simulated without calibration excerpts is
    # chosen on the scored split; a candidate whose calibration correlation is undefined (a
    # constant simulation there) is never preferred to one whose correlation is defined.
    on_calibration = calibration and any(
        e["split"] == "calibration" for c in rec.get("candidates") or []
        for e in (c.get("simulation") or {}).get("excerpts") or [])
    for c in rec.get("candidates") or []:
        c = dict(c)
        excerpts = (c.get("simulation") or {}).get("excerpts")
        if excerpts:
            def pairs(where, kind=None):
                return [(e["true"], e["sim"]) for e in excerpts
                        if e["split"] == where and (kind is None or e["set"] == kind)]
            cal = pairs("calibration") if calibration and any(e["split"] == "calibration" for e in excerpts) else None
            if calibration and cal is None:
                cal = []  # asked for, but not simulated: R^2 undefined, with the reason
            c["scores"] = score_simulation(pairs(split, "top"), pairs(split, "random"), cal).to_json()
            if on_calibration:
                on_cal = pearson(*pooled(cal)) if cal else float("nan")
                c["selection_score"] = None if math.isnan(on_cal) else on_cal
            else:
                c["selection_score"] = c["scores"]["score"]
            s = c["selection_score"]
            if best is None or (s is not None and (best["selection_score"] is None or s > best["selection_score"])):
                best = c
        candidates.append(c)
    rec["candidates"] = candidates
    if best is None:
        return rec
    scores = best["scores"]
    rec.update(status="scored", explanation=best["explanation"], score=scores["score"],
               score_random_only=scores["score_random_only"], rsquared=scores["rsquared"],
               absolute_dev_explained=scores["absolute_dev_explained"], undefined=scores["undefined"] or None,
               calibration=scores["calibration"], scoring={"calibration": calibration_asked})
    return rec


# ---------------------------------------------------------------------------------------------
# Progress


class NeuronProgress:
    """One bar over neurons (requests, rates and cost from the client beside it), or a log line every
    10 seconds when stderr is not a terminal."""

    def __init__(self, client, total: int, mode: str, label: str):
        from client.progress import Progress

        self.total = total
        self.label = label
        self.done = 0
        self.failed = 0
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._requests = Progress(client, None, mode="off") if client is not None else None
        self._bar = None
        self._task = None
        self._last = time.monotonic()

    def start(self) -> None:
        if self.mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, unit="neuron", desc=self.label, file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.5, smoothing=0.05)
        if self.mode in ("bar", "log"):
            self._task = asyncio.create_task(self._loop())

    def status(self) -> str:
        out = f"{self.failed:,} neurons failed"
        if self._requests is not None:
            out += "; requests: " + self._requests.status()
        return out

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._bar is not None:
                self._bar.n = self.done
                self._bar.set_postfix_str(self.status(), refresh=False)
                self._bar.refresh()
            elif time.monotonic() - self._last >= 10:
                self._last = time.monotonic()
                say(f"{self.label}: {self.done:,}/{self.total:,} neurons: {self.status()}")

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            say(line)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.refresh()
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# A whole stage


@dataclass
class StageReport:
    """What a stage did to its neurons."""

    stage: str
    selected: int
    todo: int
    done_before: int
    not_ready: int
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False
    cancelled: int = 0
    """Requests in flight that a second Ctrl-C cancelled (maybe paid; a rerun sends them again)."""
    failed_before: int = 0
    """Of the neurons done already, those whose failure is this stage's (an earlier run's)."""
    failed_earlier: int = 0
    """Neurons this stage cannot do because an earlier stage failed for them (neither done nor to do)."""

    @property
    def failed(self) -> int:
        return self.outcomes["failed"] + self.outcomes["error"]

    @property
    def exit_status(self) -> int:
        """1 when this stage failed for any selected neuron, in this run or an earlier one, else 0: a
        rerun that has nothing left to send still says that its neurons are not all done well."""
        return 1 if self.failed or self.failed_before else 0

    def text(self, group: res.ResultsGroup) -> str:
        from client.progress import duration

        verbs = {"explained": "explained", "simulated": "simulated", "scored": "scored", "never_fires": "never fire",
                 "absent": "have no record (gaps in an imported store; skipped)"}
        parts = [f"{self.outcomes[k]:,} {v}" for k, v in verbs.items() if self.outcomes[k]]
        if self.failed:
            top = "; ".join(f"{n} x {r}" for r, n in self.reasons.most_common(3))
            parts.append(f"{self.failed:,} failed ({top})")
        if self.outcomes["pending"]:
            parts.append(f"{self.outcomes['pending']:,} unfinished (interrupted; a rerun finishes them)")
        line = (f"{self.stage}: {self.selected:,} neurons selected, {self.todo:,} to do in "
                f"{duration(self.seconds)}: " + (", ".join(parts) or "nothing done") + ".")
        if self.done_before:
            line += f" {self.done_before:,} were done already (skipped)"
            if self.failed_before:
                line += (f", {self.failed_before:,} of them failed (`neuronatlas show` gives each error; "
                         "--retry-failed tries them again)")
            line += "."
        if self.failed_earlier:
            line += (f" {self.failed_earlier:,} failed at an earlier stage and cannot be {self.stage}d "
                     "(`neuronatlas show` gives each error; that stage's --retry-failed tries them again).")
        if self.not_ready:
            before = "explain" if self.stage == "simulate" else "explain and simulate"
            line += f" {self.not_ready:,} are not ready (run {before} on them first)."
        return line + f" Results: {group.path}."


def changed_options(stage: str, rec: dict | None, settings: RunSettings) -> list[str]:
    """The options of this run that differ from those the neuron's finished `stage` was made with,
    as 'FLAG was OLD, now NEW' (empty when the stage is not finished, or was made with these)."""
    if not rec:
        return []
    status = rec.get("status")
    out = []
    if stage == "explain":
        if status not in ("explained", "simulated", "scored") and not (
                status == "failed" and (rec.get("error") or {}).get("stage") != "explain"):
            return []
        old = (rec.get("explain") or {}).get("options") or {}
        wanted = [("--excerpts", "excerpts", settings.excerpts), ("--samples", "n", settings.n),
                  ("--temperature", "temperature", settings.temperature), ("--max-tokens", "max_tokens", settings.max_tokens)]
    elif stage == "simulate":
        if status not in ("simulated", "scored"):
            return []
        old = dict(rec.get("simulation") or {})
        old.update({f"sim_{k}": v for k, v in (old.get("options") or {}).items()})
        wanted = [("--split", "split", settings.split), ("--score-top", "score_top", settings.score_top),
                  ("--score-random", "score_random", settings.score_random),
                  ("--no-calibration", "calibration", settings.calibration)]
        if settings.sim_mode != "auto":
            wanted.append(("--sim-mode", "sim_mode", settings.sim_mode))
        if settings.top_logprobs is not None:
            wanted.append(("--top-logprobs", "sim_top_logprobs", settings.top_logprobs))
    elif stage == "score":
        if status != "scored":
            return []
        asked = (rec.get("scoring") or {}).get("calibration")
        old = {} if asked is None else {"calibration": asked}  # files scored before it was kept: no check
        wanted = [("--no-calibration", "calibration", settings.calibration)]
    else:
        return []
    for flag, key, value in wanted:
        if key in old and old[key] != value:
            if flag == "--no-calibration":
                out.append("--no-calibration was " + ("given" if not old[key] else "not given") + ", now "
                           + ("given" if not value else "not"))
            else:
                out.append(f"{flag} was {old[key]}, now {value}")
    return out


def _partition(stage: str, selection, group: res.ResultsGroup, settings: RunSettings):
    """(todo, done, those of the done that failed at this stage, those that failed at an earlier
    stage, not ready, {neuron: changed options}) of the selected neurons. A finished neuron made
    with other options is todo with --redo, else listed in the last item."""
    todo, done, failed, earlier, not_ready, changed = [], 0, 0, 0, 0, {}
    for layer, index in selection:
        rec = group.read(layer, index)
        st = status_for(stage, rec, settings)
        if st == "done" and stage != "explain" and rec.get("status") == "failed" and \
                (rec.get("error") or {}).get("stage") != stage:
            earlier += 1  # not done: an earlier stage failed for it
            continue
        if st == "done":
            diff = changed_options(stage, rec, settings)
            if diff and settings.redo:
                st = "todo"
            elif diff:
                changed[(layer, index)] = diff
        if st == "todo":
            todo.append((layer, index))
        elif st == "done":
            done += 1
            failed += (rec or {}).get("status") == "failed" and (rec.get("error") or {}).get("stage") == stage
        else:
            not_ready += 1
    return todo, done, failed, earlier, not_ready, changed


def _estimate(stage: str, store, group, todo, settings: RunSettings, opts, prices) -> sel.Estimate:
    sample = sel.spread(todo, 8)
    bodies = []
    per_neuron = []
    for layer, index in sample:
        record = store.neuron(layer, index)
        if stage == "explain":
            try:
                tokens, values = ex.explain_listing(record, opts)
            except ex.NothingToExplain:
                per_neuron.append(0)
                continue
            reqs = ex.explain_requests(tokens, values, opts)
        else:
            rec = group.read(layer, index) or {}
            explanations = [c["explanation"] for c in rec.get("candidates") or [] if c.get("explanation")] or ["x" * 40]
            items = excerpt_sets(record, settings)
            excerpts = [list(r.tokens) for _, _, r in items]
            if opts.mode in ("echo", "prompt-logprobs"):
                build = sim.echo_request if opts.mode == "echo" else sim.prompt_logprobs_request
                reqs = [build(opts, explanations[0], [excerpts[i] for i in g])[0] for g in sim.pack(excerpts, opts.max_slots)]
            else:
                reqs = [sim.chat_request(opts, explanations[0], e) for e in excerpts[:4]]
            per_neuron.append((len(reqs) if opts.mode in ("echo", "prompt-logprobs") else len(items)) * len(explanations))
            bodies += [(q.kind, q.body) for q in reqs]
            continue
        per_neuron.append(len(reqs))
        bodies += [(q.kind, q.body) for q in reqs]
    mean = sum(per_neuron) / len(per_neuron) if per_neuron else 0
    return sel.estimate(stage, opts.model, len(todo), bodies, mean, prices)


def run_stage(stage: str, settings: RunSettings, config=None) -> int:
    """Run one command; returns its exit status (0 ok, 1 this stage failed for some selected neuron,
    in this run or an earlier one, 130 interrupted)."""
    if stage not in STAGES:
        raise ValueError(stage)
    store = open_checked(settings)
    selection = sel.select(store.n_neurons, settings.layers, settings.neurons, settings.ids, settings.limit)
    group = resolve_group(stage, settings)
    if settings.split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, not {settings.split!r} (train is what the explainer saw; "
                        "calibration fits the calibration line)")
    todo, done_before, failed_before, failed_earlier, not_ready, changed = _partition(stage, selection, group, settings)
    if changed:
        (layer, index), diff = next(iter(changed.items()))
        verb = {"explain": "explained", "simulate": "simulated", "score": "scored"}[stage]
        again = ("pass --rescore to score them again with these" if stage == "score" else
                 f"pass --redo to {stage} them again with these (their later results are dropped)")
        raise UserError(f"{len(changed):,} of the selected neurons were {verb} with other options (neuron "
                        f"{layer}:{index}: {'; '.join(diff)}): rerun with the options they were made with, or "
                        f"{again}")
    report = StageReport(stage, len(selection), len(todo), done_before, not_ready, failed_before=failed_before,
                         failed_earlier=failed_earlier)
    say(f"{stage}: {len(selection):,} neurons selected in {store.path}; {len(todo):,} to do, {done_before:,} done "
        f"already{f', {failed_earlier:,} failed at an earlier stage' if failed_earlier else ''}"
        f"{f', {not_ready:,} not ready' if not_ready else ''}; results group {group.key}")
    if not todo:
        if not_ready and not done_before and not failed_earlier:
            first = "explain" if stage == "simulate" else "simulate"
            raise UserError(f"none of the {len(selection):,} selected neurons is ready to {stage}: run "
                            f"`neuronatlas {first}` on them first")
        if failed_earlier and not done_before:
            # An earlier stage's failures are that stage's to report (its rerun exits 1); but a run
            # that can do nothing at all says so, as for neurons not ready.
            raise UserError(f"none of the {len(selection):,} selected neurons can be {stage}d: {failed_earlier:,} "
                            f"failed at an earlier stage{f' and {not_ready:,} are not ready' if not_ready else ''} "
                            "(`neuronatlas show` gives each error; that stage's --retry-failed tries them again)")
        say(report.text(group))
        return report.exit_status
    if stage == "score":
        return _score_stage(store, group, todo, settings, report)
    return asyncio.run(_network_stage(stage, store, group, todo, settings, config, report))


def _score_stage(store, group, todo, settings: RunSettings, report: StageReport) -> int:
    if settings.dry_run:
        say(f"score: dry run: would score {len(todo):,} neurons (no requests: scoring reads the simulations)")
        return 0
    start = time.monotonic()
    scores = []
    undefined = Counter()
    with group.lock():
        group.create(settings.durable)
        for layer, index in todo:
            rec = group.read(layer, index)
            new = score_record(rec, settings.calibration)
            if new.get("status") != "scored":  # no candidate with a simulation (cannot happen for 'simulated')
                report.outcomes["error"] += 1
                report.reasons["no simulation to score"] += 1
                continue
            group.write(layer, index, new, durable=settings.durable)
            report.outcomes["scored"] += 1
            if new["score"] is None:
                undefined[(new.get("undefined") or {}).get("score", "undefined")] += 1
            else:
                scores.append((new["score"], layer, index, new["explanation"]))
    report.seconds = time.monotonic() - start
    say(report.text(group))
    if scores:
        values = [s for s, *_ in scores]
        s, layer, index, text = max(scores, key=lambda r: (r[0], -r[1], -r[2]))  # as `top` ranks ties
        say(f"score: mean {statistics.fmean(values):.3f}, median {statistics.median(values):.3f} over "
            f"{len(values):,} neurons; best {layer}:{index} {fmt(s)} {text!r}")
    if undefined:
        say(f"score: {sum(undefined.values()):,} undefined (not zero): "
            + "; ".join(f"{n} x {why}" for why, n in undefined.most_common(3)))
    return report.exit_status


async def _network_stage(stage, store, group, todo, settings: RunSettings, config, report: StageReport) -> int:
    from client.progress import summary
    from client.runner import Client
    from client.store import StoreError
    from client.transport import SetupError

    if config is None:
        raise UserError("no server configured")
    explain_opts = sim_opts = None
    if stage == "explain":
        explain_opts = ex.ExplainOptions(model=group.explainer_model, excerpts=settings.excerpts, n=settings.n,
                                         temperature=settings.temperature, max_tokens=settings.max_tokens)
        for name, value, low in (("--excerpts", settings.excerpts, 1), ("--samples", settings.n, 1),
                                 ("--max-tokens", settings.max_tokens, 1)):
            if value < low:
                raise UserError(f"{name} must be at least {low}, not {value}")
        opts = explain_opts
    else:
        if settings.sim_mode != "auto" and settings.sim_mode not in sim.MODES:
            raise UserError(f"--sim-mode {settings.sim_mode!r}: use auto or one of {', '.join(sim.MODES)}")
        assumed = settings.sim_mode if settings.sim_mode != "auto" else "echo"
        sim_opts = sim.SimOptions(model=group.simulator_model, mode=assumed, retries=settings.sim_retries,
                                  top_logprobs=settings.top_logprobs or 5, max_slots=settings.max_slots)
        opts = sim_opts
    if settings.dry_run:
        est = _estimate(stage, store, group, todo, settings, opts, config.prices)
        note = " (assuming mode echo; chat modes also pay for the values written)" if stage == "simulate" and settings.sim_mode == "auto" else ""
        say(est.text() + note)
        say(f"{stage}: dry run: nothing sent, nothing written")
        return 0

    # Everything that can refuse the run happens before the request store or the results exist:
    # the server check and the mode probe go through a client without a store.
    if settings.check:
        checker = Client(replace(config, store_path=None))
        try:
            await checker.open()
            listed = await checker.check()
        except SetupError as exc:
            raise UserError(str(exc)) from None
        finally:
            await checker.aclose()
        if listed and opts.model not in listed:
            say(f"{stage}: warning: the server does not list {opts.model!r} (it lists "
                f"{', '.join(map(str, listed[:5]))}{', ...' if len(listed) > 5 else ''}); requests may fail with 404")
    if stage == "simulate":
        try:
            mode, notes = await sim.choose_mode(config, settings.sim_mode, sim_opts.model, sim_opts.top_logprobs)
        except sim.ModeRefused as exc:
            raise UserError(str(exc)) from None
        for note in notes:
            say(f"simulate: mode {note}")
        sim_opts.mode = mode
        if settings.top_logprobs is None and mode == "chat-logprobs":
            sim_opts.top_logprobs = 10
        say(f"simulate: mode {mode}: {sim.MODE_DESCRIPTIONS[mode]}")
    est = _estimate(stage, store, group, todo, settings, opts, config.prices)
    say(est.text())
    if settings.max_cost is not None and (est.cost is None or not est.cost <= settings.max_cost):
        raise UserError(f"the estimated cost ({'unknown' if est.cost is None else f'${est.cost:.4f}'}) is above "
                        f"--max-cost ${settings.max_cost:g}: select fewer neurons or raise the limit")

    # The group is held before anything is written, the request store included: a run refused
    # because another holds the group leaves nothing behind.
    with group.lock():
        group.create(settings.durable)
        if config.store_path:
            Path(config.store_path).parent.mkdir(parents=True, exist_ok=True)
        client = Client(config)
        try:
            await client.open()
        except (SetupError, StoreError) as exc:
            await client.transport.close()
            raise UserError(str(exc)) from None
        ctx = Context(store, group, settings, client, explain_opts, sim_opts)
        start = time.monotonic()
        try:
            await _workers(stage, ctx, todo, report)
        finally:
            await client.aclose()
            ctx.executor.shutdown(wait=True)
    report.seconds = time.monotonic() - start
    say(report.text(group))
    say(summary(client, report.seconds, stage))
    if client.abort_reason:
        raise UserError(client.abort_reason)
    if report.interrupted or report.outcomes["pending"]:
        say(f"{stage}: interrupted: run the same command again to finish; replies already received are in "
            f"{config.store_path} and will not be paid for again"
            + (f"; the {report.cancelled:,} requests cancelled in flight may have been paid, and are sent again"
               if report.cancelled else ""))
        return 130
    return report.exit_status


async def _workers(stage: str, ctx: Context, todo, report: StageReport) -> None:
    import signal
    import threading

    fn = explain_one if stage == "explain" else simulate_one
    client = ctx.client
    progress = NeuronProgress(client, len(todo), ctx.settings.progress, stage)
    loop = asyncio.get_running_loop()
    first_error: list[str] = []

    def on_signal() -> None:
        report.interrupted = True
        if not client.stopped:
            client.stop()
            progress.write(f"{stage}: interrupted: finishing the requests in flight (Ctrl-C again cancels them)")
        else:
            report.cancelled += client.in_flight
            client.stop(cancel_in_flight=True)

    signals = [signal.SIGINT, signal.SIGTERM] if threading.current_thread() is threading.main_thread() else []
    before = {sig: signal.getsignal(sig) for sig in signals}  # asyncio's removal would leave SIG_DFL
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    items = iter(todo)

    async def worker() -> None:
        for layer, index in items:
            if client.stopped:
                report.outcomes["pending"] += 1
                continue
            try:
                outcome, reason = await fn(ctx, layer, index)
            except Exception as exc:  # one bad neuron must not end the run; nothing is written for it
                outcome, reason = "error", f"{type(exc).__name__}: {exc}"
                if not first_error:
                    first_error.append(reason)
                    progress.write(f"{stage}: neuron {layer}:{index}: unexpected error, skipped: {reason}")
            report.outcomes[outcome] += 1
            if reason:
                report.reasons[reason[:160]] += 1
            if outcome != "pending":
                progress.update(outcome in ("failed", "error"))

    n_workers = ctx.settings.concurrency or max(4, min(256, client.config.max_in_flight))
    progress.start()
    try:
        await asyncio.gather(*(worker() for _ in range(min(n_workers, len(todo)))))
    finally:
        progress.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
            if before[sig] is not None:
                signal.signal(sig, before[sig])
