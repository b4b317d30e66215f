"""Compiled loops (numba) for the hot passes of the streaming task-vector kernels, on the CPU.

Each pass of a TIES merge used to be a dozen torch operations over a 4M-element chunk: every
one reads and writes 16 MB that do not fit in cache, so a pass cost 5-10 times a linear merge's
arithmetic. Here each pass is one loop that reads every input element once and keeps its
temporaries in registers. The arithmetic is IEEE float32, operation for operation what the torch
expressions in `_gta.py` and `selection.py` do, except that a weighted add is rounded twice (torch's
vectorised `add_(x, alpha=w)` may fuse it): results agree with the torch path to the last bit
or two, and a merge's bytes never depend on how its tensors were cut into chunks.

Imported lazily (`_fused.loops()`): numba takes ~0.3 s to import and each loop is compiled once
per machine (`cache=True` keeps the machine code next to this file, or in numba's user cache).
Every function releases the GIL, so the engine's reader and writer threads run alongside.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Compiled once per machine and kept (cache); run without the GIL, so reader and writer go on.
_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
_BLOCK = 512  # elements per register-sized staging block (float32 values and their bits)
_INF = np.float32(np.inf)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


_M32 = np.uint64(0xFFFFFFFF)


@intrinsic
def _float_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the uint32 `bits` (a register reinterpretation)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float(typingctx, x):  # type: ignore[no-untyped-def]
    """The uint32 bits of the float32 `x` (a register reinterpretation)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def value(array, i):  # type: ignore[no-untyped-def]
    """array[i] as a float32: a float32 array's element, or the float32 value of a bfloat16
    array's element, given as its uint16 bits (widened in a register: bfloat16 is float32's
    high half, so the value is exact). Every loop reading model or base chunks reads them
    through this, so a bfloat16 model is merged as read, without a float32 copy of it."""


@overload(value, inline="always")
def _value(array, i):  # type: ignore[no-untyped-def]
    if array.dtype == types.uint16:
        return lambda array, i: _float_from_bits(np.uint32(array[i]) << np.uint32(16))  # type: ignore[call-arg]
    return lambda array, i: array[i]


@_jit
def all_finite_bfloat16(bits):  # type: ignore[no-untyped-def]
    """Whether no bfloat16 (uint16 bits) is NaN or ±inf: all 8 exponent bits set. Four values
    per 64-bit word: adding 0x0080 to a value's exponent bits carries into its bit 15 exactly
    when all of them are set, and never into the next value."""
    n = bits.shape[0]
    words = n // 4
    packed = bits[: words * 4].view(np.uint64)
    exponent = np.uint64(0x7F807F807F807F80)
    carry = np.uint64(0x0080008000800080)
    top = np.uint64(0x8000800080008000)
    bad = np.uint64(0)
    for i in range(words):
        bad |= ((packed[i] & exponent) + carry) & top
    for i in range(words * 4, n):
        bad |= np.uint64((bits[i] & np.uint16(0x7F80)) == np.uint16(0x7F80))
    return bad == 0


