"""Host time of one layer's update call, the kernels themselves stubbed out.

When the GPU finishes a layer's update faster than the host can issue it, recording is bound by
this Python time, not by the kernels (small batches; see benchmarks/RESULTS.md). The script times
`kernels.triton_update.update_layer` (what the recorder calls in eager mode) and the custom op
`neuronatlas::update_layer_` that a compiled graph calls (on the recorder's state, made of inference
tensors, and on an ordinary state, where torch adds a Python version-counter step), on CPU tensors
with the three Triton kernels replaced by no-ops, so it runs anywhere and measures only the launcher, the dispatcher and
our own Python around them. Each number is the median of --reps calls after 20 warm-up calls.

    python benchmarks/launch_overhead.py [--neurons 3072] [--batch 256] [--reps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from kernels import reference as ref  # noqa: E402
from kernels import triton_update as tu  # noqa: E402


class _Stub:
    """Stands in for a @triton.jit kernel: `k[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _median_us(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neurons", type=int, default=3072)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--excerpt-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args()
    tu._stream_kernel, tu._excerpt_kernel, tu._finish_kernel = _Stub(), _Stub(), _Stub()
    device = torch.device("cpu")
    spec = ref.ReductionSpec(excerpt_len=a.excerpt_len, top_k=50, negatives=False, quantile_prefix=a.batch)
    with torch.inference_mode():  # as in the recorder's loop: activations and batch are inference tensors
        acts = torch.zeros(a.batch, a.excerpt_len, a.neurons, dtype=torch.bfloat16)
        batch, _ = ref.plan_batch(spec, ref.RandomSample.empty(spec, device), a.batch, a.batch, device)

    def state_now():
        state = ref.LayerState.empty(spec, a.neurons, torch.bfloat16, device)
        state.bounds_ready = True  # after the prefix: every feature of the kernels on
        return state

    def op_args(state):
        return (acts, *tu._op_args(state, spec, batch, 0, a.batch, True, True))

    state = state_now()  # ordinary tensors
    with torch.inference_mode():
        inference_state = state_now()  # inference tensors, as the recorder makes them

    def eager():
        inference_state.count = batch.first_id * a.excerpt_len
        tu.update_layer(inference_state, spec, acts, batch)

    result = {"neurons": a.neurons, "batch": a.batch, "reps": a.reps, "torch": torch.__version__}
    with torch.inference_mode():
        result["update_layer_us"] = _median_us(eager, a.reps)
        args = op_args(inference_state)
        result["custom_op_us"] = _median_us(lambda: tu.update_layer_op(*args), a.reps)
        args = op_args(state)
        result["custom_op_ordinary_state_us"] = _median_us(lambda: tu.update_layer_op(*args), a.reps)
    print(f"host time per layer call, kernels stubbed (median of {a.reps}): update_layer (eager recording) "
          f"{result['update_layer_us']:.0f} us; the custom op (compiled graphs) {result['custom_op_us']:.0f} us on "
          f"the recorder's inference tensors, {result['custom_op_ordinary_state_us']:.0f} us on an ordinary state")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
