"""Fused per-layer update: `kernels.reference.update_layer` in three Triton launches.

The reference folds a batch of activations [B, T, N] into a `LayerState` with sorts, gathers and
float64 copies of the whole tensor. Here the activation tensor is read once, by a streaming kernel;
what depends on each excerpt's maximum runs on the [B, N] maxima (1/T of the bytes), and
everything that depends on the whole batch happens in a third, small kernel:

* `_stream_kernel` (grid: neuron blocks x row splits) reads each excerpt once, token by token,
  and reduces it on the spot: excerpt maximum (and minimum), the power sums of the activations
  around one shift per neuron (float32 within a few tokens, float64 across them), min / max /
  positives / non-finite. Every quantity is a [BLOCK_N] vector whose neurons stay with their
  threads, so no reduction crosses threads: on an H200 this was 3x faster than reducing
  [T, BLOCK_N] tiles along T, which cost a shared-memory round and a barrier per reduction and,
  at BLOCK_N 128, spilled registers (benchmarks/RESULTS.md). It writes each excerpt's maximum
  (and minimum) to a [B, N] scratch, contiguous in N.
* `_excerpt_kernel` (grid: neuron blocks of one neuron per thread x row splits) reads those and
  writes the prefix maxima, the histogram bins (atomic add) and the candidates: an excerpt whose
  maximum beats the neuron's current K-th value (or whose priority beats the current S-th of its
  bucket) is appended to a per-neuron candidate list through an atomic counter. Candidates thin
  out as the lists fill, to about K x B / (excerpts seen) per neuron and batch; a few thousand
  excerpts in, merging them cost 0.16 ms per GPT-2 layer on an H200 against 0.36 for the stream
  kernel (benchmarks/RESULTS.md, 2026-11-27). This work sat in the stream kernel until
  2026-11-27; see `_stream_kernel` for why it moved.
* `_finish_kernel` (grid: neuron blocks) adds the row splits' power sums, centres them once on the
  batch mean and merges that batch set into the state (Pebay), then, only in blocks where some
  neuron has candidates, merges them into the sorted top-K (bottom-K, per-bucket
  bottom-S) lists in exactly the reference's order and copies the per-token activations of the
  admitted excerpts (a re-read of those rows only) into the pool slots that the dropped entries
  free (Pools in `kernels.reference`): no kept row moves. It also writes the rows that enter the
  random sample into the pool slots `Batch.random_rows` names. It resets the candidate counters,
  so the scratch stays ready for the next layer without a memset.

Why the order matches the reference: a stable sort of [state, batch] by (maximum desc) equals the
order (maximum desc, id asc), because state ids are smaller than batch ids. A batch excerpt whose
maximum equals the K-th state value never enters (so the candidate filter is a strict `>`), the
merge takes the state entry on ties, and candidates order among themselves by (value, row).

Nothing reads back to the host: the batch's first excerpt id (hence the token count before the
batch, first_id * T, and the prefix rows) is read from `Batch.ids` on the device. The only host-side
step is `set_boundaries` (the reference's torch code) when the prefix completes inside a batch: that
batch is processed as two launch triples, rows before and after the prefix end.

The op is registered with `torch.library.custom_op` (it mutates the state tensors in place), so a
`torch.compile`d model calls it inside its graph; `update_layer_in_graph` is that entry point.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels were defined for Triton's CPU interpreter (read when this module loads)."""

# ---------------------------------------------------------------------------------------------
# Kernel 1: stream the activations once


@triton.jit
def _pebay(na, ma, m2a, m3a, m4a, nb, mb, m2b, m3b, m4b):
    """Merge two sets' (count, mean, M2, M3, M4) in float64: Pebay (2008), as in the reference.
    Where the counts are scalars (the stream kernel) every division is by a scalar: one reciprocal
    per merge, then multiplications, instead of float64 divisions per neuron."""
    n = na + nb
    r = 1.0 / n
    delta = mb - ma
    mean = ma + delta * (nb * r)
    m2 = m2a + m2b + delta * delta * (na * nb * r)
    m3 = (m3a + m3b + delta * delta * delta * (na * nb * (na - nb) * r * r)
          + 3.0 * r * delta * (na * m2b - nb * m2a))
    m4 = (m4a + m4b + delta * delta * delta * delta * (na * nb * (na * na - na * nb + nb * nb) * r * r * r)
          + 6.0 * r * r * delta * delta * (na * na * m2b + nb * nb * m2a)
          + 4.0 * r * delta * (na * m3b - nb * m3a))
    return mean, m2, m3, m4


@triton.jit
def _centre(s1, s2, s3, s4, shift, n):
    """(mean, M2, M3, M4) of n values from their power sums s_k = sum (x - shift)^k, in float64."""
    u = s1 * (1.0 / n)
    mean = shift.to(tl.float64) + u
    m2 = s2 - n * u * u
    m3 = s3 - 3.0 * u * s2 + 2.0 * n * u * u * u
    m4 = s4 - 4.0 * u * s3 + 6.0 * u * u * s2 - 3.0 * n * u * u * u * u
    return mean, m2, m3, m4


ACT_NONE, ACT_GELU_TANH, ACT_GELU_ERF, ACT_SILU_MUL, ACT_GELU_TANH_MUL = 0, 1, 2, 3, 4
"""What the stream kernel applies to its input before reducing it (`ACTIVATIONS` names them)."""

ACTIVATIONS = {"gelu_tanh": ACT_GELU_TANH, "gelu": ACT_GELU_ERF, "silu_mul": ACT_SILU_MUL,
               "gelu_tanh_mul": ACT_GELU_TANH_MUL}
"""Activation functions the kernel can compute where the activation is produced: GELU with the
tanh approximation (GPT-2's gelu_new) or with erf (GPT-NeoX), and the gated products
act(gate) * up with SiLU (Llama, Mistral, Qwen) or tanh-GELU (Gemma)."""


_HW_ROUND = tl.constexpr(not INTERPRET)
"""Whether float32 -> bfloat16 goes through the hardware's conversion (round to nearest even, one
instruction per pair), or, in the interpreter, which truncates it, through integer arithmetic."""


@triton.jit
def _gelu_tanh(z):
    # z/2 (1 + tanh(w)) = z sigmoid(2w) = z / (1 + exp(-2w)): one exponential and one division,
    # with no cancellation in the negative tail (PyTorch's 1 + tanh(w) cancels there; see
    # tests/kernels/test_activate_parity.py for the tolerance). exp overflows to inf for very
    # negative z: the result is -0. The division is the approximate one (2 ulp, a reciprocal and
    # a product on sm_90, against about ten instructions and a branch for the IEEE one).
    # exp(-2w) = 2^(z (-c - 0.044715 c z^2)) with c = 2 sqrt(2/pi) log2(e), constants folded.
    e = tl.exp2(z * (-2.302208198144325 - 0.1029432395800235 * (z * z)))
    return tl.fdiv(z, 1.0 + e, ieee_rounding=False)


@triton.jit
def _round(a, OUT: tl.constexpr):
    """float32 -> OUT, rounding to nearest even. For bfloat16 in the interpreter in integer
    arithmetic: Triton's interpreter truncates that conversion, and this way both the interpreter
    and the compiled kernel round as PyTorch does."""
    if OUT == tl.bfloat16 and not _HW_ROUND:
        bits = a.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(a != a, 0x7FC0, bits)  # NaN stays NaN (the carry could make it inf)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return a.to(OUT)


@triton.jit
def _activate(z, u, ACT: tl.constexpr, OUT: tl.constexpr):
    """act(z) (times u for the gated kinds) in float32, rounded once to OUT; in the gated kinds
    act(z) is rounded to OUT before the product, as eager PyTorch's two kernels do."""
    if ACT == 1:
        a = _gelu_tanh(z)
    elif ACT == 2:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        silu = tl.fdiv(z, 1.0 + tl.exp2(-1.4426950408889634 * z), ieee_rounding=False)  # z sigmoid(z)
        a = _round(silu, OUT).to(tl.float32) * u
    else:
        a = _round(_gelu_tanh(z), OUT).to(tl.float32) * u
    return _round(a, OUT)


