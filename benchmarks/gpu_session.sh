#!/usr/bin/env bash
# One lent-GPU session in two calls (the device tool's 15 minutes, see benchmarks/RESULTS.md):
#
#   bash benchmarks/gpu_session.sh 1    # parity on the GPU, launch-shape sweep, then GPT-2 and GPT-2 XL
#                                       # eager and compiled, in that order of priority
#   bash benchmarks/gpu_session.sh 2    # what part 1 had no time for, the recording tests on the GPU
#   bash benchmarks/gpu_session.sh 3    # one call after a kernel change: every CUDA test of kernels/,
#                                       # the sweep (new activations per batch, kernels timed apart),
#                                       # then eager and compiled recording of both shapes
#   bash benchmarks/gpu_session.sh diag # where the update's time goes: the three kernels apart
#                                       # (torch.profiler), with and without candidates, stage ablations,
#                                       # Nsight Compute on one launch of each, and GPT-2 eager recording
#   bash benchmarks/gpu_session.sh fused # Nsight Compute on the stream kernel computing tanh-GELU, then
#                                       # GPT-2 compiled recording with and without it
#
# Each step has its own time cap inside the call's DEADLINE (seconds, default 540) and a failed
# step does not stop the next. Logs and JSON go to $OUT (default benchmarks/out/gpu). Part 1 writes
# the sweep's best launch shape to benchmarks/out/best_tuning (kept on a warm machine between calls)
# and every benchmark after it runs with that shape (NEURONATLAS_TRITON_TUNING, recorded in the JSON).
# Packages the GPU image lacks (zarr, numcodecs) come as wheels in .whl (the pinned `pip download`
# in benchmarks/RESULTS.md, "What the next GPU session should do"), installed to /tmp/site.
set -u
part=${1:-1}
OUT=${OUT:-benchmarks/out/gpu}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT" benchmarks/out
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
start=$(date +%s)
log="$OUT/session$part.log"

step() {  # step NAME CAP command...: run with min(CAP, time left) seconds
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - ($(date +%s) - start)))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 15 ]; then
        echo "### $name: skipped, ${left}s left" | tee -a "$log"
        return
    fi
    echo "### $name (cap ${t}s) at $(($(date +%s) - start))s: $*" | tee -a "$log"
    timeout -k 5 "$t" "$@" >>"$log" 2>&1
    echo "### $name: rc=$? at $(($(date +%s) - start))s" | tee -a "$log"
}

if [ -d .whl ] && ! $PY -c "import zarr" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$log" 2>&1 || echo "wheel install failed" | tee -a "$log"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f benchmarks/out/best_tuning ] && export NEURONATLAS_TRITON_TUNING=$(cat benchmarks/out/best_tuning)

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    $PY -c "import sys, torch, triton, transformers, zarr; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__)"
    echo "tuning: ${NEURONATLAS_TRITON_TUNING:-default}"
} 2>&1 | tee -a "$log"

bench() {  # bench NAME CAP record_throughput.py arguments...
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" $PY benchmarks/record_throughput.py --out "$OUT/$name.json" "$@"
}

if [ "$part" = 1 ]; then
    step parity 90 env NEURONATLAS_KERNEL_DEVICE=cuda $PY -m pytest -q -n 8 -p no:cacheprovider \
        tests/kernels/test_update_parity.py tests/kernels/test_activate_parity.py \
        tests/kernels/test_record_triton.py::test_side_stream_recording_equals_default
    step sweep 150 $PY benchmarks/kernel_sweep.py --out "$OUT/kernel_sweep.json"
    if [ -f "$OUT/kernel_sweep.json" ]; then
        $PY - "$OUT/kernel_sweep.json" >benchmarks/out/best_tuning <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "fused_ms" in r and not r.get("ablate")]
if not rows:
    sys.exit(0)
key = lambda r: tuple(sorted(r["tuning"].items()))
best = {}
for r in rows:  # per shape, the fastest update and fused times
    best[r["shape"]] = (min(best.get(r["shape"], (9e9,))[0], r["update_ms"]), min(best.get(r["shape"], (0, 9e9))[1], r["fused_ms"]))
score, seen = {}, {}
for r in rows:
    b = best[r["shape"]]
    score[key(r)] = score.get(key(r), 0) + r["update_ms"] / b[0] + r["fused_ms"] / b[1]
    seen[key(r)] = seen.get(key(r), 0) + 1
full = [k for k in score if seen[k] == max(seen.values())]  # measured on every shape
print(",".join(f"{name}={value}" for name, value in min(full, key=score.get)))
EOF
        [ -s benchmarks/out/best_tuning ] && export NEURONATLAS_TRITON_TUNING=$(cat benchmarks/out/best_tuning)
        echo "tuning chosen by the sweep: ${NEURONATLAS_TRITON_TUNING:-none (default)}" | tee -a "$log"
    fi
    BACKENDS=${BACKENDS:-triton,triton-side,triton-fused,torch}  # triton-side: eager rows only
    bench gpt2_eager 60 --models gpt2 --batch-sizes 256,1024 --modes eager --steps 10 --backends $BACKENDS
    bench gpt2xl_eager 75 --models gpt2-xl --batch-sizes 256 --modes eager --steps 5 --backends $BACKENDS
    bench gpt2_compiled 160 --models gpt2 --batch-sizes 1024 --modes compiled --steps 10 --backends $BACKENDS
    bench gpt2xl_compiled 300 --models gpt2-xl --batch-sizes 256 --modes compiled --steps 5 --backends triton,triton-fused
    [ -f "$OUT/gpt2xl_compiled.json" ] && touch benchmarks/out/gpt2xl_compiled.done
