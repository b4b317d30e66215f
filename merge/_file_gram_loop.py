"""The compiled loop of `merge.file_gram`: pread ranges of bfloat16 inputs, check them, add
their Gram sums by block. Imported on first use (numba)."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from merge.methods._loops import (
    FINITE_BELOW,
    LANES,
    all_finite_bfloat16,
    flush_lanes,
    gram_in_block,
    round_bfloat16,
    value,
)

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

ITEM = 2  # bytes per bfloat16 element

# How a thread's loop ended (its first return value).
DONE, NOT_FINITE, READ_FAILED = 0, 1, 2


@intrinsic
def _pread(typingctx, fd, array, at, count, offset):  # type: ignore[no-untyped-def]
    """libc pread(fd, &array's bytes[at], count, offset): bytes read, 0 at the end of the file,
    −1 on an error (the caller re-reads the ordinary way to learn which)."""
    sig = types.int64(fd, array, at, count, offset)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64, byte_ptr = ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i64, [ir.IntType(32), byte_ptr, i64, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pread")
        fd_v, array_v, at_v, count_v, offset_v = args
        fd_t, array_t, at_t, count_t, offset_t = signature.args
        data = context.make_array(array_t)(context, builder, array_v).data
        where = builder.gep(
            builder.bitcast(data, byte_ptr), [context.cast(builder, at_v, at_t, types.int64)]
        )
        return builder.call(
            fn,
            [
                context.cast(builder, fd_v, fd_t, types.int32),
                where,
                context.cast(builder, count_v, count_t, types.int64),
                context.cast(builder, offset_v, offset_t, types.int64),
            ],
        )

    return sig, codegen


@_jit
def _read_fully(fd, row, nbytes, offset):  # type: ignore[no-untyped-def]
    """Whether `nbytes` bytes at `offset` of `fd` were read into `row` (short reads retried)."""
    got = 0
    while got < nbytes:
        n: int = _pread(fd, row, got, nbytes - got, offset + got)  # type: ignore[call-arg]
        if n <= 0:
            return False
        got += n
    return True


@_jit
def gram_from_files(  # type: ignore[no-untyped-def]
    fds, offsets, base_fd, base_offset, numel, range_elements, first_range, step,
    first, second, size, sums, scratch, stop_flag,
):  # fmt: skip
    """Ranges first_range, first_range + step, ... of `range_elements` elements: each read
    from every vector's file (fds[v] at offsets[v]) and the base's (base_fd ≥ 0) into the rows
    of `scratch`, checked finite, and its blocks of `size` elements summed into sums[block]
    (each the sum `_loops.gram_blocks` flushes for that block: the same inner loop). Returns
    (status, range): DONE, NOT_FINITE when that range holds NaN/inf, READ_FAILED when it could
    not be read; `stop_flag[0]` is then set and ends the other thread's loop at its next range."""
    k = fds.shape[0]
    has_base = base_fd >= 0
    lanes = np.zeros((first.shape[0], LANES), np.float64)
    staged = np.empty((k, LANES), np.float64)
    ranges = (numel + range_elements - 1) // range_elements
    per_range = range_elements // size
    r = first_range
    while r < ranges:
        if stop_flag[0]:
            return DONE, -1
        start = r * range_elements
        m = min(numel, start + range_elements) - start
        for v in range(k + 1):
            if v == k and not has_base:
                break
            fd = base_fd if v == k else fds[v]
            offset = (base_offset if v == k else offsets[v]) + start * ITEM
            if not _read_fully(fd, scratch[v], m * ITEM, offset):
                stop_flag[0] = 1
                return READ_FAILED, r
            if not all_finite_bfloat16(scratch[v, :m]):
                stop_flag[0] = 1
                return NOT_FINITE, r
        base = scratch[k, :m] if has_base else scratch[k, :0]
        for b in range((m + size - 1) // size):
            lo = b * size
            gram_in_block(scratch, k, base, first, second, lanes, staged, lo, min(m, lo + size), 0)
            row = sums[r * per_range + b]
            row[:] = 0.0
            flush_lanes(lanes, row)
        r += step
    return DONE, -1


@_jit
def sum_from_files(  # type: ignore[no-untyped-def]
    fds, offsets, coefs, start, stop, range_elements, first_range, step, out, scratch, stop_flag,
):  # fmt: skip
    """out (bfloat16 bits of elements [start, stop)) = Σ_v coefs[v]·x_v in float32, each
    product rounded and added in operand order (acc = x_0·c_0, then acc = acc + x_v·c_v: the
    arithmetic of `_loops.combine_two` and `scaled_sum`), rounded to bfloat16 as
    `round_bfloat16`. Ranges first_range, first_range + step, ... of `range_elements`
    elements, each operand read from fds[v] at offsets[v] into scratch[v]. Returns (status,
    range, finite): DONE, or READ_FAILED when that range could not be read (`stop_flag[0]` is
    then set and ends the other thread's loop)."""
    k = fds.shape[0]
    acc = np.empty(LANES, np.float32)
    ranges = (stop - start + range_elements - 1) // range_elements
    top = np.int32(0)
    r = first_range
    while r < ranges:
        if stop_flag[0]:
            return DONE, -1, True
        lo = r * range_elements
        m = min(stop - start, lo + range_elements) - lo
        for v in range(k):
            if not _read_fully(fds[v], scratch[v], m * ITEM, offsets[v] + (start + lo) * ITEM):
                stop_flag[0] = 1
                return READ_FAILED, r, True
        for b in range(0, m, LANES):
            n = min(LANES, m - b)
            first = scratch[0, b : b + n]
            c0 = coefs[0]
            for j in range(n):
                acc[j] = value(first, j) * c0
            for v in range(1, k):
                x = scratch[v, b : b + n]
                c = coefs[v]
                for j in range(n):
                    acc[j] = acc[j] + value(x, j) * c
            dest = out[lo + b : lo + b + n]
            for j in range(n):
                dest[j], magnitude = round_bfloat16(acc[j])
                top = max(top, magnitude)
        r += step
    return DONE, -1, top < FINITE_BELOW