@triton.jit
def _token(xp, up, t, sxt, sut, mask, ACT: tl.constexpr, OUT: tl.constexpr):
    """Token t of one excerpt as float32 activations ([BLOCK_N] neurons). With ACT, xp points at
    the pre-activations (up at the up projection), and the activation is computed and rounded to
    OUT, as the model reads it (`_chunk` writes it there)."""
    z = tl.load(xp + t * sxt, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        return z
    else:
        u = z
        if ACT >= 3:
            u = tl.load(up + t * sut, mask=mask, other=0.0).to(tl.float32)
        return _activate(z, u, ACT, OUT).to(tl.float32)


@triton.jit
def _chunk(xb, ub, yb, t0, sxt, sut, syt, nmask, zeros_n, T, shift, emax, emin, pos, s1, s2, s3, s4,
           CHUNK: tl.constexpr, ACT: tl.constexpr, OUT: tl.constexpr, SUMS: tl.constexpr, EVEN: tl.constexpr):
    """Tokens t0 .. t0 + CHUNK - 1 of one excerpt folded into its maximum, minimum, positives and
    the power sums of d = x - shift (float32 over the chunk, added to the float64 sums). The
    CHUNK loads are unrolled so that they are in flight together. EVEN (CHUNK divides T): every
    token of the chunk exists, and no per-element select guards the tail (1.3 of the 16 SASS
    instructions per element, sm_90).

    With ACT the chunk's loads are all issued (into tuples) before the first activation is
    stored: the compiler cannot move a load above a store to a pointer that might alias it, so
    loading, activating and storing one token at a time kept one load in flight per thread,
    the next token's load waiting behind the previous token's store (sm_90, Triton 3.6: one LDG
    per STG through the loop; the H200 read and wrote a GPT-2 layer in 0.475 ms, against 0.147
    for the plain read)."""
    a1 = tl.zeros(emax.shape, dtype=tl.float32)
    a2 = tl.zeros(emax.shape, dtype=tl.float32)
    a3 = tl.zeros(emax.shape, dtype=tl.float32)
    a4 = tl.zeros(emax.shape, dtype=tl.float32)
    zs = ()
    us = ()
    if ACT != 0:
        for j in tl.static_range(CHUNK):
            t = t0 + j
            mask = nmask
            if not EVEN:
                mask = nmask & ((zeros_n + t) < T)
            zs = zs + (tl.load(xb + t * sxt, mask=mask, other=0.0).to(tl.float32),)
            if ACT >= 3:
                us = us + (tl.load(ub + t * sut, mask=mask, other=0.0).to(tl.float32),)
    for j in tl.static_range(CHUNK):
        t = t0 + j
        live = (zeros_n + t) < T  # a vector: Triton 3.9's interpreter refuses a scalar in a mask
        if ACT == 0:
            if EVEN:
                x = _token(xb, ub, t, sxt, sut, nmask, ACT, OUT)
            else:
                x = _token(xb, ub, t, sxt, sut, nmask & live, ACT, OUT)
        else:
            z = zs[j]
            u = z
            if ACT >= 3:
                u = us[j]
            a = _activate(z, u, ACT, OUT)
            if EVEN:
                tl.store(yb + t * syt, a, mask=nmask)
            else:
                tl.store(yb + t * syt, a, mask=nmask & live)
            x = a.to(tl.float32)  # the statistics are those of what the model reads
        if EVEN:
            emax = tl.maximum(emax, x)
            emin = tl.minimum(emin, x)
            pos += (x > 0).to(tl.int32)  # masked loads give 0: never positive
            d = x - shift
        else:
            emax = tl.where(live, tl.maximum(emax, x), emax)
            emin = tl.where(live, tl.minimum(emin, x), emin)
            pos += (live & (x > 0)).to(tl.int32)
            d = tl.where(live, x - shift, 0.0)
        if SUMS:
            d2 = d * d
            a1 += d
            a2 += d2
            a3 += d2 * d
            a4 += d2 * d2
    return emax, emin, pos, s1 + a1.to(s1.dtype), s2 + a2.to(s2.dtype), s3 + a3.to(s3.dtype), s4 + a4.to(s4.dtype)


@triton.jit(do_not_specialize=["row_lo", "row_hi", "rows_per_split", "n_splits"])
def _stream_kernel(
    x_ptr, sxb, sxt,  # activations [B, T, N] (pre-activations with ACT), neuron stride 1
    ids_ptr, mom_ptr,  # [B] excerpt ids, the state's moments [N, 4]
    pmom_ptr, pmm_ptr, pint_ptr,  # partials: [4, splits, N] f64, [3, splits, N] f32, [2, splits, N] i32
    emax_ptr, emin_ptr,  # [B, N]: each excerpt's maximum and minimum (exact in the activations' dtype)
    flag_ptr,
    u_ptr, sub, sut,  # with a gated ACT: the up projection [B, SKIP + T, N]
    y_ptr, syb, syt,  # with ACT: where the activations go [B, SKIP + T, N]
    N, T, row_lo, row_hi, rows_per_split, n_splits,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, NEG: tl.constexpr,
    ACT: tl.constexpr, SKIP: tl.constexpr, ABLATE: tl.constexpr, EVEN: tl.constexpr,
):
    """With ACT = 0, x holds the activations. Otherwise x holds the pre-activations (the gate,
    with a gated ACT), [B, SKIP + T, N]: the kernel computes the activations, writes them all to y
    (the first SKIP tokens of each excerpt too: a BOS the model sees but the statistics skip),
    and reduces the T after the skipped ones exactly as it reduces stored activations.

    Per excerpt it writes only the maximum (and minimum) of each neuron, contiguous in N: what
    depends on an excerpt's maximum (candidates, histogram, quantile bucket, prefix) happens in
    `_excerpt_kernel`. Scattered stores and atomics here would make Triton convert the block's
    [BLOCK_N] vectors to one element per thread through shared memory, about 20 barriers per
    excerpt, and their addresses and thresholds held about 100 registers per thread (sm_90,
    Triton 3.6, BLOCK_N 512: 228 registers with them, 124 without; `python -m kernels.aot_check
    --sass`)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    # The flag is written by the finish kernel only where a block saw a non-finite value.
    if (pid_n == 0) & (pid_s == 0):
        tl.store(flag_ptr, 0)

    first_id = tl.load(ids_ptr)
    r0 = row_lo + pid_s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, row_hi)

    vmin = tl.full([BLOCK_N], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_N], float("-inf"), tl.float32)
    pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    zeros_n = tl.zeros([BLOCK_N], dtype=tl.int32)

    # Every quantity is a [BLOCK_N] vector over the block's neurons, and an excerpt is read one
    # token (one row of BLOCK_N neurons) at a time, CHUNK tokens per unrolled step so that their
    # loads are in flight together: each neuron stays with the thread that owns it, and no
    # reduction crosses threads.
    x_row = x_ptr + n64
    u_row = u_ptr + n64
    y_row = y_ptr + n64
    if ACT != 0:
        x_row += SKIP * sxt
        u_row += SKIP * sut
        y_row += SKIP * syt
    # Moments: every split sums the powers of d = x - shift with one shift per neuron, the same in
    # all splits of the launch: the state's running mean once it has seen tokens, else the mean of
    # the launch's first excerpt. The finish kernel adds the splits' sums and centres them once on
    # the batch mean (float64), so no split merges anything. Re-centring multiplies the float32
    # sums' rounding by powers of |batch mean - shift|: the running mean is close to every later
    # batch's mean, and an excerpt's mean is closer to its batch's than a single activation, which
    # could sit in a tail (the shift until 2026-11-27: a float16 GELU-gated case then exceeded
    # the test's tolerance on 5% of seeds).
    shift = tl.load(mom_ptr + n64 * 4, mask=nmask, other=0.0).to(tl.float32)  # the running mean
    if first_id + row_lo == 0:
        x0 = x_row + tl.cast(row_lo, tl.int64) * sxb
        u0 = u_row + tl.cast(row_lo, tl.int64) * sub
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(0, T):
            acc += _token(x0, u0, t, sxt, sut, nmask, ACT, y_ptr.dtype.element_ty)
        shift = acc / T
    shift = tl.where(nmask & (shift == shift), shift, 0.0)
    if (ABLATE & 1) != 0:  # diagnostic: float32 running sums, no float64 arithmetic
        s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        s3 = tl.zeros([BLOCK_N], dtype=tl.float32)
        s4 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        s1 = tl.zeros([BLOCK_N], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_N], dtype=tl.float64)
        s3 = tl.zeros([BLOCK_N], dtype=tl.float64)
        s4 = tl.zeros([BLOCK_N], dtype=tl.float64)

    # This split's slot in the partials: plane k of [k, splits, N] starts at k * plane.
    plane = tl.cast(n_splits, tl.int64) * N
    base = pid_s.to(tl.int64) * N + n64
    if pid_s == 0:
        tl.store(pmm_ptr + 2 * plane + n64, shift, mask=nmask)
    for b in range(r0, r1):
        b64 = tl.cast(b, tl.int64)
        xb = x_row + b64 * sxb
        ub = u_row + b64 * sub
        yb = y_row + b64 * syb
        # The model sees the first SKIP tokens (a BOS); the statistics skip them. Their loads go
        # out with the first chunk's and their stores after the last chunk's (see `_chunk`).
        zskip = ()
        uskip = ()
        if ACT != 0:
            for j in tl.static_range(SKIP):
                zskip = zskip + (tl.load(xb + (j - SKIP) * sxt, mask=nmask, other=0.0).to(tl.float32),)
                if ACT >= 3:
                    uskip = uskip + (tl.load(ub + (j - SKIP) * sut, mask=nmask, other=0.0).to(tl.float32),)
        # Power sums: float32 within a chunk of tokens, float64 across chunks.
        emax = tl.full([BLOCK_N], float("-inf"), tl.float32)
        emin = tl.full([BLOCK_N], float("inf"), tl.float32)
        for t0 in range(0, T, CHUNK):
            emax, emin, pos, s1, s2, s3, s4 = _chunk(
                xb, ub, yb, t0, sxt, sut, syt, nmask, zeros_n, T, shift, emax, emin, pos, s1, s2, s3, s4,
                CHUNK, ACT, y_ptr.dtype.element_ty, (ABLATE & 16) == 0, EVEN)
        if ACT != 0:
            for j in tl.static_range(SKIP):
                z = zskip[j]
                u = z
                if ACT >= 3:
                    u = uskip[j]
                tl.store(yb + (j - SKIP) * syt, _activate(z, u, ACT, y_ptr.dtype.element_ty), mask=nmask)
        vmax = tl.maximum(vmax, emax)
        vmin = tl.minimum(vmin, emin)
        tl.store(emax_ptr + b64 * N + n64, emax.to(emax_ptr.dtype.element_ty), mask=nmask)
        if NEG:
            tl.store(emin_ptr + b64 * N + n64, emin.to(emin_ptr.dtype.element_ty), mask=nmask)

    # A NaN or an infinity anywhere in the split makes its sum non-finite (as the reference's s1).
    bad = ((s1 != s1) | (tl.abs(s1) == float("inf"))).to(tl.int32)
    tl.store(pmom_ptr + base, s1.to(tl.float64), mask=nmask)
    tl.store(pmom_ptr + plane + base, s2.to(tl.float64), mask=nmask)
    tl.store(pmom_ptr + 2 * plane + base, s3.to(tl.float64), mask=nmask)
    tl.store(pmom_ptr + 3 * plane + base, s4.to(tl.float64), mask=nmask)
    tl.store(pmm_ptr + base, vmin, mask=nmask)
    tl.store(pmm_ptr + plane + base, vmax, mask=nmask)
    tl.store(pint_ptr + base, pos, mask=nmask)
    tl.store(pint_ptr + plane + base, bad, mask=nmask)


# ---------------------------------------------------------------------------------------------
# Kernel 2: what depends on each excerpt's maximum


@triton.jit
def _bucket(em, qbounds_ptr, qprio_ptr, n64, nmask, Q: tl.constexpr, S: tl.constexpr):
    """Each neuron's quantile bucket of the maximum em, and that bucket's current S-th priority.
    The boundaries are re-read from the cache (a block's are a few KB) rather than held in
    registers."""
    bucket = tl.zeros(em.shape, dtype=tl.int32)
    for q in tl.static_range(Q - 1):
        bq = tl.load(qbounds_ptr + n64 * (Q - 1) + q, mask=nmask, other=float("inf"))
        bucket += (em >= bq).to(tl.int32)
    t_q = tl.load(qprio_ptr + n64 * (Q * S) + bucket * S + (S - 1), mask=nmask, other=0)
    return bucket, t_q


@triton.jit(do_not_specialize=["row_lo", "row_hi", "rows_per_split"])
def _excerpt_kernel(
    emax_ptr, emin_ptr,  # [B, N], from the stream kernel
    ids_ptr, bqprio_ptr,  # [B] excerpt ids, [B] quantile priorities
    top_max_ptr, neg_min_ptr, prefix_ptr, qbounds_ptr, qprio_ptr, hist_ptr, hrange_ptr,
    cnt_ptr, ctop_val_ptr, ctop_row_ptr, cneg_val_ptr, cneg_row_ptr, cq_row_ptr, cq_tag_ptr,
    N, P, row_lo, row_hi, rows_per_split,
    K: tl.constexpr, BLOCK_N: tl.constexpr, RB: tl.constexpr,
    NEG: tl.constexpr, HIST: tl.constexpr, QUANT: tl.constexpr,
    Q: tl.constexpr, S: tl.constexpr, H: tl.constexpr, ABLATE: tl.constexpr,
):
    """What depends on each excerpt's maximum (minimum), for rows row_lo .. row_hi of the batch:
    the prefix maxima, the histogram bin (atomic add), and the candidates of the top-K, bottom-K
    and quantile lists, appended to per-neuron lists that the finish kernel merges. An excerpt is
    a top-K candidate when its maximum is strictly above the neuron's K-th value (ties lose to
    older excerpts), a quantile candidate when its priority is below the S-th of its bucket.

    On a GPU, BLOCK_N is 32 x warps (one neuron per thread), so that the scattered stores and
    atomics keep the layout of the loads. Rows go RB at a time: the first pass loads their
    maxima together and counts each neuron's candidates, one atomic per list reserves their slots,
    and the second pass writes them (the maxima come back from the L1 cache)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    zeros_n = tl.zeros([BLOCK_N], dtype=tl.int32)
    first_id = tl.load(ids_ptr)
    prefix_rows = tl.minimum(tl.maximum(P - first_id, 0), row_hi)
    r0 = row_lo + pid_s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, row_hi)
    TOP: tl.constexpr = (ABLATE & 8) == 0
    DO_HIST: tl.constexpr = HIST and (ABLATE & 2) == 0
    DO_QUANT: tl.constexpr = QUANT and (ABLATE & 4) == 0
    tl.static_assert(RB <= 32, "one bit per row of a group in an int32 mask")
    QB: tl.constexpr = max(1, (Q - 1).bit_length())  # bits of a bucket number
    PACK: tl.constexpr = RB * QB <= 31  # the group's buckets fit one int32: pass 2 need not recompute them

    # Masked-out neurons get thresholds that nothing beats.
    kth = tl.load(top_max_ptr + n64 * K + (K - 1), mask=nmask, other=float("inf"))
    if NEG:
        nkth = tl.load(neg_min_ptr + n64 * K + (K - 1), mask=nmask, other=float("-inf"))
    if DO_HIST:
        lo = tl.load(hrange_ptr + n64 * 2, mask=nmask, other=0.0)
        hi = tl.load(hrange_ptr + n64 * 2 + 1, mask=nmask, other=1.0)

    for g0 in range(r0, r1, RB):
        # Pass 1: which of the RB rows are candidates (bit i of a mask per neuron), and how many.
        m_top = zeros_n
        m_neg = zeros_n
        m_q = zeros_n
        q_b = zeros_n  # with PACK, each row's bucket in QB bits
        n_top = zeros_n
        n_neg = zeros_n
        n_q = zeros_n
        for i in tl.static_range(RB):
            b = g0 + i
            live = nmask & ((zeros_n + b) < r1)
            at = tl.cast(b, tl.int64) * N + n64
            em = tl.load(emax_ptr + at, mask=live, other=float("-inf")).to(tl.float32)
            if TOP:
                c = live & (em > kth)
                m_top |= c.to(tl.int32) << i
                n_top += c.to(tl.int32)
            if NEG and TOP:
                en = tl.load(emin_ptr + at, mask=live, other=float("inf")).to(tl.float32)
                c = live & (en < nkth)
                m_neg |= c.to(tl.int32) << i
                n_neg += c.to(tl.int32)
            if DO_QUANT:
                bucket, t_q = _bucket(em, qbounds_ptr, qprio_ptr, n64, live, Q, S)
                prio = tl.load(bqprio_ptr + tl.minimum(b, r1 - 1))  # rows past r1 are not live
                c = live & ((zeros_n + b) >= prefix_rows) & (prio < t_q)
                m_q |= c.to(tl.int32) << i
                n_q += c.to(tl.int32)
                if PACK:
                    q_b |= bucket << (i * QB)
        # One atomic per list and neuron reserves the slots of the group's candidates.
        if TOP:
            s_top = tl.atomic_add(cnt_ptr + offs_n, n_top, mask=n_top > 0, sem="relaxed")
        if NEG and TOP:
            s_neg = tl.atomic_add(cnt_ptr + N + offs_n, n_neg, mask=n_neg > 0, sem="relaxed")
        if DO_QUANT:
            s_q = tl.atomic_add(cnt_ptr + 2 * N + offs_n, n_q, mask=n_q > 0, sem="relaxed")
        # Pass 2: write the candidates, the histogram bins and the prefix maxima.
        for i in tl.static_range(RB):
            b = g0 + i
            b64 = tl.cast(b, tl.int64)
            live = nmask & ((zeros_n + b) < r1)
            em = tl.load(emax_ptr + b64 * N + n64, mask=live, other=float("-inf")).to(tl.float32)
            if TOP:
                c = ((m_top >> i) & 1) != 0
                slot = s_top.to(tl.int64)
                tl.store(ctop_val_ptr + slot * N + n64, em, mask=c)
                tl.store(ctop_row_ptr + slot * N + n64, zeros_n + b, mask=c)
                s_top += c.to(tl.int32)
            if NEG and TOP:
                c = ((m_neg >> i) & 1) != 0
                en = tl.load(emin_ptr + b64 * N + n64, mask=c, other=float("inf")).to(tl.float32)
                slot = s_neg.to(tl.int64)
                tl.store(cneg_val_ptr + slot * N + n64, en, mask=c)
                tl.store(cneg_row_ptr + slot * N + n64, zeros_n + b, mask=c)
                s_neg += c.to(tl.int32)
            post = (zeros_n + b) >= prefix_rows
            tl.store(prefix_ptr + n64 * P + (first_id + b), em, mask=live & ~post)
            if DO_HIST:
                # IEEE division (not the approximate one) so that bins equal torch's bit for bit.
                f = tl.floor(tl.math.div_rn(em - lo, hi - lo) * H)
                f = tl.minimum(tl.maximum(f, 0.0), H - 1.0)
                f = tl.where(f == f, f, 0.0)  # NaN (the batch is flagged): any bin, never a wild address
                h = f.to(tl.int32) + 1
                h = tl.where(em < lo, 0, h)
                h = tl.where(em > hi, H + 1, h)
                tl.atomic_add(hist_ptr + n64 * (H + 2) + h, 1, mask=live & post, sem="relaxed")
            if DO_QUANT:
                c = ((m_q >> i) & 1) != 0
                if PACK:
                    bucket = (q_b >> (i * QB)) & ((1 << QB) - 1)
                else:
                    bucket, t_q = _bucket(em, qbounds_ptr, qprio_ptr, n64, c, Q, S)
                slot = s_q.to(tl.int64)
                tl.store(cq_row_ptr + slot * N + n64, zeros_n + b, mask=c)
                tl.store(cq_tag_ptr + slot * N + n64, bucket, mask=c)
                s_q += c.to(tl.int32)


