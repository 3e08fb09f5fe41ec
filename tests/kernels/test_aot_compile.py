"""The kernels compile for Hopper (sm_90) with the installed Triton, through its real compiler and
ptxas, on this GPU-less machine: what the interpreter tests cannot show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is what it does now
    # The GPU's launch shape (BLOCK_N 512, a width divisible by 16 as GPT-2's): its register counts.
    r = subprocess.run([sys.executable, "-m", "kernels.aot_check", "--arch", "90", "--dtype", "bf16", "--block-n", "512",
                        "--neurons", "3072", "--sass"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    lines = [line for line in out if line.startswith("sm_90 ")]
    loops = {line: out[i + 1] for i, line in enumerate(out[:-1]) if line.startswith("sm_90 ")}
    # Every feature combination of the three kernels in bf16 (the CUDA default; the interpreter
    # tests cover the other dtypes). Stored activations: the stream kernel with negatives on/off
    # (2 variants); the excerpt kernel, negatives on/off x before/after the quantile prefix (4);
    # the finish kernel, negatives on/off x 3 launches: the first batches (no quantiles), the rows
    # before the prefix end (no quantiles, the random sample waits for the last launch), the rest
    # (6). Produced activations: 4 activation functions (4 stream variants), sharing the other
    # two kernels' variants.
    stream = [line for line in lines if "_stream_kernel" in line]
    assert sum("ACT=0" in line for line in stream) == 2
    assert {line.split("ACT=")[1][0] for line in stream} == {"0", "1", "2", "3", "4"}
    assert len(stream) == 6
    excerpt = [line for line in lines if "_excerpt_kernel" in line]
    assert len(excerpt) == 4 and all("BLOCK_N=128" in line for line in excerpt)
    assert sum("_finish_kernel" in line for line in lines) == 6
    assert "16 kernel variants compiled for sm_90" in r.stdout
    # What the split into stream and excerpt kernels is for: no barrier (shared-memory layout
    # conversion) inside their loops, and a stream kernel on stored activations small enough for
    # four programs of 128 threads per SM (65,536 registers).
    # Entries are instructions/loads/barriers[/loads before the loop's first store].
    for line in stream + excerpt:
        per_loop = [entry.split("/") for entry in loops[line].split(": ")[1].split(";")[0].split()]
        assert per_loop and all(entry[2] == "0" for entry in per_loop), (line, loops[line])
    # The stream kernel issues all the loads of a loop iteration before its first store: with an
    # activation to compute, storing each token before loading the next kept one load in flight
    # (the compiler does not move a load above a store that may alias it).
    for line in stream:
        per_loop = [entry.split("/") for entry in loops[line].split(": ")[1].split(";")[0].split()]
        assert all(entry[3] == entry[1] for entry in per_loop if len(entry) == 4), (line, loops[line])
        assert "ACT=0" in line or any(len(entry) == 4 and int(entry[1]) >= 8 for entry in per_loop), loops[line]
    for line in stream:
        if "ACT=0" in line:
            assert int(line.split("REG:")[1].split()[0]) <= 128, line