@numba.njit(inline="always")
def mix32(x):  # type: ignore[no-untyped-def]
    """C. Wellons' lowbias32 integer mixer on the low 32 bits (uint64 arithmetic, masked)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


@_jit
def counter_uniform(low, high, offset, out):  # type: ignore[no-untyped-def]
    """out[i] = U[0, 1) draw of element offset + i under the seed (low, high): see
    `_stream.ElementRandom`."""
    for i in range(out.shape[0]):
        out[i] = draw(offset + i, low, high)


@numba.njit(inline="always")
def draw(index, low, high):  # type: ignore[no-untyped-def]
    """The U[0, 1) draw of flat element `index` under the seed (low, high)."""
    g = np.uint64(index)
    h = mix32((g & _M32) ^ low)
    h = mix32(h ^ (g >> np.uint64(32)) ^ high)
    return np.float32(h >> np.uint64(8)) * np.float32(1.0 / 16777216.0)


@_jit
def abs_diff_high_histogram(x, b, hist):  # type: ignore[no-untyped-def]
    """hist[bits(|x_i − b_i|) >> 16] += 1 for every i (float32; bits order non-negative floats)."""
    n = x.shape[0]
    vals = np.empty(_BLOCK, np.float32)
    keys = vals.view(np.uint32)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        xb, bb = x[s : s + m], b[s : s + m]  # slices: indices provably >= 0, so it vectorises
        for j in range(m):
            vals[j] = abs(value(xb, j) - value(bb, j))
        for j in range(m):
            hist[keys[j] >> 16] += 1


@_jit
def abs_diff_collect(x, b, lo, hi, start, vals_out, idx_out, filled, hist):  # type: ignore[no-untyped-def]
    """Append |x_i − b_i| and start + i for every i whose high 16 bits lie in [lo, hi], from
    position `filled` (≥ 0) of the outputs, in index order; with a non-empty `hist`, also count every
    entry's high bits into it. Returns the new fill, or -1 when the outputs are full (the
    histogram is still completed)."""
    n = x.shape[0]
    cap = vals_out.shape[0]
    count = hist.shape[0] > 0
    vals = np.empty(_BLOCK, np.float32)
    keys = vals.view(np.uint32)
    low, span = np.uint32(lo), np.uint32(hi - lo)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        xb, bb = x[s : s + m], b[s : s + m]
        for j in range(m):
            vals[j] = abs(value(xb, j) - value(bb, j))
        if count:
            for j in range(m):
                hist[keys[j] >> 16] += 1
        for j in range(m):
            # one unsigned comparison for lo <= high <= hi; no early exit, so it stays tight
            if (keys[j] >> np.uint32(16)) - low <= span:
                if filled < cap:
                    vals_out[filled] = vals[j]
                    idx_out[filled] = start + s + j
                filled += 1
    return filled if filled <= cap else -1


@_jit
def task_vector_merge(  # type: ignore[no-untyped-def]
    xs,
    b,
    threshold,
    cut,
    keep_prob,
    uniforms,
    seeds,
    draw_offset,
    offset,
    weight,
    elect,
    normalize,
    total,
    scale,
    out,
):
    """out_i = b_i + scale · merge_j(δ̃_ij) with δ_ij = x_j,i − b_i (see `_gta.fused_merge`).

    threshold[j]: NaN keeps every entry; otherwise the magnitude trim of `selection.keep_top`
    (|δ| > t kept; |δ| = t kept before the flat index cut[j]; t = inf keeps none, t ≤ 0 all).
    keep_prob[j] < 1: DARE's drop, δ·min(⌊u + p⌋, 1)/p, with u the counter draws of element
    draw_offset + i under seeds[j] = (low, high) when `seeds` has rows, else uniforms[j, i].
    elect: 0 none
    (weighted sum, divided by `total` when normalize), 1 "sum", 2 "count" (the paper's
    dis-mean). `offset` is the flat index of element 0. Block by block, each step a plain loop
    over the block (the compiler vectorises those).
    """
    n = b.shape[0]
    k = len(xs)
    deltas = np.empty((k, _BLOCK), np.float32)
    vote = np.empty(_BLOCK, np.float32)
    mixed = np.empty(_BLOCK, np.float32)
    count = np.empty(_BLOCK, np.float32)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        # slices, so every index is provably >= 0 and the loops vectorise
        bb, ob = b[s : s + m], out[s : s + m]
        for j in range(k):
            x = xs[j][s : s + m]
            d = deltas[j]
            for i in range(m):
                d[i] = value(x, i) - value(bb, i)
            t = threshold[j]
            if t == _INF:
                for i in range(m):
                    d[i] = _ZERO
            elif t > _ZERO:  # NaN (no trim) and t <= 0 keep everything
                # entries equal to t are kept below the cut (two loops: no index test inside)
                edge = max(0, min(m, cut[j] - offset - s))
                for i in range(edge):
                    d[i] = d[i] if abs(d[i]) >= t else _ZERO
                for i in range(edge, m):
                    d[i] = d[i] if abs(d[i]) > t else _ZERO
            p = keep_prob[j]
            if p < _ONE:
                if seeds.shape[0]:
                    low, high = seeds[j, 0], seeds[j, 1]
                    at = draw_offset + s
                    for i in range(m):
                        u = draw(at + i, low, high)
                        d[i] = d[i] * min(np.float32(np.floor(u + p)), _ONE) / p
                else:
                    ub = uniforms[j][s : s + m]
                    for i in range(m):
                        d[i] = d[i] * min(np.float32(np.floor(ub[i] + p)), _ONE) / p
        _combine_into(deltas, m, weight, elect, normalize, total, scale, bb, ob, vote, mixed, count)


@numba.njit(inline="always")
def _combine_into(deltas, m, weight, elect, normalize, total, scale, bb, ob, vote, mixed, count):  # type: ignore[no-untyped-def]
    """ob = bb + scale · merge_j(deltas[j][:m]) (`_gta.combine`, paper): elect 0 a weighted
    sum (divided by `total` when normalize), 1 "sum", 2 "count" (the dis-mean)."""
    k = deltas.shape[0]
    if elect == 0:
        for i in range(m):
            mixed[i] = _ZERO
        for j in range(k):
            w = weight[j]
            d = deltas[j]
            for i in range(m):
                mixed[i] = mixed[i] + w * d[i]
        for i in range(m):
            v = mixed[i] / total if normalize else mixed[i]
            ob[i] = v * scale + value(bb, i)
        return
    for i in range(m):
        vote[i] = _ZERO
        mixed[i] = _ZERO
        count[i] = _ZERO
    for j in range(k):
        d = deltas[j]
        if elect == 1:
            for i in range(m):
                vote[i] = vote[i] + d[i]
        else:
            for i in range(m):
                vote[i] = vote[i] + (np.float32(d[i] > _ZERO) - np.float32(d[i] < _ZERO))
    for i in range(m):
        vote[i] = np.float32(np.copysign(_ONE, vote[i]))  # a zero total elects +
    for j in range(k):
        w = weight[j]
        d = deltas[j]
        for i in range(m):
            a = max(d[i] * vote[i], _ZERO)  # |δ| where its sign agrees; zeros never agree
            mixed[i] = mixed[i] + w * a
            count[i] = count[i] + np.float32(a > _ZERO)
    for i in range(m):
        v = mixed[i] * vote[i]
        if normalize:
            v = v / max(count[i], _ONE)
        ob[i] = v * scale + value(bb, i)


@_jit
def _top_bin(hist, need):  # type: ignore[no-untyped-def]
    """(bin holding the need-th largest entry of a histogram, entries above that bin)."""
    above = 0
    b = hist.shape[0] - 1
    while above + hist[b] < need:
        above += hist[b]
        b -= 1
    return b, above


@_jit
def top_order_statistic(vals, idx, need, one_bin):  # type: ignore[no-untyped-def]
    """(key, cut) for non-negative float32 `vals`: key the bits of the need-th largest value t,
    cut the position after the last entry equal to t that the top `need` take (-1 when they
    take every entry equal to t), as a flat index `idx[pos] + 1` when `idx` is not empty, else
    as a position in `vals`. `one_bin`: every value has the same high 16 bits (StreamingTopK's
    collected bin), so only the low bits are counted."""
    n = vals.shape[0]
    keys = vals.view(np.uint32)
    high = np.int64(keys[0] >> 16)
    if not one_bin:
        hist = np.zeros(1 << 16, np.int64)
        for i in range(n):
            hist[keys[i] >> 16] += 1
        high, above = _top_bin(hist, need)
        need -= above
    hist = np.zeros(1 << 16, np.int64)
    for i in range(n):
        key = keys[i]
        if key >> 16 == high:
            hist[key & 0xFFFF] += 1
    low, above = _top_bin(hist, need)
    key = (high << 16) | low
    taken = need - above  # entries equal to t that the top `need` take
    if taken == hist[low]:
        return key, -1
    seen = 0
    for i in range(n):
        if keys[i] == key:
            seen += 1
            if seen == taken:
                return key, (idx[i] if idx.shape[0] else i) + 1
    return key, -1  # not reached: more than `taken` entries equal t


# Float64 partial sums per Gram entry, one per element position mod LANES within its block:
# a lane row is a plain array, so adding a staged block's products to it is a loop the compiler
# vectorises (a few scalar accumulators were not: 0.6 ns per element and pair).
LANES = _BLOCK


@_jit
def gram_blocks(vectors, base, first, second, lanes, sums, fill, size):  # type: ignore[no-untyped-def]
    """Add the next m elements of K vectors (float32, or bfloat16 bits) to Gram sums taken
    over fixed blocks of `size` elements (`_gram.BlockGram`, flat): pair p accumulates
    vectors[first[p]] · vectors[second[p]] in float64 (products of float32 values are exact
    there) into lanes[p] (LANES of them) by the element's position in its block mod LANES,
    each lane summed in element order; a full block's lanes are added to sums[p] in a fixed
    order. `fill` is how far the current block is filled; returns the new fill. Nothing depends
    on where the chunks are cut. A non-empty `base` makes the vectors x − base (the float32
    difference, then widened)."""
    _check_lanes(lanes, first)
    staged = np.empty((len(vectors), LANES), np.float64)
    m = vectors[0].shape[0]
    pos = 0
    while pos < m:
        take = min(size - fill, m - pos)
        gram_in_block(
            vectors, len(vectors), base, first, second, lanes, staged, pos, pos + take, fill
        )
        fill += take
        pos += take
        if fill == size:
            flush_lanes(lanes, sums)
            fill = 0
    return fill


@numba.njit(inline="always")
def _check_lanes(lanes, first):  # type: ignore[no-untyped-def]
    if lanes.shape[1] != LANES or lanes.shape[0] != first.shape[0]:
        raise ValueError("gram: lanes must be (pairs, LANES)")  # unchecked indexing


@numba.njit(inline="always")
def gram_in_block(vectors, k, base, first, second, lanes, staged, pos, stop, fill):  # type: ignore[no-untyped-def]
    """Elements [pos, stop) of the first k vectors, which sit at `fill`.. of one block, into
    the lanes. Each vector is widened once per staging step, then every pair reads the copies
    (`merge.file_gram` sums its ranges by this loop too: the same bits)."""
    while pos < stop:
        lane0 = fill % LANES
        take = min(LANES - lane0, stop - pos)
        for v in range(k):
            src = vectors[v][pos : pos + take]
            row = staged[v]
            if base.shape[0]:
                sb = base[pos : pos + take]
                for j in range(take):
                    row[j] = np.float64(value(src, j) - value(sb, j))
            else:
                for j in range(take):
                    row[j] = np.float64(value(src, j))
        for p in range(first.shape[0]):
            a, b = staged[first[p]], staged[second[p]]
            lane = lanes[p][lane0 : lane0 + take]
            for j in range(take):
                lane[j] += a[j] * b[j]
        fill += take
        pos += take


@_jit
def flush_lanes(lanes, sums):  # type: ignore[no-untyped-def]
    """sums[p] += the block's lanes of pair p, added in lane order; the lanes are cleared."""
    for p in range(lanes.shape[0]):
        lane = lanes[p]
        block = 0.0
        for j in range(lane.shape[0]):
            block += lane[j]
            lane[j] = 0.0
        sums[p] += block