# ---------------------------------------------------------------------------------------------
# Kernel 3: merge the partials and the candidates


@triton.jit
def _candidates(cand_key_ptr, cand_row_ptr, cand_tag_ptr, bkey_ptr, c0, cnt, nmask, n64, N, offs_g, SENT,
                CB: tl.constexpr, NEGATE: tl.constexpr, KEY_FROM_ROW: tl.constexpr, HAS_TAG: tl.constexpr):
    """Candidates c0 .. c0 + CB - 1 of each neuron as [BLOCK_N, 1, CB] keys and rows, and the mask
    [BLOCK_N, G_PAD, CB] of those that exist and belong to list g."""
    cc = c0 + tl.arange(0, CB)
    cm = nmask[:, None] & (cc[None, :] < cnt[:, None])
    cptr = cc[None, :].to(tl.int64) * N + n64[:, None]
    crow = tl.load(cand_row_ptr + cptr, mask=cm, other=1073741824)
    if KEY_FROM_ROW:
        ck = tl.load(bkey_ptr + crow, mask=cm, other=SENT)
    elif NEGATE:
        ck = -tl.load(cand_key_ptr + cptr, mask=cm, other=float("-inf"))
    else:
        ck = tl.load(cand_key_ptr + cptr, mask=cm, other=SENT)
    cm3 = cm[:, None, :]
    if HAS_TAG:
        ctag = tl.load(cand_tag_ptr + cptr, mask=cm, other=-1)
        cm3 = cm3 & (ctag[:, None, :] == offs_g[None, :, None])
    return ck[:, None, :], crow[:, None, :], cm3


