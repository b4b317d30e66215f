"""Gram entries Σ_e a[e]·b[e] of a few vectors seen in chunks, in float64, exact in the chunking.

The spherical methods, Model Stock and SCE need only inner products of their inputs (norms,
cosines, energies), so one statistics pass of these sums replaces the whole tensors. Each sum
is taken over fixed global blocks, every block reduced by one op of one fixed shape from a
reused float64 buffer (products of float32 values are exact there), and the block sums are
added in block order: the bytes do not depend on where the chunks were cut, on how many rows
a chunk holds, or on whether the tensor came whole.

Three layouts of "vector":
- flat (`cols` = 1): the whole tensor is one vector;
- columns (`cols` > 1): element e belongs to column e mod cols (rows of `cols` elements, the
  vector of column j runs down the rows), so the sums are (pairs, cols);
- rows (`row_gram`): each row of a chunk of whole rows is a vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import merge.methods._stream as _stream
from merge.methods._fused import NO_FLOAT32, as_array, loops, usable


def all_pairs(k: int) -> list[tuple[int, int]]:
    """(i, j) for i ≤ j < k, row by row: the upper triangle of a k×k Gram matrix."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def _rows_per_block(cols: int) -> int:
    """Rows per reduction block: about REDUCE_BLOCK elements, a power of two, at least one."""
    per = max(1, _stream.REDUCE_BLOCK // max(cols, 1))
    return 1 << (per.bit_length() - 1)


class BlockGram:
    """Σ over rows of v_i·v_j for the `pairs` of K vectors fed as flat chunks in index order.

    `add(vectors)` takes the next m elements of each of the K inputs; `total()` returns the
    (P, cols) float64 sums (on the CPU). Memory: one float64 block of about REDUCE_BLOCK
    elements (or one row, when a row is longer) per input and per pair, and the sums.
    """

    def __init__(self, k: int, *, cols: int = 1, pairs: Sequence[tuple[int, int]] | None = None):
        self.k, self.cols = k, max(int(cols), 1)
        self.pairs = list(pairs) if pairs is not None else all_pairs(k)
        self.rows = _rows_per_block(self.cols)
        self.size = self.rows * self.cols  # elements per block
        self._x: Tensor | None = None  # (K, size) float64: the block being filled
        self._prod: Tensor | None = None  # (P, size) float64: its products
        self._fill = 0
        self._sums: Tensor | None = None  # (P, cols) float64
        # the compiled loop's state (flat sums of float32 CPU chunks): 8 lanes per pair
        self._looped: bool | None = None
        self._lanes: np.ndarray | None = None
        self._flat_sums: np.ndarray | None = None
        self._first: np.ndarray | None = None
        self._second: np.ndarray | None = None
        # `add_block_sums`' sums: (blocks, P) by first block index, added in block order by `total`
        self._by_block: dict[int, np.ndarray] = {}

    def _buffers(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._x is None or self._prod is None or self._sums is None:
            f64, dev = torch.float64, like.device  # where the data is (CPU or GPU)
            self._x = torch.zeros(self.k, self.size, dtype=f64, device=dev)
            self._prod = torch.empty(len(self.pairs), self.size, dtype=f64, device=dev)
            self._sums = torch.zeros(len(self.pairs), self.cols, dtype=f64, device=dev)
        return self._x, self._prod, self._sums

    def add(self, vectors: Sequence[Tensor]) -> None:
        """The next m elements (flat, equal lengths) of each of the K vectors."""
        m = vectors[0].numel()
        if m == 0:
            return
        if self._looped is None:  # decided once: the two ways sum in different orders
            # bfloat16 too: the sums are of float64 values either way, exact for both
            self._looped = self.cols == 1 and usable(*vectors, widen=True)
        if self._looped:
            self._add_looped(vectors)
            return
        x, _, _ = self._buffers(vectors[0])
        pos = 0
        while pos < m:
            take = min(self.size - self._fill, m - pos)
            for i, v in enumerate(vectors):
                x[i, self._fill : self._fill + take].copy_(v[pos : pos + take])
            self._fill += take
            pos += take
            if self._fill == self.size:
                self._flush()

    def add_differences(self, vectors: Sequence[Tensor], base: Tensor) -> None:
        """`add([x − base for x in vectors])` in one compiled loop, without the differences'
        copies: CPU vectors of one dtype, float32 or bfloat16 (their float32 values), any base
        `usable` by the loops; the float32 differences are the same either way."""
        if self._looped is None:
            self._looped = self.cols == 1
        assert self._looped and vectors[0].numel() == base.numel()
        self._add_looped(vectors, base)

    def _add_looped(self, vectors: Sequence[Tensor], base: Tensor | None = None) -> None:
        """`add` by the compiled loop (`_loops.gram_blocks`): float32 CPU vectors, flat sums."""
        if self._lanes is None:
            self._lanes = np.zeros((len(self.pairs), loops().LANES), dtype=np.float64)
            self._flat_sums = np.zeros(len(self.pairs), dtype=np.float64)
            self._index_pairs()
        same = len({v.dtype for v in vectors}) == 1 and usable(*vectors, widen=True)
        arrays = tuple(
            as_array(v.reshape(-1) if same else v.reshape(-1).to(torch.float32).contiguous())
            for v in vectors
        )
        self._fill = loops().gram_blocks(
            arrays,
            NO_FLOAT32 if base is None else as_array(base.reshape(-1)),
            self._first,
            self._second,
            self._lanes,
            self._flat_sums,
            self._fill,
            self.size,
        )

    def add_block_sums(self, first_block: int, sums: np.ndarray) -> None:
        """Sums gathered elsewhere (`merge.file_gram`) of blocks first_block.. in order, one
        row each ((blocks, P) float64, each the sum `add` flushes for that block: the same
        loop): `total()` adds them in block order, the bits `add` gives. Flat sums only, not
        mixed with `add`."""
        assert self.cols == 1 and self._looped is not False and not self._fill
        self._looped = True
        self._by_block[first_block] = sums

    def pair_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs as the compiled loops take them: (first, second) int64 arrays."""
        self._index_pairs()
        assert self._first is not None and self._second is not None
        return self._first, self._second

    def _index_pairs(self) -> None:
        if self._first is None:
            self._first = np.asarray([i for i, _ in self.pairs], dtype=np.int64)
            self._second = np.asarray([j for _, j in self.pairs], dtype=np.int64)

    def _flush(self) -> None:
        x, prod, sums = self._x, self._prod, self._sums
        assert x is not None and prod is not None and sums is not None
        for p, (i, j) in enumerate(self.pairs):
            torch.mul(x[i], x[j], out=prod[p])
        # One op of one shape per block: (P, rows, cols) summed over its rows.
        sums.add_(prod.view(len(self.pairs), self.rows, self.cols).sum(dim=1))
        self._fill = 0

    def total(self) -> Tensor:
        """(P, cols) float64 sums over every element added (zeros if none was)."""
        if self._by_block:
            return torch.from_numpy(self._block_total()).reshape(len(self.pairs), 1)
        if self._looped:
            assert self._lanes is not None and self._flat_sums is not None
            if self._fill:  # the last, partial block counts as one more block
                loops().flush_lanes(self._lanes, self._flat_sums)
                self._fill = 0
            return torch.from_numpy(self._flat_sums.copy()).reshape(len(self.pairs), 1)
        if self._x is None:
            return torch.zeros(len(self.pairs), self.cols, dtype=torch.float64)
        if self._fill:
            self._x[:, self._fill :].zero_()  # the last block, padded: same shape as the rest
            self._flush()
        assert self._sums is not None
        return self._sums.cpu()

    def _block_total(self) -> np.ndarray:
        """`add_block_sums`' rows added in block order (from zero, as `add` adds them)."""
        total = np.zeros(len(self.pairs), dtype=np.float64)
        expected = 0
        for first in sorted(self._by_block):
            assert first == expected, "add_block_sums: a range of blocks is missing"
            sums = self._by_block[first]
            for row in sums:
                total += row
            expected += sums.shape[0]
        return total


def gram_matrix(sums: Tensor, k: int, pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """(K, K, ...) symmetric matrix from the (P, ...) sums of `all_pairs(k)` (or `pairs`)."""
    pairs = list(pairs) if pairs is not None else all_pairs(k)
    out = torch.zeros(k, k, *sums.shape[1:], dtype=sums.dtype)
    for p, (i, j) in enumerate(pairs):
        out[i, j] = out[j, i] = sums[p]
    return out


def row_gram(
    vectors: Sequence[Tensor], first_row: int, pairs: Sequence[tuple[int, int]] | None = None
) -> Tensor:
    """(P, r) float64 Σ over each row of v_i·v_j, for K (r, cols) chunks of whole rows whose
    first row is row `first_row` of the tensor.

    Rows are reduced in groups of a fixed shape aligned on the tensor's row index (missing rows
    are zeros), so a row gives the same bits in any chunk.
    """
    k = len(vectors)
    pairs = list(pairs) if pairs is not None else all_pairs(k)
    r, cols = vectors[0].shape
    out = torch.empty(len(pairs), r, dtype=torch.float64, device=vectors[0].device)
    if r == 0:
        return out
    g = _rows_per_block(cols)
    x = torch.empty(k, g, cols, dtype=torch.float64, device=vectors[0].device)
    prod = torch.empty(len(pairs), g, cols, dtype=torch.float64, device=vectors[0].device)
    last = first_row + r
    for g0 in range(first_row // g * g, last, g):
        lo, hi = max(g0, first_row), min(g0 + g, last)  # rows of this group in the chunk
        if hi - lo < g:
            x.zero_()
        for i, v in enumerate(vectors):
            x[i, lo - g0 : hi - g0].copy_(v[lo - first_row : hi - first_row])
        for p, (i, j) in enumerate(pairs):
            torch.mul(x[i], x[j], out=prod[p])
        out[:, lo - first_row : hi - first_row] = prod.sum(dim=2)[:, lo - g0 : hi - g0]
    return out


def per_column(values: Tensor, start: int, m: int) -> Tensor:
    """values[(start + e) mod cols] for e < m: per-column coefficients laid over a flat chunk."""
    cols = values.numel()
    first = start % cols
    reps = math.ceil((first + m) / cols)
    return values.repeat(reps)[first : first + m]


def span_combination(
    vectors: Sequence[Tensor], coefs: Sequence[float], dtype: torch.dtype | None = None
) -> Tensor:
    """Σ γ_i v_i accumulated in float64, rounded once to `dtype` (default: the vectors')."""
    acc = torch.zeros(vectors[0].shape, dtype=torch.float64, device=vectors[0].device)
    for v, c in zip(vectors, coefs):
        if c != 0.0:
            acc.add_(v.double(), alpha=c)
    return acc.to(dtype or vectors[0].dtype)


def by_row_groups(fn: Callable[..., Tensor], tensors: Sequence[Tensor], first_row: int) -> Tensor:
    """fn(*groups) on fixed-shape (G, cols) groups of rows aligned on the tensor's row index
    (rows outside the chunk are zeros), for (r, cols) chunks of whole rows whose first row is
    `first_row`: a row-wise op (softmax, a row sum) gives a row the same bits in any chunk."""
    r, cols = tensors[0].shape
    g = _rows_per_block(cols)
    parts = []
    last = first_row + r
    for g0 in range(first_row // g * g, last, g):
        lo, hi = max(g0, first_row), min(g0 + g, last)
        if hi - lo == g:
            groups = [t[lo - first_row : hi - first_row] for t in tensors]
        else:
            groups = [t.new_zeros(g, cols) for t in tensors]
            for grp, t in zip(groups, tensors):
                grp[lo - g0 : hi - g0] = t[lo - first_row : hi - first_row]
        parts.append(fn(*groups)[lo - g0 : hi - g0])
    return torch.cat(parts) if parts else tensors[0].new_empty(0, cols)
