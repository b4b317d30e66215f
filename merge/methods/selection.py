"""Exact magnitude thresholds without full sorts: `kthvalue`, or bracket-on-a-sample-then-count.

`kth_largest_abs(x, k)` returns the k-th largest |x_i| exactly. For large tensors it draws a
fixed-seed sample of |x|, brackets the threshold between two sample order statistics a few
standard deviations apart, counts exactly how many entries lie above and inside the bracket (one
chunked pass over x, no fresh full-size temporaries), and finishes with `kthvalue` on the few
candidates inside the bracket. If the bracket misses (rare), it falls back to `kthvalue` on the
whole tensor, so the answer is always exact.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from merge.methods._fused import as_array, loops, usable
from merge.methods._stream import ElementRandom
from merge.threads import one_thread

SMALL = 1 << 18  # below this many elements a plain kthvalue is as fast as anything else
SAMPLE = 1 << 16  # sample size; the bracket then holds ~8/sqrt(SAMPLE) ≈ 3% of the entries
CHUNK = 1 << 20  # elements per counting chunk: fits in L2 and keeps temporaries small
_SIGMAS = 5.0  # bracket half-width in binomial standard deviations of the sample rank


def keep_count(numel: int, density: float) -> int:
    """k = ⌊density · n⌋ entries are kept (the TIES / peft / mergekit convention)."""
    return min(numel, int(density * numel))


def kth_largest_abs(
    x: Tensor, k: int, *, minus: Tensor | None = None, method: str = "auto"
) -> float:
    """The k-th largest of |x − minus| (1 ≤ k ≤ numel), exact; method: auto | kthvalue | bracket.

    `minus` (e.g. the base, so that x − minus is a task vector) is subtracted chunk by chunk,
    so the difference never exists as a full-size tensor on the bracket path.
    """
    flat = x.reshape(-1)
    sub = None if minus is None else minus.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} is outside [1, {n}]")
    if method == "kthvalue" or (method == "auto" and n < SMALL):
        a = flat.abs() if sub is None else (flat - sub).abs_()
        return float(a.kthvalue(n - k + 1).values)
    with one_thread():
        return _bracket_kth_largest_abs(flat, sub, k)


def _bracket_kth_largest_abs(flat: Tensor, sub: Tensor | None, k: int) -> float:
    n = flat.numel()
    g = torch.Generator(device=flat.device).manual_seed(0x5E1EC7)
    idx = torch.randint(n, (SAMPLE,), generator=g, device=flat.device)
    picked = flat[idx] if sub is None else flat[idx] - sub[idx]
    sample = picked.abs_().sort().values  # (SAMPLE,) ascending; small
    # Rank (0-based, ascending) of the threshold in the sample, and its binomial spread.
    q = 1.0 - k / n
    r = q * SAMPLE
    spread = _SIGMAS * math.sqrt(SAMPLE * q * (1.0 - q)) + 8.0
    lo_i, hi_i = int(r - spread), int(r + spread)
    lo = float(sample[lo_i]) if lo_i >= 0 else -1.0  # -1: every |x| is above it
    hi = float(sample[hi_i]) if hi_i < SAMPLE else math.inf
    above = torch.zeros((), dtype=torch.float64, device=flat.device)
    inside: list[Tensor] = []
    size = min(CHUNK, n)
    buf = torch.empty(size, dtype=flat.dtype, device=flat.device)
    scratch = torch.empty(size, dtype=flat.dtype, device=flat.device)
    band = torch.empty(size, dtype=torch.bool, device=flat.device)
    # hi = inf (bracket open above) counts nothing above; lo < 0 takes everything below hi.
    mid = (lo + hi) / 2 if math.isfinite(hi) else math.inf
    half = (hi - lo) / 2 if math.isfinite(hi) else math.inf
    wide = half * (1 + 1e-5) + 1e-30 if math.isfinite(hi) else math.inf
    for start in range(0, n, CHUNK):
        chunk = flat[start : start + CHUNK]
        m = chunk.numel()
        a, s, b = buf[:m], scratch[:m], band[:m]
        if sub is None:
            torch.abs(chunk, out=a)
        else:
            torch.sub(chunk, sub[start : start + CHUNK], out=a).abs_()
        if math.isfinite(hi):
            # #(a > hi) with float ops only (bool reductions are slow on CPU)
            above += torch.sub(a, hi, out=s).clamp_(min=0.0).sign_().sum(dtype=torch.float64)
            # a slightly wide band (rounding of a − mid), made exact below on the few candidates
            torch.le(torch.sub(a, mid, out=s).abs_(), wide, out=b)
            inside.append(a[b])
        else:
            inside.append(a[torch.ge(a, lo, out=b)])
    n_above = int(above)  # one host sync per tensor, after the loop
    cand = torch.cat(inside)
    cand = cand[(cand >= lo) & (cand <= hi)]  # exact band, on ~3% of the entries
    need = k - n_above  # rank of the threshold among the candidates, counted from the top
    if not 1 <= need <= cand.numel():  # bracket missed: exact fallback
        a_all = flat.abs() if sub is None else (flat - sub).abs_()
        return float(a_all.kthvalue(n - k + 1).values)
    return float(cand.kthvalue(cand.numel() - need + 1).values)


def _float32_below(thr: float) -> float:
    """The largest float32 below `thr` (> 0, a float32 value): its bit pattern minus one."""
    (bits,) = struct.unpack("<i", struct.pack("<f", thr))
    return float(struct.unpack("<f", struct.pack("<i", bits - 1))[0])


def trim_below(x: Tensor, thr: float, *, strict: bool = False) -> Tensor:
    """x where |x| ≥ thr (|x| > thr when `strict`), else 0 (hardshrink; no bool tensors)."""
    if thr == math.inf:
        return torch.zeros_like(x)
    if thr <= 0 and not strict:
        return x
    if strict or x.dtype != torch.float32:
        # hardshrink keeps |x| > λ; for ≥, λ is the largest value of x's dtype below thr.
        lam = (
            thr
            if strict
            else float(
                torch.nextafter(
                    torch.tensor(thr, dtype=x.dtype), torch.tensor(-math.inf, dtype=x.dtype)
                )
            )
        )
        return F.hardshrink(x, lam)
    return F.hardshrink(x, _float32_below(thr))


Random = Union[torch.Generator, ElementRandom, None]  # noqa: UP007  (runtime alias)


def uniform(
    shape: torch.Size | tuple[int, ...],
    generator: Random,
    device: torch.device | str = "cpu",
    *,
    stream: int = 0,
) -> Tensor:
    """U[0, 1) draws: from a torch generator in order, or indexed by element (`ElementRandom`,
    stream `stream`, so a chunk draws what the whole tensor draws at the same elements)."""
    if isinstance(generator, ElementRandom):
        return generator.uniform(math.prod(shape), stream).reshape(shape)
    return torch.rand(shape, generator=generator, device=device)


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    p: float | Tensor,
    generator: Random,
    device: torch.device | str = "cpu",
    *,
    stream: int = 0,
) -> Tensor:
    """A float 0/1 mask, 1 with probability p: ⌊u + p⌋ for u ~ U[0, 1) (i.e. u ≥ 1 − p)."""
    u = uniform(shape, generator, device, stream=stream)
    return u.add_(p).floor_().clamp_(max=1.0)


def trim(x: Tensor, density: float) -> Tensor:
    """x with all but its ⌊density·n⌋ largest-magnitude entries set to zero."""
    if density >= 1.0:
        return x
    n = x.numel()
    k = keep_count(n, density)
    if k == 0:
        return torch.zeros_like(x)
    return trim_below(x, kth_largest_abs(x, k))


GLOBAL_SAMPLE = 1 << 20  # whole-model sample: the bracket then holds ~0.5% of all entries


def model_magnitude_threshold(
    read_pairs: Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    numels: Sequence[int],
    density: float,
) -> float:
    """The k-th largest |x − base| over *all* tensors of one model, k = ⌊density·Σn⌋ (exact).

    TIES as in the paper trims each task vector with one threshold over the whole model.
    `read_pairs()` yields (x, base or None) tensor by tensor, in the order of `numels`; it is
    called twice (sample, then count), so memory stays at one tensor plus the candidates in a
    bracket around the threshold. Returns inf when k = 0 and 0 when density ≥ 1.
    """
    total = int(sum(numels))
    k = keep_count(total, density)
    if density >= 1.0 or total == 0:
        return 0.0
    if k == 0:
        return math.inf
    g = torch.Generator().manual_seed(0x5E1EC7)
    samples = []
    for (x, base), n in zip(read_pairs(), numels):
        m = max(1, round(GLOBAL_SAMPLE * n / total))  # proportional: the union is uniform
        idx = torch.randint(n, (m,), generator=g)
        picked = x.reshape(-1)[idx] if base is None else x.reshape(-1)[idx] - base.reshape(-1)[idx]
        samples.append(picked.abs_())
    sample = torch.cat(samples).sort().values
    size = sample.numel()
    q = 1.0 - k / total
    spread = _SIGMAS * math.sqrt(size * q * (1.0 - q)) + 8.0
    lo_i, hi_i = int(q * size - spread), int(q * size + spread)
    lo = float(sample[lo_i]) if lo_i >= 0 else -1.0
    hi = float(sample[hi_i]) if hi_i < size else math.inf
    above = 0
    inside = []
    for x, base in read_pairs():
        a = (x.reshape(-1) if base is None else x.reshape(-1) - base.reshape(-1)).abs()
        above += int((a > hi).sum())
        inside.append(a[(a >= lo) & (a <= hi)])
    cand = torch.cat(inside)
    need = k - above
    if not 1 <= need <= cand.numel():
        raise ValueError(
            "the sampled bracket missed the model-wide threshold (tensors not in `numels` "
            "order?); check read_pairs"
        )
    return float(cand.kthvalue(cand.numel() - need + 1).values)


def _top_bin(counts: Tensor, need: int) -> tuple[int, int]:
    """(bin holding the need-th largest entry, how many of its entries that leaves to take)."""
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = #entries in bins >= b
    b = int((above >= need).nonzero().max())
    over = int(above[b + 1]) if b + 1 < above.numel() else 0
    return b, need - over


def nth_largest_nonneg(vals: Tensor, need: int) -> tuple[float, int, int]:
    """(t, taken, equal): t the need-th largest of non-negative floats `vals` (1 ≤ need ≤ n),
    `taken` how many entries equal to t the top `need` hold, `equal` how many there are.

    Non-negative floats order as their bit patterns, so two histograms (of the high, then the
    low 16 bits of the one high bin that holds t) pin t exactly: O(n), where `kthvalue` took
    15 ms for 1e6 entries and was a tenth of a TIES run.
    """
    bits = vals.float().contiguous().view(torch.int32)
    high = bits >> 16
    b, need_in = _top_bin(torch.bincount(high), need)
    low = bits[high == b] & 0xFFFF
    counts = torch.bincount(low)
    lo, taken = _top_bin(counts, need_in)
    t = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32)
    return float(t), taken, int(counts[lo])


STREAM_SAMPLE = 1 << 20  # up to this many elements, one pass keeps every |d| and is done
BIN_LIMIT = 1 << 22  # at most this many candidates (value and index) are kept from one bin
GUESS_LIMIT = 1 << 23  # at most this many entries of the guessed bins (96 MiB) are kept
GUESS_SAMPLE = 1 << 18  # entries of the first chunk that the guess of the bin is made from
_NO_HIST = np.zeros(0, dtype=np.int64)  # "count nothing" for `_loops.abs_diff_collect`


class StreamingTopK:
    """The k largest |d| of a tensor seen in chunks, exactly k of them: the threshold t (the
    k-th largest |d|) and an index cut c, so that entry i is kept iff |d_i| > t, or |d_i| = t
    and i < c (ties at the threshold are kept in index order until there are k).

    Passes (`observe` every chunk in index order, then `end_pass`, while not `done`): a
    histogram of the top 16 bits of each |d| (non-negative floats order as their bit patterns)
    finds the bin holding t; a second pass keeps the entries of that bin with their indices and
    finishes exactly. A bin too full to keep (many equal magnitudes) is split by its low 16 bits
    instead, which pins t exactly, and a last pass counts ties to find c. Small tensors take one
    pass. Nothing depends on where the chunks are cut.

    `k` may be None when it depends on the data (SCE keeps a fraction of the nonzero
    variances): the first pass does not need it, so `set_k` gives it before that pass ends.
    `signed`: rank signed values (the k-th largest value, not magnitude; arcee_fusion's
    quartiles), through an order-preserving 32-bit key of each float.
    """

    def __init__(self, numel: int, k: int | None, *, signed: bool = False):
        self.n = numel
        self.signed = signed
        self.threshold = math.inf
        self.cut = numel
        self.done = False
        self.k = 0
        if k is not None:
            self.set_k(k)
        self._phase = "all" if numel <= STREAM_SAMPLE else "high"
        self._hist = torch.zeros(1 << 16, dtype=torch.int64)
        self._bin = 0
        self._need = 0  # rank of t among the entries of the current bin, from the top
        self._vals: list[Tensor] = []
        # the collect pass's entries of the threshold's bin and their flat indices, preallocated
        self._bin_vals: Tensor | None = None
        self._bin_idx: Tensor | None = None
        self._bin_count = 0
        self._filled = 0
        self._ties_left = 0
        # the compiled histogram pass's guess of the threshold's bins and their entries
        self._guess: tuple[int, int] | None = None
        self._guess_vals: Tensor | None = None
        self._guess_idx: Tensor | None = None
        self._guess_filled = 0

    def set_k(self, k: int) -> None:
        """Keep the k largest (before the first `end_pass`); k ≤ 0 keeps none, k ≥ n all."""
        self.k = k
        if k <= 0 or k >= self.n:
            self.done = True
            self.threshold = math.inf if k <= 0 else 0.0
            self._vals = []

    def _bits(self, a: Tensor) -> Tensor:
        """Keys that order as the values: a non-negative float's bits, or (signed) the bits
        mapped onto [0, 2^32) with negatives reversed below the positives (−0 counts as +0)."""
        if not self.signed:
            return a.float().contiguous().view(torch.int32)
        bits = (a.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))

    def _value(self, key: int) -> float:
        """The float whose key (`_bits`) is `key`."""
        if self.signed:
            key = key - (1 << 31) if key >= 1 << 31 else ((1 << 31) - 1 - key) - (1 << 31)
        return float(torch.tensor([key], dtype=torch.int32).view(torch.float32))

    def observe(self, start: int, a: Tensor) -> None:
        """`a`: |d| of elements [start, start + m), flat."""
        if self.done:
            return
        if self._phase == "all":
            self._vals.append(a.clone())
        elif self._phase == "high":
            self._hist = self._hist.to(a.device)  # counts live where the data is
            self._hist += torch.bincount(self._bits(a) >> 16, minlength=1 << 16)
        elif self._phase in ("collect", "low"):
            bits = self._bits(a)
            inside = (bits >> 16) == self._bin
            if self._phase == "collect":
                at = inside.nonzero().reshape(-1)  # once: a[inside] would find them again
                bin_vals, bin_idx = self._bin_buffers(a.dtype, a.device)
                got = self._filled + at.numel()
                assert got <= self._bin_count
                torch.index_select(a, 0, at, out=bin_vals[self._filled : got])
                torch.add(at, start, out=bin_idx[self._filled : got])
                self._filled = got
            else:
                self._hist = self._hist.to(a.device)
                self._hist += torch.bincount(bits[inside] & 0xFFFF, minlength=1 << 16)
        elif self._phase == "cut" and self._ties_left > 0:
            eq = (a == self.threshold).nonzero().reshape(-1)
            if eq.numel() >= self._ties_left:
                self.cut = start + int(eq[self._ties_left - 1]) + 1
                self._ties_left = 0
            else:
                self._ties_left -= eq.numel()

    def observe_abs_diff(self, start: int, x: Tensor, base: Tensor, *, widen: bool = False) -> None:
        """`observe(start, |x − base|)`, the histogram and collect passes in one compiled loop
        each when the chunks are float32 on the CPU (the torch expression otherwise). `widen`:
        bfloat16 chunks stand for their float32 values (the loops read them as they are)."""
        if self.done:
            return
        if self._phase not in ("high", "collect") or not usable(x, base, widen=widen):
            if widen:
                x, base = x.float(), base.float()
            self.observe(start, torch.sub(x, base).abs_())
            return
        xs, bs = as_array(x.reshape(-1)), as_array(base.reshape(-1))
        if self._phase == "high":
            self._hist = self._hist.cpu()
            if self._guess is None:
                self._place_guess(xs, bs, start)
                return
            lo, hi = self._guess
            if self._guess_filled >= 0:
                assert self._guess_vals is not None and self._guess_idx is not None
                self._guess_filled = loops().abs_diff_collect(
                    xs, bs, lo, hi, start, self._guess_vals.numpy(), self._guess_idx.numpy(),
                    self._guess_filled, self._hist.numpy(),
                )  # fmt: skip
            else:
                loops().abs_diff_high_histogram(xs, bs, self._hist.numpy())
            return
        bin_vals, bin_idx = self._bin_buffers(torch.float32, x.device)
        got = loops().abs_diff_collect(
            xs, bs, self._bin, self._bin, start, bin_vals.numpy(), bin_idx.numpy(), self._filled,
            _NO_HIST,
        )  # fmt: skip
        if got < 0:
            raise RuntimeError("an input changed between two passes over it (more entries)")
        self._filled = got

    def _bin_buffers(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The collect pass's buffers for the bin's entries and their flat indices: its size is
        known from the histogram, so they are filled in place, never concatenated."""
        if self._bin_vals is None or self._bin_idx is None:
            self._bin_vals = torch.empty(self._bin_count, dtype=dtype, device=device)
            self._bin_idx = torch.empty(self._bin_count, dtype=torch.int64, device=device)
        return self._bin_vals, self._bin_idx

    def _place_guess(self, xs: np.ndarray, bs: np.ndarray, start: int) -> None:
        """The first chunk of the histogram pass: guess the threshold's bin from its own
        histogram (the same rank, scaled to the chunk) and keep, for the rest of the pass, the
        entries of that bin and its two neighbours. When the full histogram's bin is among them,
        the collect pass is not needed: a TIES merge reads its inputs twice, not three times."""
        # the guess comes from the chunk's first GUESS_SAMPLE entries; the whole chunk is then
        # counted and collected in one loop, as every later chunk is
        m = min(xs.shape[0], GUESS_SAMPLE)
        first = np.zeros(1 << 16, dtype=np.int64)
        loops().abs_diff_high_histogram(xs[:m], bs[:m], first)
        rank = max(1, min(m, math.ceil(self.k * m / self.n)))
        guess, _ = _top_bin(torch.from_numpy(first), rank)
        self._guess = (max(guess - 1, 0), min(guess + 1, (1 << 16) - 1))
        # room for the window's share of the whole tensor, with slack; a miss or an overflow
        # only means the collect pass runs
        lo, hi = self._guess
        expected = int(first[lo : hi + 1].sum()) * self.n // max(m, 1)
        room = min(GUESS_LIMIT, 2 * expected + 4096)
        self._guess_vals = torch.empty(room, dtype=torch.float32)
        self._guess_idx = torch.empty(room, dtype=torch.int64)
        self._guess_filled = loops().abs_diff_collect(
            xs, bs, lo, hi, start, self._guess_vals.numpy(), self._guess_idx.numpy(), 0,
            self._hist.numpy(),
        )  # fmt: skip

    def _take_guess(self) -> bool:
        """After the histogram pass: finish from the guessed window when it holds the bin."""
        vals, idx, filled = self._guess_vals, self._guess_idx, self._guess_filled
        self._guess_vals = self._guess_idx = None
        if self._guess is None or vals is None or idx is None or filled < 0:
            return False
        lo, hi = self._guess
        if not lo <= self._bin <= hi:
            return False
        vals, idx = vals[:filled], idx[:filled]
        inside = (vals.view(torch.int32) >> 16) == self._bin
        bin_vals, bin_idx = vals[inside], idx[inside]
        assert bin_vals.numel() == self._bin_count
        self._finish(bin_vals, bin_idx, self._need, one_bin=True)
        return True

    def _pick_bin(self, need: int) -> tuple[int, int, int]:
        """(bin, rank of t within it from the top, entries in it) for the need-th largest."""
        self._hist = self._hist.cpu()
        b, rank = _top_bin(self._hist, need)
        return b, rank, int(self._hist[b])

    def _finish(self, vals: Tensor, idx: Tensor | None, need: int, one_bin: bool = False) -> None:
        """t is the need-th largest of `vals`; `idx` (ascending) are their flat indices.
        `one_bin`: all of `vals` share their high 16 bits (the collected bin)."""
        if not self.signed and usable(vals):
            no_idx = torch.empty(0, dtype=torch.int64)
            key, cut = loops().top_order_statistic(
                vals.numpy(), (no_idx if idx is None else idx).numpy(), need, one_bin
            )
            self.threshold = self._value(int(key))
            if cut >= 0:
                self.cut = int(cut)
            self.done = True
            return
        if self.signed:  # the bit histograms order non-negative floats only
            self.threshold = float(vals.kthvalue(vals.numel() - need + 1).values)
            ties = need - int((vals > self.threshold).sum())
            equal = int((vals == self.threshold).sum())
        else:
            self.threshold, ties, equal = nth_largest_nonneg(vals, need)
        if ties < equal:
            eq = (vals == self.threshold).nonzero().reshape(-1)
            at = int(eq[ties - 1])
            self.cut = (int(idx[at]) if idx is not None else at) + 1
        self.done = True

    def end_pass(self) -> None:
        if self.done:
            return
        if self._phase == "all":
            vals = torch.cat(self._vals) if self._vals else torch.zeros(0)
            self._vals = []
            self._finish(vals, None, self.k)
        elif self._phase == "high":
            self._bin, self._need, count = self._pick_bin(self.k)
            self._phase = "collect" if count <= BIN_LIMIT else "low"
            self._bin_count = count
            self._hist.zero_()
            if self._phase == "collect" and self._take_guess():
                return
        elif self._phase == "collect":
            bin_vals, bin_idx = self._bin_vals, self._bin_idx
            self._bin_vals = self._bin_idx = None
            assert bin_vals is not None and bin_idx is not None
            assert self._filled == self._bin_count
            self._finish(bin_vals, bin_idx, self._need, one_bin=True)
        elif self._phase == "low":
            low, need, count = self._pick_bin(self._need)
            self.threshold = self._value((self._bin << 16) | low)
            self._ties_left = need
            if need >= count:
                self.done = True  # every entry equal to t is kept
            else:
                self._phase = "cut"
        elif self._phase == "cut":
            self.done = True


def keep_top(d: Tensor, start: int, threshold: float, cut: int) -> Tensor:
    """d (flat elements [start, start + m)) with |d| < threshold zeroed, and |d| = threshold
    zeroed from index `cut` on (StreamingTopK's rule). Before the cut the trim keeps |d| ≥ t,
    from it on |d| > t: one hardshrink per side, no mask over the chunk."""
    m = d.numel()
    if not 0 < threshold < math.inf or cut >= start + m:
        return trim_below(d, threshold)
    if cut <= start:
        return trim_below(d, threshold, strict=True)
    at = cut - start
    return torch.cat([trim_below(d[:at], threshold), trim_below(d[at:], threshold, strict=True)])