@triton.jit
def _next_candidate(ck3, cr3, cm3, prev_key, prev_row, best_key, best_row, SENT):
    """The smallest (key, row) among candidates (ck3, cr3, cm3) after (prev_key, prev_row), per
    neuron and list, folded into (best_key, best_row)."""
    after = cm3 & ((ck3 > prev_key[:, :, None]) | ((ck3 == prev_key[:, :, None]) & (cr3 > prev_row[:, :, None])))
    kk = tl.where(after, ck3, SENT)
    kmin = tl.min(kk, axis=2)
    rmin = tl.min(tl.where(after & (kk == kmin[:, :, None]), cr3, 1073741824), axis=2)
    better = (kmin < best_key) | ((kmin == best_key) & (rmin < best_row))
    return tl.where(better, kmin, best_key), tl.where(better, rmin, best_row)


@triton.jit
def _place(j, best_key, best_row, skey, lm, l3, L: tl.constexpr, marked, before, mark_key, mark_row,
           prev_key, prev_row):
    """Put the j-th candidate (best_key, best_row) at its slot: j + #(old entries with key <= its
    key), if that is inside the list."""
    found = best_row < 1073741824
    pos = j + tl.sum(((skey <= best_key[:, :, None]) & lm).to(tl.int32), axis=2)
    ins = found & (pos < L)
    sel = (l3 == pos[:, :, None]) & ins[:, :, None]
    mark_key = tl.where(sel, best_key[:, :, None], mark_key)
    mark_row = tl.where(sel, best_row[:, :, None], mark_row)
    marked = marked | sel.to(tl.int32)
    before += ((l3 > pos[:, :, None]) & ins[:, :, None]).to(tl.int32)
    prev_key = tl.where(found, best_key, prev_key)
    prev_row = tl.where(found, best_row, prev_row)
    return marked, before, mark_key, mark_row, prev_key, prev_row


@triton.jit
def _sequential(key_ptr, id_ptr, slot_ptr, cand_key_ptr, cand_row_ptr, cand_tag_ptr, cnt, c_max, ids_ptr, bkey_ptr,
                nmask, n64, N, mrow, MS, lptr, lm, l3, skey, offs_g, SENT, PREV0,
                L: tl.constexpr, CB: tl.constexpr, BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, L_PAD: tl.constexpr,
                NEGATE: tl.constexpr, KEY_FROM_ROW: tl.constexpr, HAS_TAG: tl.constexpr):
    """The merge one candidate at a time, for blocks where some neuron has more than CB
    candidates for a list (the first batches; `_ranked` does the rest): the j-th candidate in
    (key, row) order lands at slot j + #(old entries with key <= its key), min(C, L) steps, each
    a pass over the candidates. Keys, ids and slots are rewritten as whole tiles (every source read before a
    barrier, every changed slot written after it); the admitted rows and their pool slots go to
    the scratch (`mrow`: [BLOCK_N, G_PAD] pointers), i-th admitted at i. Returns how many each
    list admitted, [BLOCK_N, G_PAD], and their maximum."""
    marked = tl.zeros([BLOCK_N, G_PAD, L_PAD], dtype=tl.int32)
    before = tl.zeros([BLOCK_N, G_PAD, L_PAD], dtype=tl.int32)
    mark_key = tl.full([BLOCK_N, G_PAD, L_PAD], SENT, skey.dtype)
    mark_row = tl.zeros([BLOCK_N, G_PAD, L_PAD], dtype=tl.int32)
    prev_key = tl.full([BLOCK_N, G_PAD], PREV0, skey.dtype)
    prev_row = tl.full([BLOCK_N, G_PAD], -1, tl.int32)
    for j in range(tl.minimum(c_max, L)):
        best_key = tl.full([BLOCK_N, G_PAD], SENT, skey.dtype)
        best_row = tl.full([BLOCK_N, G_PAD], 1073741824, tl.int32)
        for c0 in range(0, c_max, CB):
            ck3, cr3, cm3 = _candidates(cand_key_ptr, cand_row_ptr, cand_tag_ptr, bkey_ptr, c0, cnt, nmask, n64,
                                        N, offs_g, SENT, CB, NEGATE, KEY_FROM_ROW, HAS_TAG)
            best_key, best_row = _next_candidate(ck3, cr3, cm3, prev_key, prev_row, best_key, best_row, SENT)
        marked, before, mark_key, mark_row, prev_key, prev_row = _place(
            j, best_key, best_row, skey, lm, l3, L, marked, before, mark_key, mark_row, prev_key, prev_row)

    # Slot l: the candidate marked there, else old entry l - (candidates inserted before l). The
    # i-th admitted candidate (i = `before` at its slot) takes the pool slot of old entry L - a + i.
    new = (marked != 0) & lm
    src = tl.where(new, L + mark_row, l3 - before)
    mv = lm & (src != l3)
    from_old = mv & (src < L)
    admitted = tl.sum(new.to(tl.int32), axis=2)
    pool_src = tl.where(new, L - admitted[:, :, None] + before, src)
    pool_src = tl.minimum(tl.maximum(pool_src, 0), L - 1)
    old_key = tl.load(key_ptr + lptr - l3 + src, mask=from_old)
    old_id = tl.load(id_ptr + lptr - l3 + src, mask=from_old)
    slot = tl.load(slot_ptr + lptr - l3 + pool_src, mask=mv)
    new_id = tl.load(ids_ptr + tl.where(new, mark_row, 0), mask=new)
    if NEGATE:
        mark_key = -mark_key
    tl.debug_barrier()  # every old key, id and slot read (and the previous list's scratch)
    tl.store(key_ptr + lptr, tl.where(from_old, old_key, mark_key), mask=mv)
    tl.store(id_ptr + lptr, tl.where(from_old, old_id, new_id), mask=mv)
    tl.store(slot_ptr + lptr, slot, mask=mv)
    tl.store(mrow[:, :, None] + before, mark_row, mask=new)
    tl.store(mrow[:, :, None] + MS + before, slot, mask=new)
    return admitted, tl.max(tl.max(admitted, axis=1), axis=0)


@triton.jit
def _key_at(cand_key_ptr, cand_row_ptr, bkey_ptr, at, mask, SENT, NEGATE: tl.constexpr, KEY_FROM_ROW: tl.constexpr):
    """The ascending keys of the candidates at `at` (masked ones: SENT, after every real key)."""
    if KEY_FROM_ROW:
        return tl.load(bkey_ptr + tl.load(cand_row_ptr + at, mask=mask, other=0), mask=mask, other=SENT)
    elif NEGATE:
        return -tl.load(cand_key_ptr + at, mask=mask, other=float("-inf"))
    else:
        return tl.load(cand_key_ptr + at, mask=mask, other=SENT)


@triton.jit
def _ranked(key_ptr, id_ptr, slot_ptr, cand_key_ptr, cand_row_ptr, cand_tag_ptr, cnt, c_max, ids_ptr, bkey_ptr,
            nmask, n64, N, msrc_ptr, MS, stride_ln, lptr, lm, l3, skey, offs_g, SENT,
            L: tl.constexpr, CB: tl.constexpr, BLOCK_N: tl.constexpr, NEGATE: tl.constexpr,
            KEY_FROM_ROW: tl.constexpr, HAS_TAG: tl.constexpr):
    """The merge where every neuron of the block has at most CB candidates (the common case once
    the lists have filled), in one pass by ranks: candidate j lands in its list at #(old entries
    with key <= its key) + #(candidates of that list before it in (key, row) order), and old entry
    l at l + #(candidates of its list with key < its key), if inside the list. Same order as
    `_sequential`, without its chain of selection steps (each a cross-thread reduction with its
    barriers): the counts are element-wise sums over loops that load one candidate (one old key)
    per neuron per step, so that no tile is [BLOCK_N, CB, L_PAD] (such tiles spilled registers on
    sm_90), and every entry is written once, straight to its slot. Returns what `_sequential`
    returns."""
    sid = tl.load(id_ptr + lptr, mask=lm)
    sslot = tl.load(slot_ptr + lptr, mask=lm)
    cc = tl.arange(0, CB)
    cm = nmask[:, None] & (cc[None, :] < cnt[:, None])
    cptr = cc[None, :].to(tl.int64) * N + n64[:, None]
    crow = tl.load(cand_row_ptr + cptr, mask=cm, other=1073741824)
    ck = _key_at(cand_key_ptr, cand_row_ptr, bkey_ptr, cptr, cm, SENT, NEGATE, KEY_FROM_ROW)
    if HAS_TAG:
        ctag = tl.load(cand_tag_ptr + cptr, mask=cm, other=0)
    else:
        ctag = tl.zeros([BLOCK_N, CB], dtype=tl.int32)
    rank = tl.zeros([BLOCK_N, CB], dtype=tl.int32)  # candidates of j's list before j
    shift = tl.zeros(skey.shape, dtype=tl.int32)  # candidates of l's list strictly below old entry l
    for c in range(0, c_max):
        live = nmask & (cnt > c)
        at = c * N + n64
        kc = _key_at(cand_key_ptr, cand_row_ptr, bkey_ptr, at, live, SENT, NEGATE, KEY_FROM_ROW)
        rc = tl.load(cand_row_ptr + at, mask=live, other=1073741824)
        if HAS_TAG:
            tc = tl.load(cand_tag_ptr + at, mask=live, other=0)
        else:
            tc = tl.zeros([BLOCK_N], dtype=tl.int32)
        ahead = (live[:, None] & (tc[:, None] == ctag)
                 & ((kc[:, None] < ck) | ((kc[:, None] == ck) & (rc[:, None] < crow))))
        rank += ahead.to(tl.int32)
        mine = live[:, None, None] & (tc[:, None, None] == offs_g[None, :, None])
        shift += (mine & (kc[:, None, None] < skey)).to(tl.int32)
    start = n64[:, None] * stride_ln + ctag * L  # [BLOCK_N, CB]: where candidate j's list starts
    pos = rank  # + the old entries of its list at or below its key (the old entry wins a tie)
    for l in range(0, L):
        if NEGATE:
            kl = -tl.load(key_ptr + start + l, mask=cm, other=float("-inf"))
        else:
            kl = tl.load(key_ptr + start + l, mask=cm, other=SENT)
        pos += (kl <= ck).to(tl.int32)
    adm = cm & (pos < L)
    in_g = ctag[:, :, None] == offs_g[None, None, :]  # [BLOCK_N, CB, G_PAD]
    admitted = tl.sum((adm[:, :, None] & in_g).to(tl.int32), axis=1)  # [BLOCK_N, G_PAD]
    a_j = tl.sum(tl.where(in_g, admitted[:, None, :], 0), axis=2)  # admitted by j's list
    to = l3 + shift
    move = lm & (shift > 0) & (to < L)
    cslot = tl.load(slot_ptr + start + tl.minimum(tl.maximum(L - a_j + rank, 0), L - 1), mask=adm)
    cid = tl.load(ids_ptr + tl.where(adm, crow, 0), mask=adm)
    if NEGATE:
        skey = -skey
        ck = -ck
    tl.debug_barrier()  # every old key, id and slot read (and the previous list's scratch)
    tl.store(key_ptr + lptr - l3 + to, skey, mask=move)
    tl.store(id_ptr + lptr - l3 + to, sid, mask=move)
    tl.store(slot_ptr + lptr - l3 + to, sslot, mask=move)
    tl.store(key_ptr + start + pos, ck, mask=adm)
    tl.store(id_ptr + start + pos, cid, mask=adm)
    tl.store(slot_ptr + start + pos, cslot, mask=adm)
    mrow = msrc_ptr + n64[:, None] * (2 * MS) + ctag * L + rank
    tl.store(mrow, crow, mask=adm)
    tl.store(mrow + MS, cslot, mask=adm)
    return admitted, tl.max(tl.max(admitted, axis=1), axis=0)


