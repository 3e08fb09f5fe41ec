"""Per-neuron reductions in plain PyTorch: the specification that the Triton kernels must match.

One `LayerState` holds everything the recorder keeps for the N neurons of one layer. Each batch of
B excerpts of T tokens produces an activation tensor `acts[B, T, N]`; `update_layer` folds it into
the state on the device it lives on, without a host synchronisation. Every rule below is exact, so
that a faster implementation can be checked against this one:

* Excerpt ids are consecutive integers, fed in increasing order. The *maximum* of an excerpt for a
  neuron is the largest activation over its T tokens (computed in float32).
* **Top-K** keeps, per neuron, the K excerpts that come first in the order (maximum descending,
  excerpt id ascending); **bottom-K** (negatives) the K first in (minimum ascending, id ascending).
  Because ids grow monotonically, a stable sort of `[state, batch]` gives exactly this order.
* **Priorities** are a 63-bit hash of (seed, salt, excerpt id) (`priorities`), independent of the
  activations. The **random sample** is the R excerpts with the smallest priority (the same excerpts
  for every neuron of the run; each neuron keeps its own per-token activations). A uniform sample
  without replacement, deterministic, and mergeable across shards of a corpus.
* **Quantile sampling.** The first P excerpts (the prefix) only record their maxima. When the prefix
  is complete the bucket boundaries of each neuron are set to the quantiles `quantile_probs` of the
  prefix maxima (linear interpolation between order statistics), giving Q = len(probs) + 1 buckets
  [0, p0), [p0, p1), ... [p_last, 1]. Every later excerpt falls into the bucket of its maximum
  (`x >= boundary` moves it up), and each bucket keeps the S excerpts of smallest priority
  (a second salt), with (priority, id) ascending as the order.
* **Histogram of excerpt maxima.** Range from the prefix: lo = min, hi = max + span/4 (span =
  max - min; a zero span becomes [lo - 0.5, hi + 0.5]). H equal bins over [lo, hi] plus an
  underflow bin (index 0, x < lo) and an overflow bin (index H + 1, x > hi); bin of x in range is
  1 + clamp(floor((x - lo) / (hi - lo) * H), 0, H - 1). The prefix maxima are binned when the range
  is set, so every excerpt is counted once.
* **Moments** over all tokens: per batch, sums of (x - c)^k for k = 1..4 around the batch's float32
  mean c (powers and per-excerpt sums in float32, the sum over excerpts in float64), turned into
  central moments of the
  batch, then merged into
  the running (count, mean, M2, M3, M4) with the pairwise update of Pebay (2008). No raw power sums,
  so no catastrophic cancellation. Also the minimum, maximum and number of positive activations.

**Pools.** The per-token activations of the top-K, bottom-K and quantile lists and of the random
sample are kept in *pool slots*, not in rank order: `top_slot[n, k]` names the slot of
`top_acts[n]` that holds the excerpt of rank k (`quant_slot[n, q, s]` a slot among bucket q's S;
`RandomSample.slot[r]`, one map for every neuron and layer, the random sample's). When a batch
admits a excerpts to a list, its last a entries drop out, and the i-th admitted excerpt (in the
list's order) takes the slot of the (L - a + i)-th old entry, L the list's length; entries that
stay keep their slots. So an update writes only the rows it admits and moves none (the Triton
kernels would otherwise shift up to K rows of T activations per neuron and list, one dependent
step after another). `LayerState.ordered` and `RandomSample.ordered` give rank order, as stored;
a state or sample made from stored arrays has every slot in rank order (`identity_slots`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT64_MAX = 2**63 - 1
RANDOM_SALT = 0x52414E44  # "RAND"
QUANTILE_SALT = 0x5155414E  # "QUAN"


@dataclass(frozen=True)
class ReductionSpec:
    """What the recorder keeps per neuron; stored in the run's attributes."""

    excerpt_len: int
    """T: tokens per excerpt (activations recorded at every one of them)."""
    top_k: int = 50
    """K: excerpts kept per neuron by maximum activation (and by minimum, with negatives)."""
    negatives: bool = False
    """Whether to keep the K most negative excerpts as well."""
    random_k: int = 50
    """R: size of the uniform random sample of excerpts."""
    quantile_probs: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    """Quantiles of the per-excerpt maximum that bound the sampling buckets."""
    quantile_k: int = 10
    """S: excerpts sampled per quantile bucket."""
    quantile_prefix: int = 2048
    """P: excerpts whose maxima set the bucket boundaries and the histogram range."""
    hist_bins: int = 64
    """H: regular histogram bins (plus one underflow and one overflow bin)."""
    seed: int = 0
    """Seed of the priority hash (random and quantile samples)."""

    @property
    def n_buckets(self) -> int:
        return len(self.quantile_probs) + 1