@numba.njit(inline="always")
def round_bfloat16(x):  # type: ignore[no-untyped-def]
    """(bfloat16 bits of float32 `x` rounded to nearest even, NaN as 0xFFFF, as torch's
    vectorised conversion; `x`'s magnitude bits as a signed int32, whose running max tells
    finiteness: below 0x7F800000 is finite). Loops take the max rather than OR-ing comparison
    flags, which kept the compiler from vectorising them (0.48 against 0.22 ns per value)."""
    u: int = _bits_from_float(x)  # type: ignore[call-arg]
    magnitude = np.int32(u & np.uint32(0x7FFFFFFF))
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    bits = np.uint16(np.uint32(0xFFFF) if magnitude > np.int32(0x7F800000) else rounded)
    return bits, magnitude


FINITE_BELOW = np.int32(0x7F800000)  # magnitude bits of +inf: a running max below it is finite


@_jit
def combine_two(v0, v1, c0, c1, out, out16):  # type: ignore[no-untyped-def]
    """out = v0·c0 + v1·c1 in float32, rounded after each product as torch's `v0 * c0 + v1 * c1`;
    with a non-empty `out16`, into it instead, rounded to bfloat16 (`store_bfloat16`'s rounding,
    in the same loop: one pass, 0.5 against 0.8 ns per value through a float32 block). Returns
    whether every value is finite (True when writing float32)."""
    if out16.shape[0] == 0:
        for i in range(out.shape[0]):
            out[i] = value(v0, i) * c0 + value(v1, i) * c1
        return True
    top = np.int32(0)
    for i in range(out16.shape[0]):
        out16[i], magnitude = round_bfloat16(value(v0, i) * c0 + value(v1, i) * c1)
        top = max(top, magnitude)
    return top < FINITE_BELOW