elif [ "$part" = 3 ]; then
    step cuda_tests 150 env NEURONATLAS_KERNEL_DEVICE=cuda $PY -m pytest -q -n 8 -p no:cacheprovider \
        tests/kernels/test_update_parity.py tests/kernels/test_activate_parity.py \
        tests/kernels/test_record_triton.py tests/kernels/test_record_fused.py
    step sweep 100 $PY benchmarks/kernel_sweep.py --split --fresh --configs 512:4:4:8,512:3:4:16,256:4:4:16 \
        --variants 'finish_warps=2,excerpt_rows=8,excerpt_rows=32;excerpt_warps=8' --ablate 31 \
        --out "$OUT/sweep_fresh.json"
    B=${BACKENDS:-triton,triton-fused}
    bench gpt2_eager 50 --models gpt2 --batch-sizes 256,1024 --modes eager --steps 10 --backends $B
    bench gpt2xl_eager 60 --models gpt2-xl --batch-sizes 256 --modes eager --steps 5 --backends $B
    bench gpt2_compiled 130 --models gpt2 --batch-sizes 1024 --modes compiled --steps 10 --backends $B
    bench gpt2xl_compiled 300 --models gpt2-xl --batch-sizes 256 --modes compiled --steps 5 --backends triton
elif [ "$part" = diag ]; then
    step sweep_repeat 100 $PY benchmarks/kernel_sweep.py --split --configs 512:4:4:8 --variants '' \
        --ablate 1,2,4,8,16,31 --out "$OUT/sweep_repeat.json"
    step sweep_fresh 100 $PY benchmarks/kernel_sweep.py --split --fresh --no-fused --configs 512:4:4:8,128:8:4:8 \
        --variants 'finish_block_n=32,finish_warps=2' --ablate 8,4 \
        --out "$OUT/sweep_fresh.json"
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    step ncu 100 "${NCU:-ncu}" --clock-control none --kernel-name regex:'_(stream|excerpt|finish)_kernel' --launch-skip 16 \
        --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SourceCounters $PY benchmarks/kernel_sweep.py --shapes gpt2 --fresh --no-fused --configs 512:4:4:8 \
        --variants '' --ablate '' --reps 3 --layers 2 --out "$OUT/ncu_sweep.json"
    bench gpt2_eager 70 --models gpt2 --batch-sizes 256,1024 --modes eager --steps 10 \
        --backends ${BACKENDS:-triton,triton-side,triton-fused}
elif [ "$part" = fused ]; then
    # Why the stream kernel that computes tanh-GELU takes 0.475 ms per GPT-2 layer (2026-11-27)
    # against 0.147 without it: Nsight Compute on two of its launches (the sweep times the plain
    # update first, 14 stream launches with these arguments, then the fused one), then the two
    # paths under torch.compile.
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    step ncu_fused 120 "${NCU:-ncu}" --clock-control none --kernel-name regex:'_stream_kernel' --launch-skip 18 \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SourceCounters --section MemoryWorkloadAnalysis $PY benchmarks/kernel_sweep.py --shapes gpt2 --fresh \
        --configs 512:4:4:8 --variants '' --ablate '' --reps 3 --layers 2 --out "$OUT/ncu_fused_sweep.json"
    bench gpt2_compiled 130 --models gpt2 --batch-sizes 1024 --modes compiled --steps 10 --backends triton,triton-fused
else
    [ -f benchmarks/out/gpt2xl_compiled.done ] || bench gpt2xl_compiled 300 --models gpt2-xl --batch-sizes 256 --modes compiled \
        --steps 5 --backends triton,triton-fused
    step record_tests 90 env NEURONATLAS_KERNEL_DEVICE=cuda $PY -m pytest -q -n 8 -p no:cacheprovider \
        tests/kernels/test_record_triton.py tests/kernels/test_record_fused.py
fi

echo "=== summary (part $part, $(($(date +%s) - start))s) ==="
grep -E "^(### |  block_n|  batch|gpt2|[0-9]+ passed|FAILED|E  )|^  _(stream|excerpt|finish)_kernel|^    (Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Warp Cycles Per Issued|Block Limit Registers|Waves Per SM)" "$log" | grep -v "^### .*: .*benchmarks" | tail -n 120
for f in "$OUT"/*.json; do
    [ -f "$f" ] || continue
    case "$f" in *sweep*) continue ;; esac
    $PY -c "import json, sys; sys.path.insert(0, '.'); from engine import bench; [print(bench.table(r), end='\n\n') for r in json.load(open('$f'))['runs']]"
done
