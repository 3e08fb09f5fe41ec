"""With real prompts, real requests to the test server, real parsing and real scoring: the explainer
finds what a neuron responds to, and the right explanation scores higher than a wrong one, in every
simulation mode."""

from __future__ import annotations

import numpy as np
import pytest

from client import simulate as sim
from client.config import ClientConfig
from client.explain import ExplainOptions, explain_listing, explain_neuron
from client.pipeline import RunSettings, excerpt_sets
from client.runner import Client
from client.scoring import score_simulation
from tests.explain.helpers import synthetic_record

WORDS = [" the", " cat", " dog", " sat", " on", " mat", " a", " red", "."]


def cat_neuron(seed: int):
    """A neuron that fires on ' cat' (about 2.0) and is near silent elsewhere; ' dog' is as common."""
    rng = np.random.default_rng(seed)
    excerpts, acts = [], []
    for _ in range(24):
        toks = [WORDS[i] for i in rng.integers(0, len(WORDS), size=10)]
        a = [2.0 + 0.3 * rng.normal() if t == " cat" else 0.15 * rng.normal() for t in toks]
        excerpts.append(toks)
        acts.append(a)
    order = np.argsort([-max(a) for a in acts], kind="stable")  # top excerpts by maximum, as recorded
    return synthetic_record([excerpts[i] for i in order], [acts[i] for i in order], top=12)


@pytest.mark.parametrize("mode", sim.MODES)
async def test_right_explanation_scores_higher_than_wrong(fake_server, mode):
    record = cat_neuron(seed=int(np.random.default_rng().integers(1 << 30)))
    items = excerpt_sets(record, RunSettings(store="-", score_top=3, score_random=3))
    with fake_server(tokenizer="chunk3") as (server, fake):
        async with Client(ClientConfig(base_url=server.base_url, max_attempts=2)) as client:
            tokens, values = explain_listing(record, ExplainOptions(model="e"))
            found = await explain_neuron(client, tokens, values, ExplainOptions(model="e"))
            assert found.explanations == ['the token "cat"']
            scores = {}
            for explanation in ('the token "cat"', 'the token "dog"'):
                opts = sim.SimOptions(model="s", mode=mode)
                outs = await sim.simulate_set(client, opts, explanation, [list(r.tokens) for _, _, r in items])
                assert all(o.error is None for o in outs), [o.error for o in outs]
                pairs = {(kind, split): [] for kind in ("top", "random") for split in ("valid", "calibration")}
                for (kind, split, r), o in zip(items, outs):
                    pairs[kind, split].append((r.activations, o.values))
                scores[explanation] = score_simulation(pairs["top", "valid"], pairs["random", "valid"],
                                                       pairs["top", "calibration"] + pairs["random", "calibration"])
    right, wrong = scores['the token "cat"'], scores['the token "dog"']
    assert right.score > 0.9 and right.score > (wrong.score if wrong.score is not None else -1.0)
    assert right.rsquared > 0.5 and (wrong.rsquared is None or right.rsquared > wrong.rsquared)