@triton.jit
def _admitted_row(i, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T):
    """The i-th admitted row of each list ([BLOCK_N, G_PAD, T_PAD] activations from the batch),
    where it goes (its pool slot) and the mask of the lists that admitted that many."""
    live = gm & (admitted > i)
    row = tl.load(mrow + i, mask=live, other=0)
    slot = tl.load(mrow + MS + i, mask=live, other=0)
    m3 = live[:, :, None] & tm3
    a = tl.load(x_base + row[:, :, None].to(tl.int64) * sxb, mask=m3)
    return m3, a, a_base + slot[:, :, None].to(tl.int64) * T


@triton.jit
def _merge_lists(
    key_ptr, id_ptr, slot_ptr, acts_ptr, stride_ln, stride_an,
    cand_key_ptr, cand_row_ptr, cand_tag_ptr, cnt, c_max,
    ids_ptr, bkey_ptr, x_ptr, sxb, sxt,
    offs_n, nmask, N, T, msrc_ptr, MS,
    G: tl.constexpr, G_PAD: tl.constexpr, L: tl.constexpr, L_PAD: tl.constexpr, T_PAD: tl.constexpr,
    CB: tl.constexpr, BLOCK_N: tl.constexpr,
    NEGATE: tl.constexpr, KEY_INT: tl.constexpr, KEY_FROM_ROW: tl.constexpr, HAS_TAG: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Merge each neuron's candidates into its G sorted lists of L (key, id, pool slot) entries
    and write the admitted excerpts' activations into their pool slots (see Pools in
    `kernels.reference`).

    Keys ascend (NEGATE turns stored maxima into ascending keys); list g of neuron n starts at
    element n * stride_ln + g * L of keys, ids and slots, and its pool at n * stride_an + g * L * T.
    A candidate belongs to list `tag` (0 without HAS_TAG). Old entries win ties (older excerpts);
    candidates order among themselves by (key, row). `_ranked` merges in one pass where it can,
    `_sequential` otherwise; either leaves each admitted row and its pool slot in the scratch
    (`msrc_ptr`: [N, 2 MS] int32, rows then slots). The rows are then copied, WIDE: four at a
    time, all loads before the stores. No old row moves: admitted rows go to the pool slots that
    the dropped entries free, so no copy depends on another."""
    # SENT: the key of an empty slot or of no candidate; 1073741824 (2^30): the row of none.
    if KEY_INT:
        SENT = 9223372036854775807
        PREV0 = -1
    else:
        SENT = float("inf")
        PREV0 = float("-inf")
    n64 = offs_n.to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    gm = nmask[:, None] & (offs_g[None, :] < G)
    mrow = msrc_ptr + n64[:, None] * (2 * MS) + offs_g[None, :] * L  # [BLOCK_N, G_PAD]
    offs_l = tl.arange(0, L_PAD)
    l3 = offs_l[None, None, :]
    lm = gm[:, :, None] & (l3 < L)
    lptr = n64[:, None, None] * stride_ln + offs_g[None, :, None] * L + l3
    if NEGATE:
        skey = -tl.load(key_ptr + lptr, mask=lm, other=float("-inf"))
    else:
        skey = tl.load(key_ptr + lptr, mask=lm, other=SENT)
    if c_max <= CB:
        admitted, a_max = _ranked(key_ptr, id_ptr, slot_ptr, cand_key_ptr, cand_row_ptr, cand_tag_ptr, cnt, c_max,
                                  ids_ptr, bkey_ptr, nmask, n64, N, msrc_ptr, MS, stride_ln, lptr, lm, l3, skey,
                                  offs_g, SENT, L, CB, BLOCK_N, NEGATE, KEY_FROM_ROW, HAS_TAG)
    else:
        admitted, a_max = _sequential(key_ptr, id_ptr, slot_ptr, cand_key_ptr, cand_row_ptr, cand_tag_ptr, cnt, c_max,
                                      ids_ptr, bkey_ptr, nmask, n64, N, mrow, MS, lptr, lm, l3, skey, offs_g, SENT,
                                      PREV0, L, CB, BLOCK_N, G_PAD, L_PAD, NEGATE, KEY_FROM_ROW, HAS_TAG)
    tl.debug_barrier()  # the scratch visible to every thread

    offs_t = tl.arange(0, T_PAD)
    t3 = offs_t[None, None, :]
    tm3 = t3 < T
    a_base = acts_ptr + n64[:, None, None] * stride_an + offs_g[None, :, None] * (L * T) + t3
    x_base = x_ptr + t3.to(tl.int64) * sxt + n64[:, None, None]
    if WIDE:
        for i in range(0, a_max, 4):
            m0, a0, d0 = _admitted_row(i, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T)
            m1, a1, d1 = _admitted_row(i + 1, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T)
            m2, a2, d2 = _admitted_row(i + 2, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T)
            m3, a3, d3 = _admitted_row(i + 3, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T)
            tl.store(d0, a0, mask=m0)
            tl.store(d1, a1, mask=m1)
            tl.store(d2, a2, mask=m2)
            tl.store(d3, a3, mask=m3)
    else:
        for i in range(0, a_max):
            m0, a0, d0 = _admitted_row(i, admitted, mrow, MS, gm, a_base, x_base, sxb, tm3, T)
            tl.store(d0, a0, mask=m0)


@triton.jit
def _random_row(r, zeros2, m2, xt, sxb):
    """Batch row r of every neuron of the block ([BLOCK_N, T_PAD] activations) and where it is
    written: nowhere when r is -1 (the pool slot keeps its row)."""
    mv = m2 & ((zeros2 + r) >= 0)
    return mv, tl.load(xt + (zeros2 + r) * sxb, mask=mv)


@triton.jit(do_not_specialize=["row_lo", "row_hi", "rows_per_split", "n_splits"])
def _finish_kernel(
    x_ptr, sxb, sxt, ids_ptr, bqprio_ptr, rrows_ptr,
    top_max_ptr, top_ids_ptr, top_acts_ptr, top_slot_ptr, neg_min_ptr, neg_ids_ptr, neg_acts_ptr, neg_slot_ptr,
    rand_acts_ptr, qprio_ptr, qids_ptr, qacts_ptr, qslot_ptr, mom_ptr, amin_ptr, amax_ptr, npos_ptr,
    pmom_ptr, pmm_ptr, pint_ptr,
    cnt_ptr, ctop_val_ptr, ctop_row_ptr, cneg_val_ptr, cneg_row_ptr, cq_row_ptr, cq_tag_ptr,
    flag_ptr, msrc_ptr, MS,
    N, T, row_lo, row_hi, rows_per_split, n_splits,
    K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, Q: tl.constexpr, Q_PAD: tl.constexpr,
    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_N: tl.constexpr, T_PAD: tl.constexpr, CB: tl.constexpr,
    SB: tl.constexpr, NEG: tl.constexpr, QUANT: tl.constexpr, RANDOM: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    Tf = tl.cast(T, tl.float64)
    first_id = tl.load(ids_ptr)

    # Moments: the splits' power sums (one shift per neuron, the stream kernel's) add up to the
    # batch's, centred once on the batch mean into one batch set, which is merged into the state
    # (Pebay), as the reference does. SB splits are read per step, all loads in flight together;
    # each step's sums across splits cross threads (24 barriers on sm_90), so SB is 64: one or two
    # steps for the launch shapes of GPT-2 (88 splits) and GPT-2 XL (41).
    plane = tl.cast(n_splits, tl.int64) * N
    s1 = tl.zeros([BLOCK_N], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float64)
    s3 = tl.zeros([BLOCK_N], dtype=tl.float64)
    s4 = tl.zeros([BLOCK_N], dtype=tl.float64)
    vmin = tl.full([BLOCK_N], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_N], float("-inf"), tl.float32)
    npos = tl.zeros([BLOCK_N], dtype=tl.int64)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    offs_s = tl.arange(0, SB)
    for s0 in range(0, n_splits, SB):
        sp = s0 + offs_s
        m2d = (sp < n_splits)[:, None] & nmask[None, :]
        idx = sp[:, None].to(tl.int64) * N + n64[None, :]
        s1 += tl.sum(tl.load(pmom_ptr + idx, mask=m2d, other=0.0), axis=0)
        s2 += tl.sum(tl.load(pmom_ptr + plane + idx, mask=m2d, other=0.0), axis=0)
        s3 += tl.sum(tl.load(pmom_ptr + 2 * plane + idx, mask=m2d, other=0.0), axis=0)
        s4 += tl.sum(tl.load(pmom_ptr + 3 * plane + idx, mask=m2d, other=0.0), axis=0)
        vmin = tl.minimum(vmin, tl.min(tl.load(pmm_ptr + idx, mask=m2d, other=float("inf")), axis=0))
        vmax = tl.maximum(vmax, tl.max(tl.load(pmm_ptr + plane + idx, mask=m2d, other=float("-inf")), axis=0))
        npos += tl.sum(tl.load(pint_ptr + idx, mask=m2d, other=0), axis=0).to(tl.int64)
        bad = bad | tl.max(tl.load(pint_ptr + plane + idx, mask=m2d, other=0), axis=0)
    shift = tl.load(pmm_ptr + 2 * plane + n64, mask=nmask, other=0.0)
    nb = tl.cast(row_hi - row_lo, tl.float64) * Tf
    mean, M2, M3, M4 = _centre(s1, s2, s3, s4, shift, nb)
    na = (first_id + row_lo).to(tl.float64) * Tf
    mp = mom_ptr + n64 * 4
    mean, M2, M3, M4 = _pebay(
        na, tl.load(mp, mask=nmask, other=0.0), tl.load(mp + 1, mask=nmask, other=0.0),
        tl.load(mp + 2, mask=nmask, other=0.0), tl.load(mp + 3, mask=nmask, other=0.0),
        nb, mean, M2, M3, M4,
    )
    tl.store(mp, mean, mask=nmask)
    tl.store(mp + 1, M2, mask=nmask)
    tl.store(mp + 2, M3, mask=nmask)
    tl.store(mp + 3, M4, mask=nmask)
    tl.store(amin_ptr + offs_n, tl.minimum(tl.load(amin_ptr + offs_n, mask=nmask, other=0.0), vmin), mask=nmask)
    tl.store(amax_ptr + offs_n, tl.maximum(tl.load(amax_ptr + offs_n, mask=nmask, other=0.0), vmax), mask=nmask)
    tl.store(npos_ptr + offs_n, tl.load(npos_ptr + offs_n, mask=nmask, other=0) + npos, mask=nmask)
    if tl.max(bad, axis=0) > 0:
        tl.store(flag_ptr, 1)

    cnt = tl.load(cnt_ptr + offs_n, mask=nmask, other=0)
    c_max = tl.max(cnt, axis=0)
    if c_max > 0:
        _merge_lists(top_max_ptr, top_ids_ptr, top_slot_ptr, top_acts_ptr, K, K * T,
                     ctop_val_ptr, ctop_row_ptr, ctop_row_ptr, cnt, c_max,
                     ids_ptr, bqprio_ptr, x_ptr, sxb, sxt, offs_n, nmask, N, T,
                     msrc_ptr, MS, 1, 1, K, K_PAD, T_PAD, CB, BLOCK_N, True, False, False, False, True)
        tl.store(cnt_ptr + offs_n, 0, mask=nmask)
    if NEG:
        cnt = tl.load(cnt_ptr + N + offs_n, mask=nmask, other=0)
        c_max = tl.max(cnt, axis=0)
        if c_max > 0:
            _merge_lists(neg_min_ptr, neg_ids_ptr, neg_slot_ptr, neg_acts_ptr, K, K * T,
                         cneg_val_ptr, cneg_row_ptr, cneg_row_ptr, cnt, c_max,
                         ids_ptr, bqprio_ptr, x_ptr, sxb, sxt, offs_n, nmask, N, T,
                         msrc_ptr, MS, 1, 1, K, K_PAD, T_PAD, CB, BLOCK_N, False, False, False, False, True)
            tl.store(cnt_ptr + N + offs_n, 0, mask=nmask)
    if QUANT:
        cnt = tl.load(cnt_ptr + 2 * N + offs_n, mask=nmask, other=0)
        c_max = tl.max(cnt, axis=0)
        if c_max > 0:
            _merge_lists(qprio_ptr, qids_ptr, qslot_ptr, qacts_ptr, Q * S, Q * S * T,
                         cq_row_ptr, cq_row_ptr, cq_tag_ptr, cnt, c_max,
                         ids_ptr, bqprio_ptr, x_ptr, sxb, sxt, offs_n, nmask, N, T,
                         msrc_ptr, MS, Q, Q_PAD, S, S_PAD, T_PAD, CB, BLOCK_N, False, True, True, True, False)
            tl.store(cnt_ptr + 2 * N + offs_n, 0, mask=nmask)

    if RANDOM:
        # The rows that enter the random sample go to the pool slots that those leaving it free
        # (`Batch.random_rows`, the same for every neuron): no row moves, no write depends on
        # another, so four slots per step have their loads in flight together.
        offs_t = tl.arange(0, T_PAD)
        m2 = nmask[:, None] & (offs_t < T)[None, :]
        ra = rand_acts_ptr + n64[:, None] * (R * T) + offs_t[None, :]
        xt = x_ptr + offs_t[None, :].to(tl.int64) * sxt + n64[:, None]
        zeros2 = tl.zeros([BLOCK_N, T_PAD], dtype=tl.int64)
        for p in range(0, R - 3, 4):
            r0 = tl.load(rrows_ptr + p)
            r1 = tl.load(rrows_ptr + p + 1)
            r2 = tl.load(rrows_ptr + p + 2)
            r3 = tl.load(rrows_ptr + p + 3)
            if (r0 >= 0) | (r1 >= 0) | (r2 >= 0) | (r3 >= 0):  # once the sample settles, seldom
                mv0, a0 = _random_row(r0, zeros2, m2, xt, sxb)
                mv1, a1 = _random_row(r1, zeros2, m2, xt, sxb)
                mv2, a2 = _random_row(r2, zeros2, m2, xt, sxb)
                mv3, a3 = _random_row(r3, zeros2, m2, xt, sxb)
                tl.store(ra + p * T, a0, mask=mv0)
                tl.store(ra + (p + 1) * T, a1, mask=mv1)
                tl.store(ra + (p + 2) * T, a2, mask=mv2)
                tl.store(ra + (p + 3) * T, a3, mask=mv3)
        for p in range(R - R % 4, R):
            mv0, a0 = _random_row(tl.load(rrows_ptr + p), zeros2, m2, xt, sxb)
            tl.store(ra + p * T, a0, mask=mv0)


# ---------------------------------------------------------------------------------------------
# Launcher


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


_SCRATCH: dict = {}


def _scratch(device: torch.device, n: int, rows: int, splits: int, dtype: torch.dtype, slots: int) -> dict:
    """Candidate lists and partials, kept per (device, stream, N) and grown on demand. The counters
    are zero between launches (the finish kernel resets them), so they are never cleared here.
    Excerpt maxima and minima are kept in the activations' dtype, which holds them exactly.
    Per stream (`engine.recorder.SideStream`): launches on one stream run in order, so they can
    share one set, and the allocator reuses a set freed on growth only on the stream that
    allocated it, so no launch queued on another stream can still be reading it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, n)
    s = _SCRATCH.get(key)
    if (s is None or s["rows"] < rows or s["splits"] < splits or s["emax"].dtype != dtype
            or s["msrc"].shape[1] < 2 * slots):
        rows = max(rows, s["rows"] if s else 0)
        splits = max(splits, s["splits"] if s else 0)
        slots = max(slots, s["msrc"].shape[1] // 2 if s else 0)
        i32, f32 = torch.int32, torch.float32
        s = {
            "rows": rows, "splits": splits,
            "cnt": torch.zeros((3, n), dtype=i32, device=device),
            "ctop_val": torch.empty((rows, n), dtype=f32, device=device),
            "ctop_row": torch.empty((rows, n), dtype=i32, device=device),
            "cneg_val": torch.empty((rows, n), dtype=f32, device=device),
            "cneg_row": torch.empty((rows, n), dtype=i32, device=device),
            "cq_row": torch.empty((rows, n), dtype=i32, device=device),
            "cq_tag": torch.empty((rows, n), dtype=i32, device=device),
            "pmom": torch.empty((4, splits, n), dtype=torch.float64, device=device),
            "pmm": torch.empty((3, splits, n), dtype=f32, device=device),  # min, max; the shift
            "pint": torch.empty((2, splits, n), dtype=i32, device=device),
            "emax": torch.empty((rows, n), dtype=dtype, device=device),  # each excerpt's maximum
            "emin": torch.empty((rows, n), dtype=dtype, device=device),  # and minimum
            # the finish kernel's admitted rows and their pool slots, per list
            "msrc": torch.empty((n, 2 * slots), dtype=i32, device=device),
        }
        _SCRATCH[key] = s
    return s


def scratch_bytes(n: int, rows: int, splits: int, itemsize: int = 4, slots: int = 50) -> int:
    """Device bytes of the scratch one layer width needs (shared by all layers of that width)."""
    return (3 * n * 4 + rows * n * (6 * 4 + 2 * itemsize) + splits * n * (4 * 8 + 3 * 4 + 2 * 4)
            + n * 2 * max(slots, _CB) * 4)


_CB = 16
"""Candidates the finish kernel loads together; a block where no neuron has more merges by ranks."""


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tuning_from_env() -> dict:
    tuning = {"block_n": 512, "programs_per_sm": 4, "num_warps": 4, "chunk": 8, "finish_block_n": 16,
              "finish_warps": 4, "excerpt_warps": 4, "excerpt_rows": 16}
    text = os.environ.get("NEURONATLAS_TRITON_TUNING", "")
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in tuning or not value.isdigit() or int(value) < 1:
            raise ValueError(f"NEURONATLAS_TRITON_TUNING: expected key=positive integer with "
                             f"key one of {', '.join(tuning)}, got '{item}'")
        tuning[key] = int(value)
    return tuning


TUNING = _tuning_from_env()
"""The GPU launch shapes: the stream kernel's BLOCK_N (neurons per program), programs per SM
(row splits are chosen to reach that many), warps, and CHUNK (tokens whose loads are issued
together); the finish kernel's BLOCK_N and warps; the excerpt kernel's warps (its BLOCK_N is 32 x
warps, one neuron per thread) and rows per program. The stream and finish shapes scored best,
plain and fused update together, of the seven shapes `benchmarks/kernel_sweep.py` timed on an
H200 (2026-11-26, see benchmarks/RESULTS.md); the excerpt kernel's are untimed. Overridable as
NEURONATLAS_TRITON_TUNING="block_n=256,chunk=16"; block sizes, warps and chunk are powers of two."""

_ABLATE = 0
"""Diagnostics for `benchmarks/kernel_sweep.py` only: a bitmask of stream-kernel stages to leave
out (1: float64 power sums, kept in float32 instead, 16: the per-token power sums) and of
excerpt-kernel stages (2: histogram, 4: quantile buckets, 8: top-K and bottom-K candidates). The
state comes out wrong; time differences say what each stage costs. Never set while recording."""


def default_config(n: int, rows: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N of the stream kernel, rows per split, BLOCK_N of the finish kernel).

    On a GPU the stream kernel gets enough programs to fill every SM a few times over
    (`TUNING`), each streaming a contiguous run of excerpts; the finish kernel, whose merge holds
    several [BLOCK_N, buckets, slots] tiles, takes narrower blocks. In the interpreter, which pays
    per operation rather than per element: one wide block and one split."""
    if device.type != "cuda":
        bn = min(256, _pow2(n, 16))
        return bn, rows, bn
    block_n = TUNING["block_n"]
    blocks = -(-n // block_n)
    splits = max(1, min(rows, -(-TUNING["programs_per_sm"] * _sm_count(device.index or 0) // blocks)))
    return block_n, -(-rows // splits), TUNING["finish_block_n"]


def _launch(acts, ids, bqprio, rrows, top_max, top_ids, top_acts, top_slot, neg_min, neg_ids, neg_acts, neg_slot,
            random_acts, prefix_max, quant_bounds, quant_prio, quant_ids, quant_acts, quant_slot, hist, hist_range,
            moments, amin, amax, n_positive, quantile_prefix, row_lo, row_hi, bounds_ready, do_random,
            block_n=0, rows_per_split=0, finish_block_n=0, fused=None) -> torch.Tensor:
    """One layer's launches. `fused`: None, or (pre, up, y, act, skip) for the path that
    produces the activations: the kernels write act(pre) (* up) into y [B, skip + T, N], and
    `acts` is the view y[:, skip:] that they reduce."""
    B, T, N = acts.shape
    if fused is None:
        if acts.stride(2) != 1:
            acts = acts.contiguous()
        x, u, y, act, skip = acts, acts, acts, ACT_NONE, 0
    else:
        x, u, y, act, skip = fused
        x = x if x.stride(2) == 1 else x.contiguous()
        u = x if u is None else (u if u.stride(2) == 1 else u.contiguous())
    K = top_max.shape[1]
    R = random_acts.shape[1]
    Q, S = quant_prio.shape[1], quant_prio.shape[2]
    H = hist.shape[1] - 2
    rows = row_hi - row_lo
    flag = torch.empty((), dtype=torch.uint8, device=acts.device)
    if rows <= 0:
        flag.zero_()
        return flag.view(torch.bool)
    bn, rps, fbn = default_config(N, rows, acts.device)
    if block_n:
        bn = fbn = block_n
    fbn = finish_block_n or fbn
    rps = rows_per_split or rps
    splits = -(-rows // rps)
    sc = _scratch(acts.device, N, B, splits, acts.dtype, max(_CB, K, Q * S))
    neg = neg_min is not None
    quant = bool(bounds_ready) and S > 0
    hist_on = bool(bounds_ready)
    nb = triton.cdiv(N, bn)
    T_PAD = _pow2(T)
    chunk = min(TUNING["chunk"], T_PAD) if acts.is_cuda else min(8, T_PAD)
    dummy = top_max  # any tensor: pointers of disabled features are never dereferenced
    _stream_kernel[(nb, splits)](
        x, x.stride(0), x.stride(1), ids, moments,
        sc["pmom"], sc["pmm"], sc["pint"], sc["emax"], sc["emin"], flag,
        u, u.stride(0), u.stride(1), y, y.stride(0), y.stride(1),
        N, T, row_lo, row_hi, rps, splits,
        BLOCK_N=bn, CHUNK=chunk, NEG=neg, ACT=act, SKIP=skip, ABLATE=_ABLATE, EVEN=T % chunk == 0,
        num_warps=TUNING["num_warps"] if acts.is_cuda else 4,
    )
    if acts.is_cuda:
        ebn, ewarps, erps = 32 * TUNING["excerpt_warps"], TUNING["excerpt_warps"], TUNING["excerpt_rows"]
    else:  # the interpreter: the stream kernel's blocks and splits
        ebn, ewarps, erps = bn, 4, rps
    rb = min(8, _pow2(erps))  # rows per group (the interpreter pays for dead rows as for live ones)
    _excerpt_kernel[(triton.cdiv(N, ebn), -(-rows // erps))](
        sc["emax"], sc["emin"], ids, bqprio,
        top_max, neg_min if neg else dummy, prefix_max, quant_bounds, quant_prio, hist, hist_range,
        sc["cnt"], sc["ctop_val"], sc["ctop_row"], sc["cneg_val"], sc["cneg_row"], sc["cq_row"], sc["cq_tag"],
        N, quantile_prefix, row_lo, row_hi, erps,
        K=K, BLOCK_N=ebn, RB=rb, NEG=neg, HIST=hist_on, QUANT=quant, Q=Q, S=S, H=H, ABLATE=_ABLATE,
        num_warps=ewarps,
    )
    _finish_kernel[(triton.cdiv(N, fbn),)](
        acts, acts.stride(0), acts.stride(1), ids, bqprio, rrows,
        top_max, top_ids, top_acts, top_slot,
        neg_min if neg else dummy, neg_ids if neg else dummy, neg_acts if neg else dummy, neg_slot if neg else dummy,
        random_acts, quant_prio, quant_ids, quant_acts, quant_slot, moments, amin, amax, n_positive,
        sc["pmom"], sc["pmm"], sc["pint"],
        sc["cnt"], sc["ctop_val"], sc["ctop_row"], sc["cneg_val"], sc["cneg_row"], sc["cq_row"], sc["cq_tag"],
        flag, sc["msrc"], sc["msrc"].shape[1] // 2,
        N, T, row_lo, row_hi, rps, splits,
        K=K, K_PAD=_pow2(K), R=R, Q=Q, Q_PAD=_pow2(Q), S=S, S_PAD=_pow2(S), BLOCK_N=fbn,
        T_PAD=T_PAD, CB=_CB, SB=64,
        NEG=neg, QUANT=quant, RANDOM=bool(do_random) and R > 0,
        num_warps=TUNING["finish_warps"] if acts.is_cuda else 4,
    )
    return flag.view(torch.bool)


# ---------------------------------------------------------------------------------------------
# The custom op: in-place on the state, so it lives inside a compiled graph without a break.

_MUTATED = ("top_max", "top_ids", "top_acts", "top_slot", "neg_min", "neg_ids", "neg_acts", "neg_slot",
            "random_acts", "prefix_max", "quant_prio", "quant_ids", "quant_acts", "quant_slot", "hist", "moments",
            "amin", "amax", "n_positive")


@torch.library.custom_op("neuronatlas::update_layer_", mutates_args=_MUTATED)
def update_layer_op(
    acts: torch.Tensor, ids: torch.Tensor, quant_prio_b: torch.Tensor, random_rows: torch.Tensor,
    top_max: torch.Tensor, top_ids: torch.Tensor, top_acts: torch.Tensor, top_slot: torch.Tensor,
    neg_min: Optional[torch.Tensor], neg_ids: Optional[torch.Tensor], neg_acts: Optional[torch.Tensor],
    neg_slot: Optional[torch.Tensor], random_acts: torch.Tensor, prefix_max: torch.Tensor,
    quant_bounds: torch.Tensor, quant_prio: torch.Tensor, quant_ids: torch.Tensor, quant_acts: torch.Tensor,
    quant_slot: torch.Tensor,
    hist: torch.Tensor, hist_range: torch.Tensor, moments: torch.Tensor,
    amin: torch.Tensor, amax: torch.Tensor, n_positive: torch.Tensor,
    quantile_prefix: int, row_lo: int, row_hi: int, bounds_ready: bool, do_random: bool,
    block_n: int = 0, rows_per_split: int = 0, finish_block_n: int = 0,
) -> torch.Tensor:
    """Fold rows [row_lo, row_hi) of acts [B, T, N] into one layer's state tensors, in place.

    The token count before row r is (ids[0] + r) * T: excerpts are fed from id 0 in order, which
    is what lets the op run without a host integer that changes every batch. Returns a 0-d bool:
    whether any activation in those rows was NaN or infinite. The last three arguments override
    the block sizes (0: `default_config`); tests use them to cover odd tilings."""
    return _launch(acts, ids, quant_prio_b, random_rows, top_max, top_ids, top_acts, top_slot, neg_min, neg_ids,
                   neg_acts, neg_slot, random_acts, prefix_max, quant_bounds, quant_prio, quant_ids, quant_acts,
                   quant_slot, hist, hist_range, moments, amin, amax, n_positive, quantile_prefix, row_lo, row_hi,
                   bounds_ready, do_random, block_n, rows_per_split, finish_block_n)


@update_layer_op.register_fake
def _(acts, *args, **kwargs):
    return acts.new_empty((), dtype=torch.bool)


@torch.library.custom_op("neuronatlas::activate_update_", mutates_args=("y",) + _MUTATED)
def activate_update_op(
    pre: torch.Tensor, up: Optional[torch.Tensor], y: torch.Tensor, act: int, skip: int,
    ids: torch.Tensor, quant_prio_b: torch.Tensor, random_rows: torch.Tensor,
    top_max: torch.Tensor, top_ids: torch.Tensor, top_acts: torch.Tensor, top_slot: torch.Tensor,
    neg_min: Optional[torch.Tensor], neg_ids: Optional[torch.Tensor], neg_acts: Optional[torch.Tensor],
    neg_slot: Optional[torch.Tensor], random_acts: torch.Tensor, prefix_max: torch.Tensor,
    quant_bounds: torch.Tensor, quant_prio: torch.Tensor, quant_ids: torch.Tensor, quant_acts: torch.Tensor,
    quant_slot: torch.Tensor,
    hist: torch.Tensor, hist_range: torch.Tensor, moments: torch.Tensor,
    amin: torch.Tensor, amax: torch.Tensor, n_positive: torch.Tensor,
    quantile_prefix: int, row_lo: int, row_hi: int, bounds_ready: bool, do_random: bool,
    block_n: int = 0, rows_per_split: int = 0, finish_block_n: int = 0,
) -> torch.Tensor:
    """`update_layer_op` where the activations are produced: writes y = act(pre) (* up) for
    rows [row_lo, row_hi) of [B, skip + T, N] and folds y[:, skip:] into the state, reading pre
    (and up) once. Returns the non-finite flag of the activations."""
    return _launch(y[:, skip:], ids, quant_prio_b, random_rows, top_max, top_ids, top_acts, top_slot, neg_min,
                   neg_ids, neg_acts, neg_slot, random_acts, prefix_max, quant_bounds, quant_prio, quant_ids,
                   quant_acts, quant_slot, hist, hist_range, moments, amin, amax, n_positive, quantile_prefix,
                   row_lo, row_hi, bounds_ready, do_random, block_n, rows_per_split, finish_block_n,
                   fused=(pre, up, y, act, skip))


@activate_update_op.register_fake
def _(pre, *args, **kwargs):
    return pre.new_empty((), dtype=torch.bool)


def _state_args(state: ref.LayerState) -> tuple:
    return (state.top_max, state.top_ids, state.top_acts, state.top_slot, state.neg_min, state.neg_ids,
            state.neg_acts, state.neg_slot, state.random_acts, state.prefix_max, state.quant_bounds,
            state.quant_prio, state.quant_ids, state.quant_acts, state.quant_slot, state.hist, state.hist_range,
            state.moments, state.amin, state.amax, state.n_positive)


def _op_args(state: ref.LayerState, spec: ref.ReductionSpec, batch: ref.Batch, row_lo: int, row_hi: int,
             bounds_ready: bool, do_random: bool) -> tuple:
    """The op's (and the launcher's) arguments after the activations, in their order."""
    return (batch.ids, batch.quant_prio, batch.random_rows, *_state_args(state), spec.quantile_prefix, row_lo,
            row_hi, bounds_ready, do_random)


def _call(state: ref.LayerState, spec: ref.ReductionSpec, acts: torch.Tensor, batch: ref.Batch,
          row_lo: int, row_hi: int, bounds_ready: bool, do_random: bool, **tuning) -> torch.Tensor:
    """One layer's launches: through the custom op while torch.compile traces (the op is what puts the
    update in the graph), else straight to the launcher. Through the dispatcher an eager call
    cost 0.54-0.68 ms of host time on a 2-core Xeon (torch 2.13), most of it in torch's
    `fill_defaults`, which rebuilds the op's 33-argument schema once per argument; straight to the
    launcher 0.05-0.08 ms (kernels stubbed out: benchmarks/launch_overhead.py)."""
    args = _op_args(state, spec, batch, row_lo, row_hi, bounds_ready, do_random)
    if torch.compiler.is_compiling():
        return update_layer_op(acts, *args, **tuning)
    return _launch(acts, *args, **tuning)


def _call_fused(state, spec, pre, up, y, act, skip, batch, row_lo, row_hi, bounds_ready, do_random,
                **tuning) -> torch.Tensor:
    """`_call` for the path that produces the activations."""
    args = _op_args(state, spec, batch, row_lo, row_hi, bounds_ready, do_random)
    if torch.compiler.is_compiling():
        return activate_update_op(pre, up, y, act, skip, *args, **tuning)
    return _launch(y[:, skip:], *args, fused=(pre, up, y, act, skip), **tuning)


def _fold(state: ref.LayerState, spec: ref.ReductionSpec, batch: ref.Batch, B: int, T: int, call) -> torch.Tensor:
    """Fold a batch of B excerpts of T tokens into `state` through `call(row_lo, row_hi,
    bounds_ready, do_random)`, one set of launches per row range, and count its tokens.

    A batch that completes the quantile prefix goes in two ranges: rows before the prefix end,
    then the reference's `set_boundaries` (once per run, from the whole prefix), then the rows
    after it. The random sample, which may take any row of the batch, is written in the last
    launch, once every row is there (the path that produces the activations writes them as it goes)."""
    if state.count != batch.first_id * T:
        raise ValueError(f"the state has seen {state.count} tokens but the batch starts at excerpt "
                         f"{batch.first_id} of {T} tokens: batches must come in order from excerpt 0")
    if batch.completes_prefix:
        p = batch.prefix_rows
        flag = call(0, p, False, p == B)
        ref.set_boundaries(state, spec, spec.quantile_prefix)
        if p < B:
            flag = flag | call(p, B, True, True)
    else:
        flag = call(0, B, state.bounds_ready, True)
    state.count += B * T
    return flag


def check_state(state: ref.LayerState, acts: torch.Tensor) -> None:
    """The kernels write the state in place: it must be contiguous, on the activations' device,
    and keep per-token activations in their dtype."""
    for name in ("top_max", "top_ids", "top_acts", "top_slot", "neg_min", "neg_ids", "neg_acts", "neg_slot",
                 "random_acts", "prefix_max", "quant_bounds", "quant_prio", "quant_ids", "quant_acts",
                 "quant_slot", "hist", "hist_range", "moments", "amin", "amax", "n_positive"):
        t = getattr(state, name)
        if t is None:
            continue
        if not t.is_contiguous() or t.device != acts.device:
            raise ValueError(f"LayerState.{name} must be a contiguous tensor on {acts.device}")
    if state.top_acts.dtype != acts.dtype:
        raise ValueError(f"activations are {acts.dtype} but the state keeps {state.top_acts.dtype}")
    for name in ref.SLOT_FIELDS:
        t = getattr(state, name)
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"LayerState.{name} must be int32, not {t.dtype}")


def update_layer(state: ref.LayerState, spec: ref.ReductionSpec, acts: torch.Tensor, batch: ref.Batch,
                 **tuning) -> torch.Tensor:
    """`kernels.reference.update_layer` on the Triton kernels: same signature, same results."""
    B, T, _ = acts.shape
    check_state(state, acts)
    return _fold(state, spec, batch, B, T, lambda lo, hi, ready, rnd: _call(state, spec, acts, batch, lo, hi,
                                                                             ready, rnd, **tuning))


def update_layer_in_graph(state: ref.LayerState, spec: ref.ReductionSpec, acts: torch.Tensor,
                          batch: ref.Batch) -> torch.Tensor:
    """The part of `update_layer` that a compiled graph holds: one op call, no host integers.

    The caller adds the batch's tokens to `state.count` after the graph, and runs a batch that
    completes the quantile prefix through `update_layer` instead (it needs `set_boundaries`)."""
    return _call(state, spec, acts, batch, 0, acts.shape[0], state.bounds_ready, True)


def _activate_args(pre: torch.Tensor, up: Optional[torch.Tensor], activation: str, skip: int):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}': use {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    if (act >= ACT_SILU_MUL) != (up is not None):
        raise ValueError(f"activation '{activation}' {'needs' if up is None else 'takes no'} up projection")
    if up is not None and up.shape != pre.shape:
        raise ValueError(f"gate {tuple(pre.shape)} and up {tuple(up.shape)} differ in shape")
    if pre.dim() != 3 or not 0 <= skip < pre.shape[1]:
        raise ValueError(f"pre-activations must be [batch, {skip} + tokens, neurons], not {tuple(pre.shape)}")
    return act, torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)


def activate_update(state: ref.LayerState, spec: ref.ReductionSpec, pre: torch.Tensor,
                    up: Optional[torch.Tensor], activation: str, batch: ref.Batch, skip: int = 0,
                    **tuning) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute a layer's activations where they are produced and record them in the same read.

    pre: [B, skip + T, N] pre-activations (the gate for the gated kinds, with `up` beside it).
    Returns (y, flag): y = act(pre) (* up), the tensor the model goes on with, and whether any
    of y[:, skip:] was NaN or infinite. The state ends as `update_layer(state, spec, y[:, skip:],
    batch)` would leave it: the statistics are those of the activations the model reads."""
    act, y = _activate_args(pre, up, activation, skip)
    B, Tf, _ = pre.shape
    check_state(state, y[:, skip:])
    flag = _fold(state, spec, batch, B, Tf - skip,
                 lambda lo, hi, ready, rnd: _call_fused(state, spec, pre, up, y, act, skip, batch, lo, hi, ready,
                                                        rnd, **tuning))
    return y, flag


def activate_update_in_graph(state: ref.LayerState, spec: ref.ReductionSpec, pre: torch.Tensor,
                             up: Optional[torch.Tensor], activation: str, batch: ref.Batch,
                             skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`activate_update` for a compiled graph, as `update_layer_in_graph` is for `update_layer`."""
    act, y = _activate_args(pre, up, activation, skip)
    flag = _call_fused(state, spec, pre, up, y, act, skip, batch, 0, pre.shape[0], state.bounds_ready, True)
    return y, flag
