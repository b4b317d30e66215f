"""Shared last step of the task-vector family: sign election and (disjoint) weighted merge.

Given sparsified task vectors δ̃_i and weights w_i:

- no election:  mixed = Σ w_i δ̃_i, divided by Σ w_i when `normalize` (Σ w ≈ 0 → no division).
- election (TIES), `compat="paper"` (Yadav et al.; peft's `ties`): the sign
  s = sgn(Σ_i δ̃_i) ("sum") or sgn(Σ_i sgn δ̃_i) ("count") on the *unweighted* trimmed vectors,
  s = +1 where the total is 0; agreeing set A = {i : sgn δ̃_i = s} (zeros never agree);
  mixed = Σ_{i∈A} w_i δ̃_i / max(|A|, 1) (dis-mean) when `normalize`, else the dis-sum.
- election, `compat="mergekit"`: the same on ω_i = w_i δ̃_i, and the dis-mean divides by
  Σ_{i∈A} w_i (1 where that is 0).

The result is base + λ·mixed with λ = `scale`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from merge.methods._checks import check_choice
from merge.methods._fused import as_array, loops, usable
from merge.methods._stream import ElementRandom
from merge.methods.selection import Random, bernoulli_mask, keep_top, uniform
from merge.threads import one_thread

ELECT_CHOICES = ("sum", "count")


def elect_sign(vectors: Sequence[Tensor], elect: str) -> Tensor:
    """+1/−1 per entry: the sign of Σ v_i ("sum") or of Σ sgn(v_i) ("count"); 0 counts as +1."""
    total = torch.zeros_like(vectors[0])
    for v in vectors:
        total.add_(v if elect == "sum" else v.sign())
    # copysign(1, +0.0) = +1: a zero total elects +. (Float ops only: bool tensors are slow here.)
    return torch.ones_like(total).copysign_(total)


def _agreeing(v: Tensor, sign: Tensor) -> Tensor:
    """|v| where sgn v = sign (zeros never agree), else 0."""
    return (v * sign).clamp_(min=0.0)


def combine(
    method: str,
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: Sequence[float],
    *,
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
) -> Tensor:
    """base + scale · merge(δ̃_i, w_i), with or without TIES sign election (see module doc)."""
    if elect is None:
        mixed = torch.zeros_like(base)
        for d, w in zip(deltas, weight):
            mixed.add_(d, alpha=float(w))
        total = float(sum(weight))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
        return mixed.mul_(scale).add_(base)
    check_choice(method, "elect", elect, ELECT_CHOICES)
    if compat == "mergekit":
        weighted = [d * float(w) for d, w in zip(deltas, weight)]
        sign = elect_sign(weighted, elect)
        mixed = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for v, w in zip(weighted, weight):
            a = _agreeing(v, sign)
            mixed.add_(a)
            div.add_(a.sign_(), alpha=float(w))
        mixed.mul_(sign)
        if normalize:
            # div == 0 → divide by 1 (mixed is 0 there): add 1 exactly where div is 0
            mixed.div_(div.add_(1.0 - div.abs().sign()))
        return mixed.mul_(scale).add_(base)
    sign = elect_sign(deltas, elect)
    mixed = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for d, w in zip(deltas, weight):
        a = _agreeing(d, sign)
        mixed.add_(a, alpha=float(w))
        count.add_(a.sign_())
    mixed.mul_(sign)
    if normalize:
        mixed.div_(count.clamp_(min=1.0))
    return mixed.mul_(scale).add_(base)


CHUNK = 1 << 18  # elements per fused chunk: every temporary stays in cache


def magnitude_thresholds(
    tensors: Sequence[Tensor], base: Tensor, density: Sequence[float], *, at_least_one: bool = False
) -> list[float | None]:
    """Per model, the k-th largest |x_i − base| (k = ⌊d_i·n⌋, ≥ 1 with `at_least_one` as in
    mergekit 0.1.5); None at density 1, inf at k = 0."""
    from merge.methods.selection import keep_count, kth_largest_abs

    out: list[float | None] = []
    n = base.numel()
    for x, d in zip(tensors, density):
        k = keep_count(n, float(d))
        if at_least_one and n > 0:
            k = max(k, 1)
        if float(d) >= 1.0:
            out.append(None)
        elif k == 0:
            out.append(float("inf"))
        else:
            out.append(kth_largest_abs(x, k, minus=base))
    return out


def fused_merge(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    *,
    thresholds: Sequence[float | None] | None = None,
    cuts: Sequence[int] | None = None,
    offset: int = 0,
    keep_prob: Sequence[float] | None = None,
    generator: Random = None,
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
    widen: bool = False,
) -> Tensor:
    """`combine` of sparsified task vectors, chunk by chunk with reused buffers.

    Per chunk: δ_i = x_i − base; zero |δ_i| < thresholds[i] (magnitude trim; entries equal to
    it are kept below the flat index cuts[i] only, so exactly k survive); drop with
    Bernoulli(keep_prob[i]) and rescale by 1/keep_prob[i] (DARE, paper); then `combine`.
    `offset` is the flat index of the first element (the inputs may be one chunk of a larger
    tensor). Random draws: a torch generator draws chunk by chunk, model by model; an
    `ElementRandom` draws by element index, model i on stream i. `widen`: bfloat16 inputs
    stand for their float32 values (a streamed kernel's chunks as read); the result is float32.
    """
    # the loop reads flat views (a non-contiguous input's reshape is a contiguous copy)
    tensors = [x.reshape(-1) for x in tensors]
    shape, base = base.shape, base.reshape(-1)
    looped = compat == "paper" and usable(base, *tensors, widen=widen)
    if widen and (not looped or len({x.dtype for x in tensors}) > 1):
        # the torch path, or a mix the loop's one model type cannot take: float32 copies
        tensors = [x.float() for x in tensors]
        base = base.float()
    with one_thread():
        return _fused_merge(
            method,
            tensors,
            base,
            weight,
            thresholds,
            cuts,
            offset,
            keep_prob,
            generator,
            elect,
            normalize,
            scale,
            compat,
            looped,
        ).reshape(shape)


def _fused_merge(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    thresholds: Sequence[float | None] | None,
    cuts: Sequence[int] | None,
    offset: int,
    keep_prob: Sequence[float] | None,
    generator: Random,
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
    looped: bool,
) -> Tensor:
    n = base.numel()
    flat_b = base.reshape(-1)
    flats = [x.reshape(-1) for x in tensors]
    if looped and n:
        return _looped_merge(
            flats,
            flat_b,
            weight,
            thresholds,
            cuts,
            offset,
            keep_prob,
            generator,
            elect,
            normalize,
            scale,
        ).reshape(base.shape)
    out = torch.empty_like(flat_b)
    size = min(CHUNK, n)
    bufs = [torch.empty(size, dtype=base.dtype, device=base.device) for _ in tensors]
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        b = flat_b[start:stop]
        deltas = []
        for i, x in enumerate(flats):
            d = torch.sub(x[start:stop], b, out=bufs[i][: stop - start])
            thr = thresholds[i] if thresholds is not None else None
            if thr is not None:
                d = keep_top(d, offset + start, thr, cuts[i] if cuts is not None else n + offset)
            p = float(keep_prob[i]) if keep_prob is not None else 1.0
            if p < 1.0:
                g = generator.at(start) if isinstance(generator, ElementRandom) else generator
                d.mul_(bernoulli_mask(d.shape, p, g, d.device, stream=i)).div_(p)
            deltas.append(d)
        out[start:stop] = combine(
            method, b, deltas, weight, elect=elect, normalize=normalize, scale=scale, compat=compat
        )
    return out.reshape(base.shape)


_ELECT_CODES = {None: 0, "sum": 1, "count": 2}


def run_merge_loop(
    loop: Callable[..., None],
    flats: Sequence[Tensor],
    flat_b: Tensor,
    sparsify: Sequence[object],
    weight: Sequence[float],
    elect: str | None,
    normalize: bool,
    scale: float,
    method: str = "ties",
) -> Tensor:
    """A compiled task-vector merge: `loop(models, base, *sparsify, weights, elect code,
    divide, total, scale, out)`, whose last step is `_loops._combine_into` (`combine`'s
    weight, elect and normalize as it takes them). Returns the flat float32 output."""
    if elect is not None:
        check_choice(method, "elect", elect, ELECT_CHOICES)
    total = float(sum(float(w) for w in weight))
    out = torch.empty(flat_b.numel(), dtype=torch.float32)
    loop(
        tuple(as_array(x) for x in flats),
        as_array(flat_b),
        *sparsify,
        np.asarray([float(w) for w in weight], dtype=np.float32),
        _ELECT_CODES[elect],
        bool(normalize and (elect is not None or abs(total) >= 1e-8)),
        np.float32(total),
        np.float32(scale),
        out.numpy(),
    )
    return out


def row_loop_operands(
    tensors: Sequence[Tensor], base: Tensor, compat: str
) -> tuple[list[Tensor], Tensor, int] | None:
    """Flat views of a row-wise method's operands and its row length (the last dimension;
    a 1-D tensor is one row) when its compiled loop takes them: paper arithmetic, CPU float32,
    every model shaped as the base, at least one dimension and one element. None otherwise."""
    if compat != "paper" or base.dim() == 0 or base.numel() == 0:
        return None
    if any(x.shape != base.shape for x in tensors):
        return None
    flats, flat_b = [x.reshape(-1) for x in tensors], base.reshape(-1)
    if not usable(flat_b, *flats):
        return None
    return flats, flat_b, int(base.shape[-1]) if base.dim() > 1 else base.numel()


def _looped_merge(
    flats: Sequence[Tensor],
    flat_b: Tensor,
    weight: Sequence[float],
    thresholds: Sequence[float | None] | None,
    cuts: Sequence[int] | None,
    offset: int,
    keep_prob: Sequence[float] | None,
    generator: Random,
    elect: str | None,
    normalize: bool,
    scale: float,
) -> Tensor:
    """`_fused_merge` in one compiled loop (`_loops.task_vector_merge`): the same float32
    operations per element, the same draws (made here, by torch, per model)."""
    n, k = flat_b.numel(), len(flats)
    nan = float("nan")  # no trim
    thr = [nan] * k if thresholds is None else [nan if t is None else float(t) for t in thresholds]
    cut = [n + offset] * k if cuts is None else [int(c) for c in cuts]
    prob = [1.0] * k if keep_prob is None else [float(p) for p in keep_prob]
    uniforms = np.empty((0, 0), dtype=np.float32)
    seeds = np.empty((0, 2), dtype=np.uint64)
    draw_offset = 0
    if isinstance(generator, ElementRandom):  # drawn inside the loop, by element
        seeds = np.asarray([generator.seed(i) for i in range(k)], dtype=np.uint64)
        draw_offset = generator.offset
    elif any(p < 1.0 for p in prob):
        # A torch generator's draws, in the torch path's order: chunk by chunk, model by model.
        drawn = torch.empty((k, n), dtype=torch.float32)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            for i, p in enumerate(prob):
                if p < 1.0:
                    drawn[i, start:stop] = uniform((stop - start,), generator, stream=i)
        uniforms = drawn.numpy()
    sparsify = (
        np.asarray(thr, dtype=np.float32),
        np.asarray(cut, dtype=np.int64),
        np.asarray(prob, dtype=np.float32),
        uniforms,
        seeds,
        draw_offset,
        offset,
    )
    return run_merge_loop(
        loops().task_vector_merge, flats, flat_b, sparsify, weight, elect, normalize, scale
    )
