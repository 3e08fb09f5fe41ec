"""Print the top excerpts of a few neurons of a store (used by `make demo`)."""

from __future__ import annotations

import sys

import numpy as np

from engine.store import open_store


def excerpt_line(tokens: list[str], acts: list[float], scale: float, width: int = 90) -> str:
    """Tokens around the strongest one, the active ones bracketed: [token:activation] where the
    activation is at least half of scale."""
    peak = int(np.argmax(acts))
    lo = max(0, peak - 12)
    tokens, acts = tokens[lo : peak + 12], acts[lo : peak + 12]
    parts = ["..."] if lo else []
    for t, a in zip(tokens, acts):
        t = t.replace("\n", "\\n")
        parts.append(f"[{t}:{a:.2f}]" if scale > 0 and a >= 0.5 * scale else t)
    text = "".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "demo-store"
    s = open_store(path)
    rng = np.random.default_rng(0)
    print(f"\n{s.run['model']['name']}: {sum(s.n_neurons):,} neurons over {s.excerpts_done:,} excerpts\n")
    for layer in (0, s.n_layers // 2, s.n_layers - 1):
        summary = s.layer_summary(layer)
        # The neuron with the largest maximum and one at random.
        for index in (int(np.nanargmax(summary["max"])), int(rng.integers(s.n_neurons[layer]))):
            rec = s.neuron(layer, index)
            print(f"layer {layer} neuron {index}: max {rec.max:.3f} mean {rec.mean:.4f} "
                  f"positive {100 * rec.frac_positive:.1f}% skew {rec.skewness:.2f}")
            top = rec.most_positive_activation_records
            scale = max(max(r.activations) for r in top) if top else 0.0
            for r in top[:3]:
                print(f"  {max(r.activations):7.3f}  {excerpt_line(r.tokens, r.activations, scale)}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
