"""What the explain tests share besides fixtures."""

from __future__ import annotations

from engine.store import ActivationRecord, NeuronId, NeuronRecord


def served(server) -> dict[str, int]:
    """Replies the test server delivered, by request key."""
    return dict(server.snapshot()["served"])


def synthetic_record(excerpts: list[list[str]], activations: list[list[float]], top: int) -> NeuronRecord:
    """A NeuronRecord whose first `top` excerpts are its top excerpts (dealt to splits by rank, as
    the store does) and whose others are its random sample."""
    recs = [ActivationRecord(tokens=list(t), activations=list(a), excerpt_id=i)
            for i, (t, a) in enumerate(zip(excerpts, activations))]
    flat = [a for acts in activations for a in acts]
    return NeuronRecord(
        neuron_id=NeuronId(0, 0), most_positive_activation_records=recs[:top], most_negative_activation_records=None,
        random_sample=recs[top:], random_sample_by_quantile=[], quantile_boundaries=[], quantile_probs=[],
        mean=sum(flat) / len(flat), variance=0.0, skewness=0.0, kurtosis=0.0, min=min(flat), max=max(flat),
        frac_positive=sum(1 for a in flat if a > 0) / len(flat), histogram=[], histogram_range=(0.0, 1.0))