@_jit
def scaled_sum(xs, base, keep, share, out, out16):  # type: ignore[no-untyped-def]
    """out = base·keep + Σ_j xs[j]·share in float32, rounded after each product and each add,
    the models in order (Model Stock's (1 − t)·base + (t/N)·Σ x_j); with a non-empty
    `out16`, into it instead, rounded to bfloat16. Returns whether every value is finite."""
    rounded = out16.shape[0] > 0
    n = out16.shape[0] if rounded else out.shape[0]
    block = np.empty(_BLOCK, np.float32)
    top = np.int32(0)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        bb = base[s : s + m]
        ob = block[:m] if rounded else out[s : s + m]
        for i in range(m):
            ob[i] = value(bb, i) * keep
        last = len(xs) - 1 if rounded and len(xs) else len(xs)
        for j in range(last):
            x = xs[j][s : s + m]
            for i in range(m):
                ob[i] = ob[i] + value(x, i) * share
        if rounded:  # the last model's add and the rounding in one loop
            o16 = out16[s : s + m]
            if last < len(xs):
                x = xs[last][s : s + m]
                for i in range(m):
                    o16[i], magnitude = round_bfloat16(ob[i] + value(x, i) * share)
                    top = max(top, magnitude)
            else:
                for i in range(m):
                    o16[i], magnitude = round_bfloat16(ob[i])
                    top = max(top, magnitude)
    return top < FINITE_BELOW