# ---------------------------------------------------------------------------------------------
# Priorities: a 63-bit hash of the excerpt id, computed on the host (B values per batch).


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def seed_key(seed: int, salt: int) -> int:
    """The 64-bit key that (seed, salt) give the priority hash: splitmix64 of ((seed times the
    FNV prime, mod 2^64) xor salt). The product is taken mod 2^64 so that every seed of 0..2^63 - 1
    works (seeds below 2^24 never reached 2^64: their keys are those of the first stores); the
    prime is odd, so distinct seeds below 2^64 give distinct products."""
    mixed = ((int(seed) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF) ^ int(salt)
    return int(_splitmix64(np.array([mixed], dtype=np.uint64))[0])


def priorities(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Non-negative int64 priority of each excerpt id; smaller is sampled first."""
    key = np.uint64(seed_key(seed, salt))
    return (_splitmix64(np.asarray(ids, dtype=np.uint64) ^ key) >> np.uint64(1)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class RandomSample:
    """The run-wide random sample: which excerpts it holds (shared by all layers)."""

    ids: torch.Tensor
    """[R] int64 excerpt ids in (priority, id) order; -1 marks an empty slot."""
    prio: torch.Tensor
    """[R] int64 priorities of those excerpts; INT64_MAX for an empty slot."""
    slot: torch.Tensor
    """[R] int32: the pool slot of every layer's `random_acts` that holds rank r (Pools)."""

    @classmethod
    def from_ids(cls, spec: ReductionSpec, ids: np.ndarray, device) -> "RandomSample":
        """The sample holding `ids` (as a checkpoint stores it, in rank order); priorities are
        derived from them."""
        prio = np.where(ids >= 0, priorities(np.maximum(ids, 0), spec.seed, RANDOM_SALT), INT64_MAX)
        return cls(ids=torch.from_numpy(ids.astype(np.int64)).to(device), prio=torch.from_numpy(prio).to(device),
                   slot=identity_slots((len(ids),), device))

    @classmethod
    def empty(cls, spec: ReductionSpec, device) -> "RandomSample":
        R = spec.random_k
        return cls(
            ids=torch.full((R,), -1, dtype=torch.int64, device=device),
            prio=torch.full((R,), INT64_MAX, dtype=torch.int64, device=device),
            slot=identity_slots((R,), device),
        )

    def ordered(self, random_acts: torch.Tensor) -> torch.Tensor:
        """A layer's `random_acts` [N, R, T] in rank order (a new tensor)."""
        return random_acts[:, self.slot.long()]


@dataclass
class Batch:
    """One batch of consecutive excerpts, prepared once and shared by every layer's update."""

    first_id: int
    """Excerpt id of the first row."""
    size: int
    """B: number of excerpts (rows)."""
    ids: torch.Tensor
    """[B] int64 excerpt ids on the device."""
    quant_prio: torch.Tensor
    """[B] int64 quantile-sampling priorities on the device."""
    random_rows: torch.Tensor
    """[R] int64: the batch row that pool slot p of every layer's `random_acts` receives, or -1
    where the slot keeps its row (the sample's slots move by the rule of Pools)."""
    prefix_rows: int
    """Rows of this batch that belong to the prefix (ids < P)."""
    completes_prefix: bool
    """Whether the prefix ends inside (or exactly at the end of) this batch."""


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """Host array to `device` without making the host wait for the device's queued work (a copy
    from pageable memory would: it is ordered behind every kernel already queued)."""
    t = torch.from_numpy(a)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def plan_batch(
    spec: ReductionSpec, sample: RandomSample, first_id: int, size: int, device
) -> tuple[Batch, RandomSample]:
    """Prepare the layer-independent part of a batch; returns it and the updated random sample."""
    ids_np = np.arange(first_id, first_id + size, dtype=np.int64)
    ids = to_device(ids_np, device)
    rprio = to_device(priorities(ids_np, spec.seed, RANDOM_SALT), device)
    qprio = to_device(priorities(ids_np, spec.seed, QUANTILE_SALT), device)
    R = spec.random_k
    cat_prio = torch.cat([sample.prio, rprio])
    cat_ids = torch.cat([sample.ids, ids])
    order = torch.sort(cat_prio, stable=True).indices[:R]
    new_slot, adm = _pool_merge(sample.slot, order, R)
    rows = torch.full((R,), -1, dtype=torch.int64, device=order.device)
    rows = rows.scatter(0, new_slot.long(), torch.where(adm, order - R, -1))  # new_slot: a permutation
    new_sample = RandomSample(ids=cat_ids[order], prio=cat_prio[order], slot=new_slot)
    P = spec.quantile_prefix
    prefix_rows = max(0, min(size, P - first_id))
    batch = Batch(
        first_id=first_id,
        size=size,
        ids=ids,
        quant_prio=qprio,
        random_rows=rows,
        prefix_rows=prefix_rows,
        completes_prefix=first_id < P <= first_id + size,
    )
    return batch, new_sample


@dataclass
class LayerState:
    """Everything kept for the N neurons of one layer, on the device that runs the model."""

    top_max: torch.Tensor
    """[N, K] float32 excerpt maxima, descending; -inf in empty slots."""
    top_ids: torch.Tensor
    """[N, K] int64 excerpt ids; -1 in empty slots."""
    top_acts: torch.Tensor
    """[N, K, T] activations (activation dtype) of those excerpts, in pool slots (`top_slot`)."""
    top_slot: torch.Tensor
    """[N, K] int32: the slot of `top_acts` that holds rank k (a permutation of 0..K-1)."""
    neg_min: torch.Tensor | None
    """[N, K] float32 excerpt minima, ascending; +inf in empty slots (None without negatives)."""
    neg_ids: torch.Tensor | None
    """[N, K] int64 excerpt ids of the most negative excerpts."""
    neg_acts: torch.Tensor | None
    """[N, K, T] activations of those excerpts, in pool slots (`neg_slot`)."""
    neg_slot: torch.Tensor | None
    """[N, K] int32: the slot of `neg_acts` that holds rank k."""
    random_acts: torch.Tensor
    """[N, R, T] activations of the run-wide random sample, in the pool slots of `RandomSample.slot`
    (one map for all layers: `RandomSample.ordered` gives rank order)."""
    prefix_max: torch.Tensor
    """[N, P] float32 maxima of the prefix excerpts (emptied once the prefix is complete)."""
    bounds_ready: bool
    """Whether quantile boundaries and histogram range are set (host flag)."""
    quant_bounds: torch.Tensor
    """[N, Q - 1] float32 bucket boundaries; NaN until set."""
    quant_prio: torch.Tensor
    """[N, Q, S] int64 priorities of sampled excerpts, ascending; INT64_MAX in empty slots."""
    quant_ids: torch.Tensor
    """[N, Q, S] int64 excerpt ids; -1 in empty slots."""
    quant_acts: torch.Tensor
    """[N, Q, S, T] activations of those excerpts, in pool slots (`quant_slot`)."""
    quant_slot: torch.Tensor
    """[N, Q, S] int32: the slot among bucket q's S that holds its rank s."""
    hist: torch.Tensor
    """[N, H + 2] int64 counts of excerpt maxima (underflow, H bins, overflow)."""
    hist_range: torch.Tensor
    """[N, 2] float32 (lo, hi) of the regular bins; NaN until set."""
    count: int
    """Tokens seen (the same for every neuron)."""
    moments: torch.Tensor
    """[N, 4] float64 running (mean, M2, M3, M4): M_k is the sum of (x - mean)^k."""
    amin: torch.Tensor
    """[N] float32 minimum activation."""
    amax: torch.Tensor
    """[N] float32 maximum activation."""
    n_positive: torch.Tensor
    """[N] int64 number of tokens with activation > 0."""

    @classmethod
    def empty(cls, spec: ReductionSpec, n: int, act_dtype: torch.dtype, device) -> "LayerState":
        K, T, R, Q, S, P, H = (
            spec.top_k, spec.excerpt_len, spec.random_k, spec.n_buckets, spec.quantile_k,
            spec.quantile_prefix, spec.hist_bins,
        )
        f32, i64 = torch.float32, torch.int64
        kw = dict(device=device)
        neg = spec.negatives
        return cls(
            top_max=torch.full((n, K), -float("inf"), dtype=f32, **kw),
            top_ids=torch.full((n, K), -1, dtype=i64, **kw),
            top_acts=torch.zeros((n, K, T), dtype=act_dtype, **kw),
            top_slot=identity_slots((n, K), device),
            neg_min=torch.full((n, K), float("inf"), dtype=f32, **kw) if neg else None,
            neg_ids=torch.full((n, K), -1, dtype=i64, **kw) if neg else None,
            neg_acts=torch.zeros((n, K, T), dtype=act_dtype, **kw) if neg else None,
            neg_slot=identity_slots((n, K), device) if neg else None,
            random_acts=torch.zeros((n, R, T), dtype=act_dtype, **kw),
            prefix_max=torch.full((n, P), float("nan"), dtype=f32, **kw),
            bounds_ready=False,
            quant_bounds=torch.full((n, Q - 1), float("nan"), dtype=f32, **kw),
            quant_prio=torch.full((n, Q, S), INT64_MAX, dtype=i64, **kw),
            quant_ids=torch.full((n, Q, S), -1, dtype=i64, **kw),
            quant_acts=torch.zeros((n, Q, S, T), dtype=act_dtype, **kw),
            quant_slot=identity_slots((n, Q, S), device),
            hist=torch.zeros((n, H + 2), dtype=i64, **kw),
            hist_range=torch.full((n, 2), float("nan"), dtype=f32, **kw),
            count=0,
            moments=torch.zeros((n, 4), dtype=torch.float64, **kw),
            amin=torch.full((n,), float("inf"), dtype=f32, **kw),
            amax=torch.full((n,), -float("inf"), dtype=f32, **kw),
            n_positive=torch.zeros((n,), dtype=i64, **kw),
        )

    @property
    def n_neurons(self) -> int:
        return self.top_max.shape[0]

    def ordered(self, name: str) -> torch.Tensor | None:
        """`top_acts`, `neg_acts` or `quant_acts` in rank order (a new tensor; any other field as is)."""
        acts = getattr(self, name)
        slot = {"top_acts": self.top_slot, "neg_acts": self.neg_slot, "quant_acts": self.quant_slot}.get(name)
        if acts is None or slot is None:
            return acts
        index = slot.long().unsqueeze(-1).expand(*slot.shape, acts.shape[-1])
        return acts.gather(slot.dim() - 1, index)


SLOT_FIELDS = ("top_slot", "neg_slot", "quant_slot")
"""The fields that say where activations lie in their pools: device layout, never stored."""


def identity_slots(shape: tuple, device) -> torch.Tensor:
    """Slot maps with every rank in its own slot (a fresh state, or one made from stored arrays)."""
    return torch.arange(shape[-1], dtype=torch.int32, device=device).expand(shape).contiguous()


def state_bytes(spec: ReductionSpec, n: int, act_dtype: torch.dtype) -> int:
    """Device bytes that `LayerState.empty(spec, n, ...)` allocates (the prefix buffer included)."""
    a = torch.empty((), dtype=act_dtype).element_size()
    K, T, R, Q, S, P, H = (
        spec.top_k, spec.excerpt_len, spec.random_k, spec.n_buckets, spec.quantile_k,
        spec.quantile_prefix, spec.hist_bins,
    )
    per_neuron = (
        K * (4 + 8 + 4) + K * T * a  # top: maxima, ids, slots, activations
        + (K * (4 + 8 + 4) + K * T * a if spec.negatives else 0)
        + R * T * a
        + P * 4
        + (Q - 1) * 4 + Q * S * (8 + 8 + 4) + Q * S * T * a
        + (H + 2) * 8 + 2 * 4
        + 4 * 8 + 4 + 4 + 8
    )
    return n * per_neuron


# ---------------------------------------------------------------------------------------------
# The update


def _pool_merge(slot: torch.Tensor, src: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot maps after a merge (see Pools in the module docstring), along the last axis.

    slot [..., L]: the old list's slots; src [..., L]: each new rank's source, an old rank (< L)
    or a candidate (>= L), from a stable merge, so the old entries that stay are ranks 0..L-a-1.
    Returns (new slots, admitted mask)."""
    adm = src >= L
    a = adm.sum(-1, keepdim=True)
    i = adm.to(torch.int64).cumsum(-1) - 1  # an admitted entry's index among the admitted
    freed = slot.gather(-1, (L - a + i).clamp(0, L - 1))
    kept = slot.gather(-1, src.clamp(max=L - 1))
    return torch.where(adm, freed, kept), adm


def _pool_write(pool: torch.Tensor, new_slot: torch.Tensor, adm: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool [N, M, T] with rows [N, M, T] written to slots new_slot [N, M] where adm (every slot
    of the pool appears once in new_slot, so the others are rewritten with what they hold)."""
    index = new_slot.long().unsqueeze(-1).expand_as(rows)
    return pool.scatter(1, index, torch.where(adm.unsqueeze(-1), rows, pool.gather(1, index)))


def _merge_extreme(vals, ids, acts, slot, batch_vals, batch_ids, acts_nbt, descending: bool):
    K = vals.shape[1]
    N, B = batch_vals.shape
    T = acts.shape[-1]
    cat_v = torch.cat([vals, batch_vals], dim=1)
    cat_i = torch.cat([ids, batch_ids.unsqueeze(0).expand(N, B)], dim=1)
    src = torch.sort(cat_v, dim=1, descending=descending, stable=True).indices[:, :K]
    new_slot, adm = _pool_merge(slot, src, K)
    rows = acts_nbt.gather(1, (src - K).clamp(min=0).unsqueeze(-1).expand(-1, -1, T))
    return cat_v.gather(1, src), cat_i.gather(1, src), _pool_write(acts, new_slot, adm, rows), new_slot


def _bin_index(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, H: int) -> torch.Tensor:
    """Histogram bin of x [N, B] for ranges lo, hi [N, 1]: see the module docstring."""
    f = torch.floor((x - lo) / (hi - lo) * H)
    # NaN (a non-finite batch, which the recorder stops on) takes bin 1 as in the Triton kernel,
    # never the wild index that casting NaN to an integer gives.
    t = torch.nan_to_num(f, nan=0.0).clamp(0, H - 1).to(torch.int64) + 1
    t = torch.where(x < lo, torch.zeros_like(t), t)
    return torch.where(x > hi, torch.full_like(t, H + 1), t)


def set_boundaries(state: LayerState, spec: ReductionSpec, n_prefix: int) -> None:
    """Quantile boundaries and histogram range from the first n_prefix prefix maxima."""
    if n_prefix == 0:
        return
    H = spec.hist_bins
    pm = state.prefix_max[:, :n_prefix]
    s = torch.sort(pm.double(), dim=1).values
    pos = torch.tensor(spec.quantile_probs, dtype=torch.float64, device=pm.device) * (n_prefix - 1)
    lo_i = pos.floor().long()
    hi_i = pos.ceil().long()
    frac = pos - lo_i
    bounds = s[:, lo_i] + frac * (s[:, hi_i] - s[:, lo_i])
    state.quant_bounds.copy_(bounds.float())
    lo, hi = s[:, 0], s[:, -1]
    span = hi - lo
    flat = span <= 0
    lo = torch.where(flat, lo - 0.5, lo).float()
    hi = torch.where(flat, hi + 0.5, hi + 0.25 * span).float()
    state.hist_range.copy_(torch.stack([lo, hi], dim=1))
    idx = _bin_index(pm, lo.unsqueeze(1), hi.unsqueeze(1), H)
    state.hist.scatter_add_(1, idx, torch.ones_like(idx))
    state.bounds_ready = True
    state.prefix_max = state.prefix_max[:, :0]


def _merge_moments(state: LayerState, x: torch.Tensor) -> torch.Tensor:
    """Fold the batch x [B, T, N] (float32) into the running moments (Pebay's pairwise update).

    Returns a 0-d bool tensor: whether the batch held a NaN or an infinity (they poison s1)."""
    nb = x.shape[0] * x.shape[1]
    c = x.mean(dim=(0, 1))
    d = x - c
    d2 = d * d

    def total(v):  # float32 within an excerpt, float64 across excerpts
        return v.sum(1).double().sum(0)

    s1, s2, s3, s4 = total(d), total(d2), total(d2 * d), total(d2 * d2)
    u = s1 / nb  # exact batch mean = c + u; |u| is rounding-small
    mb = c.double() + u
    m2b = s2 - nb * u * u
    m3b = s3 - 3 * u * s2 + 2 * nb * u**3
    m4b = s4 - 4 * u * s3 + 6 * u * u * s2 - 3 * nb * u**4
    nonfinite = ~torch.isfinite(s1).all()
    na = state.count
    if na == 0:
        state.moments.copy_(torch.stack([mb, m2b, m3b, m4b], dim=1))
        return nonfinite
    n = na + nb
    ma, m2a, m3a, m4a = state.moments.unbind(1)
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = m2a + m2b + delta**2 * (na * nb / n)
    m3 = (
        m3a + m3b
        + delta**3 * (na * nb * (na - nb) / n**2)
        + 3 * delta * (na * m2b - nb * m2a) / n
    )
    m4 = (
        m4a + m4b
        + delta**4 * (na * nb * (na * na - na * nb + nb * nb) / n**3)
        + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
        + 4 * delta * (na * m3b - nb * m3a) / n
    )
    state.moments.copy_(torch.stack([mean, m2, m3, m4], dim=1))
    return nonfinite


def update_layer(state: LayerState, spec: ReductionSpec, acts: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Fold acts [B, T, N] of `batch` into `state`. Returns a 0-d bool tensor: any non-finite value.

    Nothing here reads a value back to the host, so a caller can queue every layer of a forward
    pass and check the returned flags once, later.
    """
    B, T, N = acts.shape
    x = acts.float()
    emax = x.amax(dim=1).T.contiguous()  # [N, B]
    if spec.negatives:
        emin = x.amin(dim=1).T.contiguous()
    # [N, B, T]. One contiguous copy, then 4 gathers from it: on the CPU (N 1536, B 64, T 64) about
    # 40 + 4 x 9 ms against 4 x 30 ms gathering from the strided view.
    acts_nbt = acts.permute(2, 0, 1).contiguous()

    state.top_max, state.top_ids, state.top_acts, state.top_slot = _merge_extreme(
        state.top_max, state.top_ids, state.top_acts, state.top_slot, emax, batch.ids, acts_nbt, descending=True
    )
    if spec.negatives:
        state.neg_min, state.neg_ids, state.neg_acts, state.neg_slot = _merge_extreme(
            state.neg_min, state.neg_ids, state.neg_acts, state.neg_slot, emin, batch.ids, acts_nbt,
            descending=False
        )
    new = batch.random_rows >= 0
    rows = acts_nbt[:, batch.random_rows.clamp(min=0)]  # [N, R, T]
    state.random_acts = torch.where(new.view(1, -1, 1), rows, state.random_acts)

    # Prefix rows only record their maxima; the rest are binned and quantile-sampled.
    p = batch.prefix_rows
    if p:
        state.prefix_max[:, batch.first_id : batch.first_id + p] = emax[:, :p]
    if batch.completes_prefix:
        set_boundaries(state, spec, spec.quantile_prefix)
    if state.bounds_ready and p < B:
        e = emax[:, p:]
        lo, hi = state.hist_range[:, :1], state.hist_range[:, 1:]
        state.hist.scatter_add_(1, _bin_index(e, lo, hi, spec.hist_bins), torch.ones_like(e, dtype=torch.int64))
        bucket = (e.unsqueeze(-1) >= state.quant_bounds.unsqueeze(1)).sum(-1)  # [N, B - p]
        S, Q = spec.quantile_k, spec.n_buckets
        prio = batch.quant_prio[p:]
        ids = batch.ids[p:]
        qs = torch.arange(Q, device=acts.device).view(1, Q, 1)
        member = bucket.unsqueeze(1) == qs  # [N, Q, B - p]
        cand_prio = torch.where(member, prio.view(1, 1, -1), INT64_MAX)
        cand_ids = torch.where(member, ids.view(1, 1, -1), -1)
        cat_p = torch.cat([state.quant_prio, cand_prio], dim=2)
        cat_i = torch.cat([state.quant_ids, cand_ids], dim=2)
        src = torch.sort(cat_p, dim=2, stable=True).indices[:, :, :S]  # [N, Q, S]
        state.quant_prio = cat_p.gather(2, src)
        state.quant_ids = cat_i.gather(2, src)
        # Each bucket is a list of S with a pool of its own: slots are 0..S-1 within the bucket.
        new_slot, adm = _pool_merge(state.quant_slot, src, S)
        rows = acts_nbt.gather(1, ((src - S).clamp(min=0) + p).reshape(N, Q * S, 1).expand(-1, -1, T))
        flat_slot = (new_slot + torch.arange(Q, device=acts.device, dtype=torch.int32).view(1, Q, 1) * S)
        state.quant_acts = _pool_write(state.quant_acts.reshape(N, Q * S, T), flat_slot.reshape(N, Q * S),
                                       adm.reshape(N, Q * S), rows).reshape(N, Q, S, T)
        state.quant_slot = new_slot

    xs = x.reshape(B * T, N)
    nonfinite = _merge_moments(state, x)
    state.count += B * T
    state.amin = torch.minimum(state.amin, xs.amin(0))
    state.amax = torch.maximum(state.amax, xs.amax(0))
    state.n_positive += (xs > 0).sum(0)
    return nonfinite


def finish_layer(state: LayerState, spec: ReductionSpec, excerpts_seen: int) -> None:
    """At the end of a run shorter than the prefix: set boundaries from the prefix seen so far."""
    if not state.bounds_ready:
        set_boundaries(state, spec, min(excerpts_seen, spec.quantile_prefix))


def moment_stats(count: int, moments: np.ndarray) -> dict[str, np.ndarray]:
    """mean, variance (population), skewness and excess kurtosis from (mean, M2, M3, M4) [N, 4]."""
    mean, m2, m3, m4 = (moments[:, i] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / count
        skew = np.where(m2 > 0, np.sqrt(count) * m3 / m2**1.5, np.nan)
        kurt = np.where(m2 > 0, count * m4 / (m2 * m2) - 3.0, np.nan)
    return {"mean": mean, "variance": var, "skewness": skew, "kurtosis": kurt}
