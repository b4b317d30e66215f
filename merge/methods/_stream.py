"""Chunked evaluation of one method call on one tensor: statistics passes, then an apply pass.

A `Kernel` sees a tensor as flat chunks `[start, start + m)` in index order. Before the apply
pass it may ask for statistics passes (`needs_pass`): the executor streams every chunk of the
call's inputs through `observe`, then calls `end_pass`. `apply` then maps each chunk to its
output chunk. A kernel's result must not depend on where the chunks are cut: selection
thresholds are exact order statistics, reductions are summed per fixed global block
(`BlockSums`), and random draws are indexed by element (`ElementRandom`). So the engine's
chunked result equals the whole-tensor result bit for bit, and a method's own whole-tensor
function is the same kernel run on one chunk (`run_whole`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.methods._fused import loops, usable
from merge.threads import one_thread

# Elements per reduction block: partial sums are taken over fixed global blocks and added in
# block order at the end, so a sum does not depend on where the chunks were cut.
REDUCE_BLOCK = 1 << 16


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, tensor name, call identity, ...); no hash salt."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (
        (1 << 63) - 1
    )


class ElementRandom:
    """Uniform [0, 1) draws indexed by element: u[i] depends only on (key, stream, i).

    `at(offset)` positions it at a chunk's first element; `uniform(n, stream)` gives the draws
    for elements [offset, offset + n) of stream `stream` (one stream per model, so two models,
    or two calls with different keys, draw independent masks).

    Counter-based: u[i] is a hash of the element index under the stream's 64-bit seed (two
    rounds of a 32-bit integer mixer, 24 bits kept, so every value is an exact float32 in
    [0, 1)). No generator state, so any chunking draws the same numbers; computed by a compiled
    loop on the CPU (~1.5 ns per draw; torch's Mersenne twister took ~10 ns) and by the same
    integer arithmetic in torch on other devices, bit for bit.
    """

    def __init__(self, key: int, offset: int = 0, device: torch.device | str = "cpu"):
        self.key = key
        self.offset = offset
        self.device = torch.device(device)

    def at(self, offset: int) -> ElementRandom:
        return ElementRandom(self.key, self.offset + offset, self.device)

    def seed(self, stream: int) -> tuple[int, int]:
        """Stream `stream`'s seed as two 32-bit halves (low, high)."""
        seed = mix_seed(self.key, stream)
        return seed & _MASK32, seed >> 32

    def uniform(self, n: int, stream: int = 0) -> Tensor:
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        low, high = self.seed(stream)
        if usable(out):
            loops().counter_uniform(np.uint64(low), np.uint64(high), self.offset, out.numpy())
            return out
        index = torch.arange(self.offset, self.offset + n, dtype=torch.int64, device=out.device)
        h = _mix32((index & _MASK32) ^ low)
        h = _mix32(h ^ (index >> 32) ^ high)
        return out.copy_((h >> 8).to(torch.float32).mul_(1.0 / (1 << 24)))


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for x < 2^32, in int64 without overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """The 32-bit integer mixer of `_loops.mix32` (C. Wellons' lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class BlockSums:
    """Σ over a tensor of per-element terms, exact in its chunking: float64 sums over fixed
    global blocks of REDUCE_BLOCK elements (a block cut by a chunk edge is carried), added in
    block order by `total()`."""

    def __init__(self, terms: int):
        self.terms = terms
        self._blocks: list[Tensor] = []  # (terms,) block sums, in block order
        self._carry = torch.zeros(terms, 0, dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        """`values`: (terms, m) per-element terms of the next m elements, in index order."""
        carry = self._carry.to(values.device)  # the device of the data (CPU or GPU)
        v = torch.cat([carry, values.to(torch.float64)], dim=1)
        full = v.shape[1] // REDUCE_BLOCK * REDUCE_BLOCK
        if full:
            blocks = v[:, :full].reshape(self.terms, -1, REDUCE_BLOCK)
            # One sum per block, each over the same REDUCE_BLOCK elements whatever the chunking.
            self._blocks += [blocks[:, j].sum(dim=1) for j in range(blocks.shape[1])]
        self._carry = v[:, full:].clone()

    def total(self) -> Tensor:
        """(terms,) float64 sums; the last partial block counts as one more block."""
        parts = [*self._blocks, self._carry.sum(dim=1)]
        return torch.stack([p.cpu() for p in parts], dim=1).sum(dim=1)


@dataclass(frozen=True)
class GramPass:
    """A statistics pass that only sums a Gram matrix of a call's operands (`Kernel.gram_pass`):
    the sums to fill (a flat `_gram.BlockGram`, which imports this module), the operands
    summed in the Gram's order (positions: models 0..n−1, the base n) and whether each is
    taken minus the base (task vectors)."""

    gram: Any
    vectors: tuple[int, ...]
    minus_base: bool


@dataclass(frozen=True)
class OrderedSum:
    """An apply pass that is Σ_v coefs[v]·operand_v in float32, each product rounded and added
    in order (acc = x_0·c_0, then acc = acc + x_v·c_v: `_loops.combine_two`'s and
    `scaled_sum`'s arithmetic), rounded to bfloat16; operands by position (models 0..n−1, the
    base n), coefficients float32 values."""

    operands: tuple[int, ...]
    coefs: tuple[float, ...]


class Kernel:
    """One method call on one tensor, evaluated over flat chunks in index order."""

    # Chunks must hold whole rows of this many elements (row-wise methods); 1: any cut.
    row: int = 1
    # A kernel only reads the chunks it is given (they may be the engine's cached inputs,
    # shared with other terms, in buffers reused for the next chunk: keep copies, never the
    # chunks themselves); one that writes into them says so and gets copies.
    mutates_inputs: bool = False
    # The kernel can take bfloat16 chunks as read and compute on their float32 values (its
    # compiled loops widen them in registers): the engine then skips a float32 copy of every
    # chunk, and sets `widen_bfloat16` on the kernels it feeds so. Without that flag a
    # bfloat16 chunk is in the compute dtype (`compat: mergekit`) and is computed as such.
    reads_bfloat16: bool = False
    widen_bfloat16: bool = False

    def needs_pass(self) -> bool:
        """True while a statistics pass over the inputs is still needed before `apply`."""
        return False

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        """See chunk [start, start + m) of every input during a statistics pass."""

    def end_pass(self) -> None:
        """All chunks of a statistics pass have been observed."""

    def gram_pass(self, models: int, has_base: bool) -> GramPass | None:
        """When the pending statistics pass only sums a Gram matrix of the operands (flat
        `BlockGram` sums): what it sums, for the engine to fill from the input files itself
        (`merge.file_gram`) instead of calling `observe`; then `end_pass` as usual."""
        return None

    def ordered_sum(self, models: int, has_base: bool) -> OrderedSum | None:
        """When the apply pass (its statistics passes done) is an `OrderedSum` of operands:
        which, with which coefficients, for the engine to compute from the input files itself
        (`merge.file_gram.fill_sum`) instead of calling `apply_bfloat16`, to the same bits."""
        return None

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        """The output for chunk [start, start + m) (flat, float32)."""
        raise NotImplementedError

    def apply_bfloat16(
        self, start: int, models: Sequence[Tensor], base: Tensor | None, out: Tensor
    ) -> bool | None:
        """`apply`'s chunk rounded to bfloat16 into `out` (torch's rounding, bit for bit) by
        the loop that computes it, for a job that is this call alone; returns whether every
        value is finite, or None when the kernel has no such loop (the engine then rounds
        `apply`'s float32 chunk)."""
        return None


def run_whole(kernel: Kernel, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """A kernel on the whole tensor as one chunk (what a method's own function returns).

    On one intra-op thread, as the engine runs kernels: a reduction split across threads
    rounds differently, and the bytes must not depend on the thread count.
    """
    like = tensors[0] if tensors else base
    assert like is not None
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    flats = [t.reshape(-1) for t in tensors]
    flat_b = None if base is None else base.reshape(-1)
    with one_thread():
        while kernel.needs_pass():
            kernel.observe(0, flats, flat_b)
            kernel.end_pass()
        return kernel.apply(0, flats, flat_b).reshape(like.shape)


def rows_of(shape: Sequence[int]) -> int:
    """The row length a row-wise method uses: the last dimension (a 1-D tensor is one row)."""
    if len(shape) < 2:
        n = 1
        for s in shape:
            n *= int(s)
        return max(n, 1)
    return max(int(shape[-1]), 1)


class RowsFnKernel(Kernel):
    """A row-wise method function on chunks of whole rows, (rows, row) each; a tensor of fewer
    than two dimensions is one row and reaches the function in its own shape, so a method
    that treats 0-D tensors apart (breadcrumbs leaves them as they are) does so here too."""

    def __init__(
        self,
        fn: Callable[..., Tensor],
        shape: Sequence[int],
        params: Mapping[str, Any],
        rng: ElementRandom | None,
    ):
        self.fn, self.params, self.rng = fn, dict(params), rng
        self.shape = tuple(int(s) for s in shape)
        self.row = rows_of(self.shape)

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        view = self.shape if len(self.shape) < 2 else (-1, self.row)
        kw = dict(self.params)
        if self.rng is not None:
            kw["generator"] = self.rng.at(start)
        if base is not None:
            kw["base"] = base.reshape(view)
        return self.fn([m.reshape(view) for m in models], **kw).reshape(-1)