@_jit
def store_bfloat16(values, out):  # type: ignore[no-untyped-def]
    """out (bfloat16 bits, uint16) = values (float32) rounded to nearest even, NaN as 0xFFFF
    (torch's vectorised conversion, bit for bit); returns whether every value is finite.
    Branch-free, so it vectorises: ±inf rounds to itself by the same formula."""
    top = np.int32(0)
    for i in range(values.shape[0]):
        out[i], magnitude = round_bfloat16(values[i])
        top = max(top, magnitude)
    return top < FINITE_BELOW


@_jit
def _select(keys, lo, hi, k):  # type: ignore[no-untyped-def]
    """The k-th smallest of the distinct keys[lo:hi] (k an index in [lo, hi)), found by
    partitioning them in place (Hoare, median-of-three pivots): keys[lo:k] end up below it and
    keys[k + 1:hi] above it."""
    while hi - lo > 2:
        mid = (lo + hi) // 2
        a, b, c = keys[lo], keys[mid], keys[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi - 1
        while i <= j:
            while keys[i] < pivot:
                i += 1
            while keys[j] > pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j + 1
        elif k >= i:
            lo = i
        else:
            return keys[k]
    if hi - lo == 2 and keys[lo] > keys[lo + 1]:
        keys[lo], keys[lo + 1] = keys[lo + 1], keys[lo]
    return keys[k]


@_jit
def banded_merge(xs, b, row, n_top, n_keep, weight, elect, normalize, total, scale, out):  # type: ignore[no-untyped-def]
    """Model Breadcrumbs on whole rows of `row` elements (`sparsify.breadcrumbs_band`, paper,
    then `_gta.combine`): per row and model, δ = x − b keeps its descending magnitude ranks
    [n_top[j], n_top[j] + n_keep[j]), ties ranked by index (the int64 key
    bits(|δ|)·row + (row − 1 − i) makes every key distinct); then `_combine_into` with
    `elect`. The band's edges are two order statistics of the keys."""
    n = b.shape[0]
    k = len(xs)
    deltas = np.empty((k, row), np.float32)
    magnitude = np.empty(row, np.float32)
    bits = magnitude.view(np.uint32)
    keys = np.empty(row, np.int64)
    work = np.empty(row, np.int64)
    vote = np.empty(row, np.float32)
    mixed = np.empty(row, np.float32)
    count = np.empty(row, np.float32)
    for s in range(0, n, row):
        bb, ob = b[s : s + row], out[s : s + row]
        for j in range(k):
            x, delta = xs[j][s : s + row], deltas[j]
            for i in range(row):
                delta[i] = value(x, i) - value(bb, i)
            top, keep = n_top[j], min(n_keep[j], row - n_top[j])
            if keep <= 0:
                for i in range(row):
                    delta[i] = _ZERO
            elif keep < row:
                for i in range(row):
                    magnitude[i] = abs(delta[i])
                for i in range(row):
                    keys[i] = np.int64(bits[i]) * row + (row - 1 - i)
                    work[i] = keys[i]
                first = row - top - keep  # 0-based rank of the lowest kept key
                low = _select(work, 0, row, first)
                high = _select(work, first, row, row - top - 1) if top > 0 else keys[0]
                for i in range(row):
                    inside = keys[i] >= low and (top == 0 or keys[i] <= high)
                    delta[i] = delta[i] if inside else _ZERO
        _combine_into(
            deltas, row, weight, elect, normalize, total, scale, bb, ob, vote, mixed, count
        )


_RADIX = 11  # bits per pass of the rank sort: three passes cover a float32 magnitude's 31 bits


@_jit
def _ascending_ranks(bits, ranks, keys, order, spare_keys, spare_order, counts):  # type: ignore[no-untyped-def]
    """ranks[i] = the position of bits[i] (uint32) in ascending order, ties by index (an LSD
    radix sort of (key, index) pairs: stable, three passes of 11 bits)."""
    n = bits.shape[0]
    for i in range(n):
        keys[i] = bits[i]
        order[i] = i
    mask = np.uint32((1 << _RADIX) - 1)
    for shift in range(0, 32, _RADIX):
        for c in range(counts.shape[0]):
            counts[c] = 0
        for i in range(n):
            counts[(keys[i] >> np.uint32(shift)) & mask] += 1
        at = 0
        for c in range(counts.shape[0]):
            here = counts[c]
            counts[c] = at
            at += here
        for i in range(n):
            c = (keys[i] >> np.uint32(shift)) & mask
            spare_keys[counts[c]] = keys[i]
            spare_order[counts[c]] = order[i]
            counts[c] += 1
        keys, spare_keys = spare_keys, keys
        order, spare_order = spare_order, order
    for j in range(n):
        ranks[order[j]] = j


@_jit
def della_merge(  # type: ignore[no-untyped-def]
    xs, b, row, density, epsilon, rescale, seeds, draw_offset, weight, elect, normalize, total,
    scale, out,
):  # fmt: skip
    """DELLA (paper) on whole rows of `row` elements (`sparsify.della_drop`, then
    `_gta.combine`): per row and model with density[j] < 1, δ = x − b is kept with probability
    p_i = (d − ε) + (2ε/(row − 1))·r_i, r_i its ascending magnitude rank in the row (ties by
    index), by the counter draw u of element draw_offset + i under seeds[j]: keep ⌊u + p⌋
    (at most 1), and δ·keep/p when `rescale`. Then `_combine_into` with `elect`."""
    n = b.shape[0]
    k = len(xs)
    deltas = np.empty((k, row), np.float32)
    magnitude = np.empty(row, np.float32)
    bits = magnitude.view(np.uint32)
    ranks = np.empty(row, np.int64)
    keys, spare_keys = np.empty(row, np.uint32), np.empty(row, np.uint32)
    order, spare_order = np.empty(row, np.int64), np.empty(row, np.int64)
    counts = np.empty(1 << _RADIX, np.int64)
    vote = np.empty(row, np.float32)
    mixed = np.empty(row, np.float32)
    count = np.empty(row, np.float32)
    for s in range(0, n, row):
        bb, ob = b[s : s + row], out[s : s + row]
        for j in range(k):
            x, delta = xs[j][s : s + row], deltas[j]
            for i in range(row):
                delta[i] = value(x, i) - value(bb, i)
            d, e = density[j], epsilon[j]
            if d >= 1.0:
                continue
            low, high = seeds[j, 0], seeds[j, 1]
            if row == 1:
                ranks[0] = 0
                step, floor = _ZERO, np.float32(d)
            else:
                for i in range(row):
                    magnitude[i] = abs(delta[i])
                _ascending_ranks(bits, ranks, keys, order, spare_keys, spare_order, counts)
                step = np.float32(2.0 * e / (row - 1))
                floor = np.float32(d - e)
            for i in range(row):
                p = floor + step * np.float32(ranks[i])
                u = draw(draw_offset + s + i, low, high)
                kept = delta[i] * min(np.float32(np.floor(u + p)), _ONE)
                delta[i] = kept / p if rescale else kept
        _combine_into(
            deltas, row, weight, elect, normalize, total, scale, bb, ob, vote, mixed, count
        )
