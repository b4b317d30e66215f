"""The one streaming loop: read the few tensors an output tensor needs, compute in float32, write.

Every job streams in chunks through three buffer slots: a reader thread fills one while the
main thread computes another and a writer thread writes the third, so memory is a few chunks
whatever the tensor or model size. Weighted sums ("affine" jobs) and copies take one pass.
Method calls ("graph" jobs) whose registrations declare a streaming shape (elementwise,
statistics then elementwise, row-wise, model-wide statistics) run their kernels' statistics
passes first, chunk by chunk, then an apply pass (row-wise calls get chunks of whole rows);
only calls declared whole-matrix read whole tensors, one output tensor at a time.
`write_plan` streams into the files of the plan's output layout; `describe_plan` says what a
run would do (`merge validate`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from merge.card import write_card
from merge.dtypes import DTYPE_NAMES, dtype_name, guard_float16
from merge.errors import ExecutionError, MergeError, PlanError, UsageError
from merge.expr import Affine
from merge.file_gram import RANGE_ELEMENTS, GramFiles, fill_gram, fill_sum
from merge.io.layout import copy_support_files
from merge.io.output import check_output
from merge.io.sources import TensorSource
from merge.io.sources import check_finite as warn_non_finite_read
from merge.io.support_files import unmerged_module_weights
from merge.io.writer import (
    FilePlan,
    OutputTensor,
    StagedOutput,
    TensorFileWriter,
    check_free_space,
    write_json,
)
from merge.methods import get_method
from merge.methods._checks import check_finite, is_finite
from merge.methods._fused import as_array, enabled, loops, usable
from merge.methods._registry import MATRIX, MODEL, ROWS, STATISTICS
from merge.methods._stream import ElementRandom, GramPass, Kernel, mix_seed, rows_of
from merge.model_scope import resolve_model_scope
from merge.plan import Plan, ResolvedCall, TensorJob, format_form, output_layout
from merge.progress import byte_progress, write_summary
from merge.version import __version__

_T = TypeVar("_T")

# 8M elements per read: 16 MiB of bf16 per input, large enough for sequential reads at disk speed.
CHUNK_ELEMENTS = 1 << 23
# 4M elements per chunk of a method call: each chunk holds the raw inputs in three slots, their
# float32 copies and a few float32 temporaries per call (measured: a trim-and-elect call on
# base + 3 models of the 1 GB set peaks at 1.09 GiB with 8M-element chunks).
GRAPH_CHUNK = 1 << 22
# 1M elements per combine block: the float32 accumulator and one converted input (8 MiB) stay in
# the last-level cache, so each input's bytes cross main memory once instead of three times
# (convert out, read back, accumulate). Measured on 64M-element bf16 inputs x 4, one thread:
# 117 ms with 64K blocks, 67 ms with 512K-1M, 84 ms with 2M.
BLOCK_ELEMENTS = 1 << 20


def pick_device(device: str) -> torch.device:
    """The one check of `--device` for every command: cpu, cuda, cuda:N or auto."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device `{device}` is not a device: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlanError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PlanError(
            f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0; use --device cuda"
        )
    return dev


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor from (seed, name): independent of order, threads and Python's hash salt."""
    return int.from_bytes(
        hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little"
    ) & ((1 << 63) - 1)


def form_calls(form: Affine) -> list[ResolvedCall]:
    """The distinct method calls of a form, inner calls first (each shared call once)."""
    seen: dict[int, ResolvedCall] = {}

    def visit(f: Affine) -> None:
        for leaf, _ in f.terms:
            if isinstance(leaf, ResolvedCall) and id(leaf) not in seen:
                for m in (*leaf.models, *([leaf.base] if leaf.base is not None else [])):
                    visit(m)
                seen[id(leaf)] = leaf

    visit(form)
    return list(seen.values())


def call_shape(call: ResolvedCall) -> str:
    """The execution shape the call's registration declares for its parameters."""
    return get_method(call.method).shape_for(dict(call.params))


def streams(job: TensorJob) -> bool:
    """True when every call of a graph job can run chunk by chunk (no whole-matrix call)."""
    for call in form_calls(job.form):
        spec = get_method(call.method)
        shape = spec.shape_for(dict(call.params))
        if shape == MATRIX or (shape in (STATISTICS, MODEL) and spec.kernel is None):
            return False
    return True


def job_row(job: TensorJob) -> int:
    """The row length a graph job's chunks must respect (1 when no call is row-wise)."""
    rows = {call_shape(c) == ROWS for c in form_calls(job.form)}
    return rows_of(job.shape) if True in rows else 1


def estimate_peak_bytes(plan: Plan, chunk: int = CHUNK_ELEMENTS) -> int:
    """Rough peak of our own buffers: the read slots and the working chunks, or whole fp32
    tensors for whole-matrix calls."""
    peak = 0
    for j in plan.jobs:
        if j.mode == "graph" and not streams(j):
            peak = max(peak, (len(j.inputs) * 2 + 3) * j.numel * 4)
        elif j.mode == "graph":
            row = job_row(j)
            n = min(j.numel, max(row, min(chunk, GRAPH_CHUNK) // row * row))
            calls = len(form_calls(j.form))
            # slots of raw inputs, fp32 copies of the inputs, and a few temporaries per call
            peak = max(peak, SLOTS * len(j.inputs) * n * 4 + (len(j.inputs) + 4 * calls) * n * 4)
        else:
            n = min(j.numel, chunk)
            peak = max(peak, SLOTS * (len(j.inputs) + 1) * n * 8 + 2 * BLOCK_ELEMENTS * 8)
    return peak


def describe_plan(plan: Plan, limit: int = 12) -> str:
    """A human-readable summary: inputs, steps as affine forms, jobs by mode, bytes, memory."""
    lines = ["inputs:"]
    for n, s in plan.sources.items():
        lines.append(f"  {n}: {s.path} ({s.kind}, {len(s.keys())} tensors)")
    lines.append("steps:")
    for name, form in plan.program.steps.items():
        lines.append(f"  {name} = {format_form(form, name)}")
    by_mode: dict[str, int] = {}
    for j in plan.jobs:
        by_mode[j.mode] = by_mode.get(j.mode, 0) + 1
    lines.append(
        f"output: {len(plan.jobs)} tensors ("
        + ", ".join(f"{v} {k}" for k, v in sorted(by_mode.items()))
        + ")"
    )
    for j in plan.jobs[:limit]:
        lines.append(
            f"  {j.name} {list(j.shape)} {dtype_name(j.dtype)} [{j.mode}] = {format_form(j.form, plan.program.output_step)}"
        )
    if len(plan.jobs) > limit:
        lines.append(f"  ... {len(plan.jobs) - limit} more")
    lines.append(
        f"read {plan.bytes_read / 1e9:.3f} GB, write {plan.bytes_written / 1e9:.3f} GB, estimated peak memory {estimate_peak_bytes(plan) / 2**20:.0f} MiB"
    )
    lines += [f"warning: {n}" for n in plan.notes]
    return "\n".join(lines)


class FnKernel(Kernel):
    """A method function applied to each chunk as it is (elementwise), or to whole rows."""

    mutates_inputs = True  # a method function may work in place on its arguments

    def __init__(
        self, fn: Callable[..., Tensor], kwargs: dict[str, Any], rng: ElementRandom | None, row: int
    ):
        self.fn, self.kwargs, self.rng, self.row = fn, kwargs, rng, row

    def apply(self, start: int, models: list[Tensor], base: Tensor | None) -> Tensor:  # type: ignore[override]
        kw = dict(self.kwargs)
        if self.rng is not None:
            kw["generator"] = self.rng.at(start)
        shape = (-1,) if self.row == 1 else (-1, self.row)  # row-wise: (rows, row) per chunk
        if base is not None:
            kw["base"] = base.reshape(shape)
        out = self.fn([m.reshape(shape) for m in models], **kw)
        return out.reshape(-1)


def _weighted_total(
    form: Affine,
    value_of: Callable[[object], Tensor],
    empty: Callable[[], Tensor],
    *,
    shared_ok: bool = False,
) -> Tensor:
    """Σ c·value over a form's terms, for a whole tensor or one chunk. A lone unit term is
    cloned, since its value may be a cached input that later terms must not change, unless
    `shared_ok` (the caller only reads it: a kernel's operand; a clone cost 10% of a trimming merge)."""
    total: Tensor | None = None
    for leaf, c in form.terms:
        value = value_of(leaf)
        term = value if c == 1.0 else value * c
        total = (
            term.clone()
            if total is None and term is value and not shared_ok
            else (term if total is None else total + term)
        )
    return empty() if total is None else total


@contextmanager
def _method_call(
    tensor: str,
    call: ResolvedCall,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    check: bool = True,
) -> Iterator[None]:
    """Around every method call: NaN/inf inputs refused (`check`: a streamed call's later passes
    see the same values its first pass checked), and failures named by tensor, step and method
    (a MergeError already says what is wrong and passes as it is)."""
    try:
        if check:
            check_finite(call.method, models, base, tensor_name=tensor)
        yield
    except MergeError:
        raise
    except Exception as e:
        raise ExecutionError(
            f"while merging tensor `{tensor}` in step `{call.step}` with `{call.method}`: "
            f"{type(e).__name__}: {e}"
        ) from e


def _input_of(operand: Affine) -> str:
    """The input an operand of a `run.raw` call is (`_feeds_bfloat16` checked: 1 · input)."""
    ((leaf, _),) = operand.terms
    assert isinstance(leaf, str)
    return leaf


class _GraphRun:
    """One streamed graph job: a kernel per call, statistics passes inner calls first."""

    def __init__(self, engine: Engine, job: TensorJob):
        self.job = job
        self.calls = form_calls(job.form)
        self.kernels: dict[int, Kernel] = {}
        for ordinal, call in enumerate(self.calls):
            spec = get_method(call.method)
            kwargs = engine._kwargs(call, job)
            rng = engine._random(call, job, ordinal) if spec.random else None
            shape = spec.shape_for(dict(call.params))
            kernel = spec.kernel(job.shape, kwargs, rng) if spec.kernel is not None else None
            if kernel is None:
                row = rows_of(job.shape) if shape == ROWS else 1
                kernel = FnKernel(spec.fn, kwargs, rng, row)
            self.kernels[id(call)] = kernel
        self.row = job_row(job)
        # bfloat16 chunks go to the kernel as read (no float32 copy) when it can widen them
        self.raw = engine._feeds_bfloat16(job, self.calls, self.kernels)
        for kernel in self.kernels.values():
            kernel.widen_bfloat16 = self.raw
        self.checked: set[int] = set()  # calls whose first pass has checked their inputs

    def pending(self) -> ResolvedCall | None:
        """The first call (inner first) that still wants a statistics pass."""
        return next((c for c in self.calls if self.kernels[id(c)].needs_pass()), None)


# An apply pass computed from the files: each operand's (descriptor, offset), coefficients.
_SumFiles = tuple[list[tuple[int, int]], tuple[float, ...]]


@dataclass
class _Item:
    job: TensorJob
    start: int
    stop: int
    slot: int = 0
    run: _GraphRun | None = None
    stats: ResolvedCall | None = None  # a statistics pass for this call: computes, writes nothing
    barrier: bool = False  # the last item of a statistics pass: what follows depends on it
    # a whole statistics pass of Gram sums, read straight from the files (`_observe_files`)
    gram: tuple[GramPass, GramFiles] | None = None
    sum_files: _SumFiles | None = None  # an apply chunk computed from the files
    # inputs whose chunk the reader found free of NaN and inf (streamed calls not yet checked)
    finite: frozenset[str] = frozenset()
    reading: float = 0.0  # seconds the reader spent reading (not converting) this item
    converting: float = 0.0  # seconds the main thread spent converting its inputs

    @property
    def reads_files(self) -> bool:
        """Its compute reads the input files itself (`merge.file_gram`): the reader loads
        nothing for it."""
        return self.gram is not None or self.sum_files is not None


# Items in flight: one being read, one being computed, one being written. Each owns a slot of
# buffers, so the writer may lag one item behind the compute without either waiting.
SLOTS = 3


class _Slots:
    """SLOTS sets of reused byte buffers, one per input position, grown on demand."""

    def __init__(self) -> None:
        self._bufs: list[list[Tensor]] = [[] for _ in range(SLOTS)]

    def view(self, slot: int, pos: int, n: int, dtype: torch.dtype) -> Tensor:
        bufs = self._bufs[slot]
        while len(bufs) <= pos:
            bufs.append(torch.empty(0, dtype=torch.uint8))
        need = n * dtype.itemsize
        if bufs[pos].numel() < need:
            bufs[pos] = torch.empty(need, dtype=torch.uint8)
        return bufs[pos][:need].view(dtype)


def weighted_sum_into(
    inputs: list[Tensor], coefs: list[float], acc: Tensor, scratch: Tensor | None
) -> Tensor:
    """acc = Σ c_i·x_i in acc's dtype, with every x_i converted once (through `scratch` when
    its dtype differs from acc's, so no temporary is allocated). Summed in input order."""
    if not inputs:  # every term cancelled, e.g. `a - a`
        return acc.zero_()
    first, c0 = inputs[0], coefs[0]
    acc.copy_(first)
    if c0 != 1.0:
        acc.mul_(c0)
    for x, c in zip(inputs[1:], coefs[1:]):
        if x.dtype != acc.dtype:
            assert scratch is not None
            x = scratch.copy_(x)
        acc.add_(x, alpha=c)
    return acc


def combine_blocked(inputs: list[Tensor], coefs: list[float], out: Tensor, work: Tensor) -> bool:
    """out = Σ c_i·x_i, computed in `work`'s dtype block by block (`work` holds two blocks:
    accumulator and scratch) and cast once into `out`. Returns whether every sum is finite,
    checked on each block while it is in cache (a NaN or Inf input always makes one non-finite)."""
    block = work.numel() // 2
    acc_buf, scratch_buf = work[:block], work[block:]
    n = out.numel()
    finite = True
    for s in range(0, n, block):
        e = min(n, s + block)
        acc = acc_buf[: e - s]
        weighted_sum_into([x[s:e] for x in inputs], coefs, acc, scratch_buf[: e - s])
        if finite and not math.isfinite(float(acc.sum())):
            finite = False
        out[s:e].copy_(acc)
    return finite


def _work_dtype(job: TensorJob) -> torch.dtype:
    return torch.float64 if job.dtype == torch.float64 else torch.float32


class Engine:
    """Runs a Plan into a TensorFileWriter-like sink (`write(name, chunk)`)."""

    def __init__(
        self,
        plan: Plan,
        *,
        device: str = "cpu",
        seed: int | None = None,
        chunk: int = CHUNK_ELEMENTS,
        quiet: bool = False,
    ):
        resolve_model_scope(plan, quiet=quiet)  # a first pass, only for `scope: model` methods
        self.plan = plan
        self.device = pick_device(device)
        self.seed = plan.program.recipe.options.seed if seed is None else seed
        self.chunk = chunk
        self.quiet = quiet
        self._slots = _Slots()
        self._staging = _Slots()  # the reader's raw chunks before it converts them (one slot)
        # which thread converts streamed chunks (`_balance`): seconds per element, averaged
        self._reader_converts = True
        self._main_pace = 0.0
        self._read_pace = 0.0
        self._buffers: dict[str, Tensor] = {}  # reused: the accumulator and one output per slot
        self._coefs: dict[str, list[float]] = {}
        self._warned: dict[str, set[str]] = {}  # input -> tensors already reported non-finite
        self._reader: ThreadPoolExecutor | None = None  # the reader thread, while `run` runs

    # -- reading -----------------------------------------------------------------------------------
    def _items(self) -> Iterator[_Item]:
        """Items in order; lazy, so the passes a statistics kernel asks for are decided after
        the barrier item that ends the previous pass has been computed."""
        for j in self.plan.jobs:
            if j.numel == 0 or (j.mode == "graph" and not streams(j)):
                yield _Item(j, 0, j.numel)
            elif j.mode == "graph":
                run = _GraphRun(self, j)
                size = max(run.row, min(self.chunk, GRAPH_CHUNK) // run.row * run.row)
                bounds = [(s, min(j.numel, s + size)) for s in range(0, j.numel, size)]
                while (call := run.pending()) is not None:
                    if (gram := self._gram_files(run, call)) is not None:
                        yield _Item(j, 0, j.numel, run=run, stats=call, barrier=True, gram=gram)
                        continue
                    for i, (s, e) in enumerate(bounds):
                        yield _Item(j, s, e, run=run, stats=call, barrier=i == len(bounds) - 1)
                summed = self._sum_files(run)  # the statistics passes are done here
                for s, e in bounds:
                    yield _Item(j, s, e, run=run, sum_files=summed)
            else:
                for s in range(0, j.numel, self.chunk):
                    yield _Item(j, s, min(j.numel, s + self.chunk))

    def _load(self, item: _Item, slot: int) -> dict[str, Tensor]:
        """One item's inputs, read into the slot's reused buffers (never mapped: a mapped input
        truncated mid-run is a SIGBUS); whole tensors for graph jobs. Chunks of a streamed
        method call are converted to the compute dtype here, on the reader thread, which
        otherwise waits on the main thread's math; weighted sums convert block by block in the
        main thread, where the converted block is still in cache."""
        job = item.job
        out: dict[str, Tensor] = {}
        if item.reads_files:
            return out
        as_read = item.run is not None and item.run.raw
        convert = (
            item.run is not None
            and self.device.type == "cpu"
            and self._reader_converts
            and not as_read
        )
        work = self._graph_dtype(job) if convert else None
        reading = 0.0
        # The NaN/inf check of a call's inputs, done here while the reader has time to spare
        # (always for bfloat16 chunks as read: a compiled loop over their bits is cheap): the
        # main thread then skips it for operands that are these chunks (`_check_needed`).
        check = (
            (convert or as_read)
            and item.run is not None
            and len(item.run.checked) < len(item.run.kernels)
        )
        finite: set[str] = set()
        for pos, name in enumerate(job.inputs):
            src = self.plan.sources[name]
            meta = src.meta(job.name)
            if job.mode == "graph" and item.run is None:
                out[name] = src.read(job.name)
            elif work is not None:
                dest = self._slots.view(slot, pos, item.stop - item.start, work)
                t0 = time.perf_counter()
                if meta.dtype == work:
                    out[name] = src.read_range(job.name, item.start, item.stop, out=dest)
                    reading += time.perf_counter() - t0
                else:
                    raw = self._staging.view(0, pos, item.stop - item.start, meta.dtype)
                    got = src.read_range(job.name, item.start, item.stop, out=raw)
                    reading += time.perf_counter() - t0
                    out[name] = dest.copy_(got.reshape(-1))
                if check and is_finite(out[name]):
                    finite.add(name)
            else:
                buf = self._slots.view(slot, pos, item.stop - item.start, meta.dtype)
                t0 = time.perf_counter()
                out[name] = src.read_range(job.name, item.start, item.stop, out=buf)
                reading += time.perf_counter() - t0
                if check and loops().all_finite_bfloat16(as_array(out[name].reshape(-1))):
                    finite.add(name)
        item.finite = frozenset(finite)
        item.reading = reading
        return out

    # -- computing ---------------------------------------------------------------------------------
    def _buffer(self, key: str, n: int, dtype: torch.dtype, *, on_device: bool = False) -> Tensor:
        """A reused buffer (fresh 4 MB tensors per chunk cost page faults: a third of the
        system time of a trimming merge)."""
        buf = self._buffers.get(key)
        need = n * dtype.itemsize
        if buf is None or buf.numel() < need:
            buf = torch.empty(
                max(need, 8 * min(self.chunk, n)),
                dtype=torch.uint8,
                device=self.device if key == "acc" or on_device else "cpu",
            )
            self._buffers[key] = buf
        return buf[:need].view(dtype)

    def _compute_chunk(self, item: _Item, data: dict[str, Tensor]) -> Tensor:
        job = item.job
        n = item.stop - item.start
        if job.mode == "copy":
            (name,) = job.inputs
            x = data[name]
            self._warn_non_finite(job, {name: x})
            if x.dtype == job.dtype:
                return x
            out = self._buffer(f"out{item.slot}", n, job.dtype)
            return out.copy_(x)
        coefs = self._coefs.get(job.name)
        if coefs is None:
            by_input = dict(job.form.terms)
            coefs = [float(by_input[i]) for i in job.inputs]
            self._coefs = {job.name: coefs}
        inputs = [data[i] for i in job.inputs]
        out = self._buffer(f"out{item.slot}", n, job.dtype)
        if self.device.type == "cpu":
            finite = combine_blocked(
                inputs, coefs, out, self._buffer("acc", 2 * BLOCK_ELEMENTS, _work_dtype(job))
            )
        else:
            work = _work_dtype(job)
            acc = self._buffer("acc", n, work)
            on_device = [x.to(self.device, dtype=work, non_blocking=True) for x in inputs]
            out.copy_(weighted_sum_into(on_device, coefs, acc, None))
            finite = bool(torch.isfinite(acc).all())
        if not finite:  # rare: find and name the inputs responsible
            self._warn_non_finite(job, dict(zip(job.inputs, inputs)))
        return out

    def _warn_non_finite(self, job: TensorJob, chunks: dict[str, Tensor]) -> None:
        """Warn once per input and tensor about NaN/Inf in the chunks read (the engine's reads
        into its buffers skip the sources' own check, so it is done here, only where needed)."""
        for input_name, x in chunks.items():
            seen = self._warned.setdefault(input_name, set())
            if x.is_floating_point() and job.name not in seen:
                file = self.plan.sources[input_name].meta(job.name).file or input_name
                warn_non_finite_read(x, job.name, file, seen)

    def _kwargs(self, call: ResolvedCall, job: TensorJob) -> dict[str, Any]:
        spec = get_method(call.method)
        kwargs: dict[str, Any] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in call.params
        }
        if "tensor_name" in spec.signature.parameters:
            kwargs["tensor_name"] = job.name
        return kwargs

    def _random(self, call: ResolvedCall, job: TensorJob, ordinal: int) -> ElementRandom:
        """Draws keyed by (seed, tensor, call identity): the step and the call's place among
        the job's calls, so two random calls on one tensor draw independent masks."""
        key = mix_seed(self.seed, job.name, call.step, ordinal)
        return ElementRandom(key, 0, self.device)

    def _feeds_bfloat16(
        self, job: TensorJob, calls: Sequence[ResolvedCall], kernels: Mapping[int, Kernel]
    ) -> bool:
        """Whether a streamed job's chunks go to its kernel as read, in bfloat16: one call that
        is the whole job (`m(a, b, base=c)`, not `0.5 * m(...) + a`), whose operands are inputs,
        all bfloat16, computed in float32 on the CPU by a kernel that widens them itself."""
        if self.device.type != "cpu" or not enabled() or self._graph_dtype(job) != torch.float32:
            return False
        if len(calls) != 1 or job.form.terms != ((calls[0], 1.0),):
            return False
        (call,) = calls
        operands = [*call.models, *([] if call.base is None else [call.base])]
        if any(len(f.terms) != 1 or not isinstance(f.terms[0][0], str) or f.terms[0][1] != 1.0
               for f in operands):  # fmt: skip
            return False
        dtypes = {self.plan.sources[name].meta(job.name).dtype for name in job.inputs}
        return dtypes == {torch.bfloat16} and type(kernels[id(call)]).reads_bfloat16

    def _graph_dtype(self, job: TensorJob) -> torch.dtype:
        """Method calls compute in float32 (float64 for a float64 output), or in the compute
        dtype under `compat: mergekit` (mergekit's arithmetic), whole or in chunks."""
        options = self.plan.program.recipe.options
        if options.compat == "mergekit" and options.compute_dtype:
            return DTYPE_NAMES[options.compute_dtype]
        return _work_dtype(job)

    def _compute_graph(self, job: TensorJob, data: dict[str, Tensor]) -> Tensor:
        """A whole-matrix job: whole fp32 tensors, one output tensor at a time."""
        work = self._graph_dtype(job)
        cache: dict[str, Tensor] = {}
        for k in list(data):
            # Pop as we convert, so each input's raw copy is freed before the next is converted.
            cache[k] = data.pop(k).to(device=self.device, dtype=work).reshape(job.shape)
        ordinals = {id(c): i for i, c in enumerate(form_calls(job.form))}
        result = self._eval_form(job.form, cache, job, ordinals, {})
        return result.to(job.dtype).cpu()

    def _compute_streamed(self, item: _Item, data: dict[str, Tensor]) -> Tensor | None:
        """One chunk of a streamed graph job: a statistics observation, or output values."""
        job, run = item.job, item.run
        assert run is not None
        if item.gram is not None:
            self._observe_files(item)
            return None
        if item.sum_files is not None:
            return self._sum_from_files(item)
        work = self._graph_dtype(job)
        # Converted into reused buffers (the reader did it when it had time to spare): kernels
        # see them only during their call.
        t0 = time.perf_counter()
        cache = {
            k: v.reshape(-1)
            if (v.dtype == work or run.raw) and v.device == self.device
            else self._buffer(f"work{i}", v.numel(), work, on_device=True).copy_(v.reshape(-1))
            for i, (k, v) in enumerate(data.items())
        }
        item.converting = time.perf_counter() - t0
        data.clear()
        memo: dict[int, Tensor] = {}
        if item.stats is not None:
            call = item.stats

            def observe(kernel: Kernel, models: list[Tensor], base: Tensor | None) -> None:
                kernel.observe(item.start, models, base)
                if item.barrier:
                    kernel.end_pass()
                    run.checked.add(id(call))

            self._run_call(call, cache, item, memo, observe)
            return None
        out = self._buffer(f"out{item.slot}", item.stop - item.start, job.dtype)
        if run.raw and job.dtype == torch.bfloat16:  # the call is the job: rounded as computed
            rounded = self._run_call(
                run.calls[0],
                cache,
                item,
                memo,
                lambda kernel, models, base: kernel.apply_bfloat16(item.start, models, base, out),
            )
            if rounded is not None:
                if not rounded:
                    self._warn_non_finite(job, {k: cache[k] for k in job.inputs if k in cache})
                return out
        result = self._eval_chunk(job.form, cache, item, memo)
        if job.dtype == torch.bfloat16 and usable(result):
            # rounded and checked in one loop (torch's rounding, bit for bit)
            finite = loops().store_bfloat16(result.numpy(), out.view(torch.int16).numpy())
        else:
            finite = math.isfinite(float(result.sum()))
            out.copy_(result)
        if not finite:  # method inputs were refused; other terms:
            self._warn_non_finite(job, {k: cache[k] for k in job.inputs if k in cache})
        return out

    def _input_spans(
        self, run: _GraphRun, call: ResolvedCall
    ) -> tuple[list[str], dict[str, tuple[int, int]]] | None:
        """A call's operands as input names (models, then the base) and every input's span in
        its file, when its passes may read the files themselves (`merge.file_gram`): bfloat16
        inputs as read (`run.raw`: the call is the job, each operand an input), stored as-is
        (safetensors), on a tensor worth a second thread. None: the engine's chunks."""
        job = run.job
        if not run.raw or job.numel < 4 * RANGE_ELEMENTS or not hasattr(os, "pread"):
            return None  # (the compiled loops call the C library's pread: POSIX only)
        spans = {n: self.plan.sources[n].file_span(job.name) for n in job.inputs}
        found = {n: span for n, span in spans.items() if span is not None}
        if len(found) < len(spans):
            return None
        names = [_input_of(f) for f in call.models]
        return names + ([] if call.base is None else [_input_of(call.base)]), found

    def _gram_files(self, run: _GraphRun, call: ResolvedCall) -> tuple[GramPass, GramFiles] | None:
        """The pending statistics pass as Gram sums to fill from the files, if it is one."""
        got = self._input_spans(run, call)
        if got is None:
            return None
        names, spans = got
        models = len(call.models)
        wanted = run.kernels[id(call)].gram_pass(models, call.base is not None)
        if wanted is None:
            return None
        vectors = [spans[names[i]] for i in wanted.vectors]
        base = spans[names[models]] if wanted.minus_base and call.base is not None else None
        return wanted, GramFiles(vectors, base, run.job.numel)

    def _sum_files(self, run: _GraphRun) -> _SumFiles | None:
        """The apply pass as an ordered sum to compute from the files, if it is one (and the
        output is bfloat16, which the loop rounds to)."""
        call = run.calls[0]
        got = self._input_spans(run, call) if run.job.dtype == torch.bfloat16 else None
        if got is None:
            return None
        names, spans = got
        summed = run.kernels[id(call)].ordered_sum(len(call.models), call.base is not None)
        if summed is None:
            return None
        return [spans[names[i]] for i in summed.operands], summed.coefs

    def _observe_files(self, item: _Item) -> None:
        """A whole statistics pass summed straight from the input files by the main thread
        and the reader thread (idle: the pass is a barrier); see `merge.file_gram`."""
        job, run, call = item.job, item.run, item.stats
        assert run is not None and call is not None and item.gram is not None
        assert self._reader is not None
        wanted, files = item.gram

        def failed_range(start: int, stop: int) -> None:
            # read the ordinary way: a truncated file or a read error raises here, naming the
            # file; NaN/inf are refused as by any method call, naming the input
            models, base = self._operands(call, self._reread(job, start, stop), item, {})
            check_finite(call.method, models, base, tensor_name=job.name)

        fill_gram(wanted.gram, files, self._reader, failed_range)
        run.kernels[id(call)].end_pass()
        run.checked.add(id(call))

    def _sum_from_files(self, item: _Item) -> Tensor:
        """One output chunk of an apply pass computed straight from the input files by the main
        thread and the reader thread (whose loads of such items are empty); see
        `merge.file_gram`. A non-finite output is reported as the chunked pass reports it."""
        job = item.job
        assert item.sum_files is not None and self._reader is not None
        spans, coefs = item.sum_files
        out = self._buffer(f"out{item.slot}", item.stop - item.start, job.dtype)

        def failed_range(start: int, stop: int) -> None:
            self._reread(job, start, stop)

        if not fill_sum(
            spans, coefs, item.start, item.stop, as_array(out), self._reader, failed_range
        ):
            self._warn_non_finite(job, self._reread(job, item.start, item.stop))
        return out

    def _reread(self, job: TensorJob, start: int, stop: int) -> dict[str, Tensor]:
        """A range of every input read the ordinary way (after a compiled loop's read failed:
        a truncated file or a read error raises here, naming the file), into buffers of ours
        so that no read warns: the caller's check is the one that speaks."""
        return {
            n: self.plan.sources[n].read_range(
                job.name, start, stop, out=torch.empty(stop - start, dtype=torch.bfloat16)
            )
            for n in job.inputs
        }

    def _run_call(
        self,
        call: ResolvedCall,
        cache: dict[str, Tensor],
        item: _Item,
        memo: dict[int, Tensor],
        act: Callable[[Kernel, list[Tensor], Tensor | None], _T],
    ) -> _T:
        """`act(kernel, models, base)` on one chunk of a call's operands, with their NaN/inf
        check when still needed and failures named by tensor, step and method."""
        assert item.run is not None
        models, base = self._operands(call, cache, item, memo)
        check = self._check_needed(item, call, models, base, cache)
        with _method_call(item.job.name, call, models, base, check=check):
            return act(item.run.kernels[id(call)], models, base)

    def _check_needed(
        self,
        item: _Item,
        call: ResolvedCall,
        models: Sequence[Tensor],
        base: Tensor | None,
        cache: dict[str, Tensor],
    ) -> bool:
        """Whether a call's operands on this chunk still need the NaN/inf check: not after the
        call's first pass, nor when each operand is an input chunk the reader found finite."""
        assert item.run is not None
        if id(call) in item.run.checked:
            return False
        clean = {id(cache[k]) for k in item.finite if k in cache}
        return not all(id(t) in clean for t in (*models, base) if t is not None)

    def _operands(
        self, call: ResolvedCall, cache: dict[str, Tensor], item: _Item, memo: dict[int, Tensor]
    ) -> tuple[list[Tensor], Tensor | None]:
        """A call's model and base chunks; shared with the cache when its kernel only reads."""
        assert item.run is not None
        shared = not item.run.kernels[id(call)].mutates_inputs
        models = [self._eval_chunk(m, cache, item, memo, shared_ok=shared) for m in call.models]
        base = (
            None
            if call.base is None
            else self._eval_chunk(call.base, cache, item, memo, shared_ok=shared)
        )
        return models, base

    def _eval_chunk(
        self,
        form: Affine,
        cache: dict[str, Tensor],
        item: _Item,
        memo: dict[int, Tensor],
        *,
        shared_ok: bool = True,
    ) -> Tensor:
        """A form's value on one chunk (`shared_ok`: the caller only reads it; the job's result
        is only copied into the output buffer)."""
        run = item.run
        assert run is not None

        def value_of(leaf: object) -> Tensor:
            if isinstance(leaf, str):
                return cache[leaf]
            call: ResolvedCall = leaf  # type: ignore[assignment]
            value = memo.get(id(call))  # a call shared by two terms is computed once
            if value is None:
                value = self._run_call(
                    call,
                    cache,
                    item,
                    memo,
                    lambda k, models, base: k.apply(item.start, models, base),
                )
                memo[id(call)] = value
            return value

        return _weighted_total(
            form,
            value_of,
            lambda: torch.zeros(item.stop - item.start, dtype=torch.float32, device=self.device),
            shared_ok=shared_ok,
        )

    def _eval_form(
        self,
        form: Affine,
        cache: dict[str, Tensor],
        job: TensorJob,
        ordinals: dict[int, int],
        memo: dict[int, Tensor],
    ) -> Tensor:
        def value_of(leaf: object) -> Tensor:
            if isinstance(leaf, str):
                return cache[leaf]
            got = memo.get(id(leaf))
            if got is None:
                got = self._call(leaf, cache, job, ordinals, memo)  # type: ignore[arg-type]
                memo[id(leaf)] = got
            return got

        return _weighted_total(
            form,
            value_of,
            lambda: torch.zeros(job.shape, dtype=torch.float32, device=self.device),
        )

    def _call(
        self,
        call: ResolvedCall,
        cache: dict[str, Tensor],
        job: TensorJob,
        ordinals: dict[int, int],
        memo: dict[int, Tensor],
    ) -> Tensor:
        spec = get_method(call.method)
        models = [self._eval_form(m, cache, job, ordinals, memo) for m in call.models]
        kwargs = self._kwargs(call, job)
        if call.base is not None:
            kwargs["base"] = self._eval_form(call.base, cache, job, ordinals, memo)
        if spec.random:
            kwargs["generator"] = self._random(call, job, ordinals[id(call)])
        with _method_call(job.name, call, models, kwargs.get("base")):
            out = spec.fn(models, **kwargs)
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, write: Callable[[str, Tensor], None]) -> None:
        """Three stages overlap: a reader thread loads item i+1, the main thread computes item i,
        and a writer thread writes item i-1. Item i's buffers belong to slot i mod SLOTS, so a
        slot is reused only after the item that last held it has been written."""
        items = self._items()
        total = sum(self._job_bytes(j) for j in self.plan.jobs)
        bar = byte_progress(total, "merging", quiet=self.quiet)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")
        self._reader = reader  # also the second thread of `_observe_files`
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write")
        pending: deque[tuple[_Item, Future[None]]] = deque()  # submitted writes, oldest first
        # Streaming math is memory-bound: a second intra-op thread gains little and its spinning
        # takes the CPU from the reader and writer threads (measured: 3 GB task arithmetic
        # 7.4 s with one thread, 8.3 s with two). Whole-matrix calls keep every thread.
        threads = torch.get_num_threads()
        count = 0

        def wait_written(keep: int) -> None:
            while len(pending) > keep:
                done, fut = pending.popleft()
                fut.result()
                bar.update(self._item_bytes(done))

        def submit_next() -> tuple[_Item, Future[dict[str, Tensor]]] | None:
            nonlocal count
            nxt = next(items, None)
            if nxt is None:
                return None
            nxt.slot = count % SLOTS
            count += 1
            # Item i+1 goes into the slot of item i+1-SLOTS: that write must be done. Statistics
            # items write nothing, so an older item may still hold this slot: wait for it too.
            wait_written(SLOTS - 2)
            while any(p.slot == nxt.slot for p, _ in pending):
                wait_written(len(pending) - 1)
            return nxt, reader.submit(self._load, nxt, nxt.slot)

        try:
            loading = submit_next()
            while loading is not None:
                item, fut = loading
                data = fut.result()
                loading = None if item.barrier else submit_next()
                whole = item.job.mode == "graph" and item.run is None
                want = threads if whole else 1
                if torch.get_num_threads() != want:
                    torch.set_num_threads(want)
                t0 = time.perf_counter()
                out = self._compute(item, data)
                del data
                if item.run is not None and not item.reads_files:
                    self._balance(item, time.perf_counter() - t0 - item.converting)
                if out is not None:
                    pending.append((item, writer.submit(write, item.job.name, out)))
                if item.barrier:
                    loading = submit_next()
            wait_written(0)
        finally:
            torch.set_num_threads(threads)
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _balance(self, item: _Item, computing: float) -> None:
        """Give the conversion of streamed chunks to whichever thread has time to spare: the
        reader converts while the main thread's own work on a chunk takes longer than reading
        it (a trimming merge), the main thread while reading takes longer (a light call on two
        inputs, or a cold page cache). Averaged over recent chunks, per element."""
        n = max(item.stop - item.start, 1)
        decay = 0.7
        self._main_pace = decay * self._main_pace + (1 - decay) * computing / n
        self._read_pace = decay * self._read_pace + (1 - decay) * item.reading / n
        self._reader_converts = self._main_pace > self._read_pace

    def _compute(self, item: _Item, data: dict[str, Tensor]) -> Tensor | None:
        job = item.job
        try:
            if job.mode == "graph" and item.run is not None:
                return self._compute_streamed(item, data)
            if job.mode == "graph":
                return self._compute_graph(job, data)
            return self._compute_chunk(item, data)
        except MergeError:
            raise
        except Exception as e:
            raise ExecutionError(
                f"while merging tensor `{job.name}`: {type(e).__name__}: {e}"
            ) from e

    def _job_bytes(self, job: TensorJob) -> int:
        """Bytes read and written for one job's output pass (what the progress bar counts)."""
        read = sum(self.plan.sources[i].meta(job.name).dtype.itemsize for i in job.inputs)
        return (read + job.dtype.itemsize) * job.numel

    def _item_bytes(self, item: _Item) -> int:
        """Bytes read and written for one item (what the progress bar counts)."""
        n = item.stop - item.start
        read = sum(self.plan.sources[i].meta(item.job.name).dtype.itemsize for i in item.job.inputs)
        return (read + item.job.dtype.itemsize) * n

    def to_memory(self) -> dict[str, Tensor]:
        """Run the plan into an in-memory dict (for sweeps and tests on small models)."""
        parts: dict[str, list[Tensor]] = {}
        self.run(lambda name, t: parts.setdefault(name, []).append(t.detach().clone()))
        shapes = {j.name: j.shape for j in self.plan.jobs}
        return {
            k: torch.cat([p.reshape(-1) for p in v]).reshape(shapes[k]) for k, v in parts.items()
        }


# ---- output ----------------------------------------------------------------------------------------


def float16_checked(plan: Plan) -> set[str]:
    """Output tensors that can overflow float16: written as float16 from anything but a
    float16 copy (a copy of a float16 tensor keeps its values, whatever they are)."""
    names = set()
    for job in plan.jobs:
        if job.dtype != torch.float16:
            continue
        if job.mode == "copy" and len(job.inputs) == 1:
            src = plan.sources[job.inputs[0]]
            if job.name in src.key_set() and src.meta(job.name).dtype == torch.float16:
                continue
        names.add(job.name)
    return names


def _input_paths(sources: dict[str, TensorSource]) -> list[tuple[str, str | Path]]:
    named: list[tuple[str, str | Path]] = [(n, s.path) for n, s in sources.items() if s.path]
    return named + [(n, f) for n, s in sources.items() for f in s.files()]


def output_metadata(plan: Plan) -> dict[str, str]:
    """The recipe and what identifies each input (its headers' hash and sizes), never paths as
    spelled: the same inputs named `./m`, `m/` or `/abs/m` give the same bytes."""
    recipe = plan.program.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    recipe["inputs"] = sorted(recipe.get("inputs", {}))  # names; identities in merge_inputs
    recipe.get("output", {}).pop("path", None)
    identities = {}
    for n, s in plan.sources.items():
        fp = dict(s.fingerprint())
        fp.pop("path", None)
        identities[n] = fp
    return {
        "format": "pt",
        "merge_version": __version__,
        "merge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":")),
        "merge_inputs": json.dumps(
            identities,
            sort_keys=True,
            separators=(",", ":"),
        ),
    }


def write_plan(
    plan: Plan,
    output: str | Path,
    *,
    force: bool = False,
    shard_size: int | str | None = None,
    device: str = "cpu",
    quiet: bool = False,
    card: bool = True,
) -> Path:
    """Execute `plan` into `output` (`x.safetensors`: one file; otherwise a sharded folder), atomically.

    A folder gets a model card (README.md) and the recipe (merge-recipe.yaml) unless `card` is off.
    """
    output = Path(output)
    check_output(output, _input_paths(plan.sources), force=force)
    layout = output_layout(plan, output, shard_size=shard_size)
    tensors = [OutputTensor(j.name, j.shape, j.dtype) for j in plan.jobs]
    plans, indexes = layout.file_plans(tensors, metadata=output_metadata(plan))
    engine = Engine(plan, device=device, quiet=quiet)
    inputs = _input_paths(plan.sources)
    started, copied = time.monotonic(), []
    with StagedOutput(output, is_dir=not layout.single_file, force=force, inputs=inputs) as staged:
        check_free_space(output, sum(p.data_bytes for p in plans))
        with TensorFileWriter(staged.path(), plans) as writer:
            engine.run(guard_float16(writer.write, float16_checked(plan)))
            writer.finish()
        if not layout.single_file:
            for rel, obj in indexes.items():
                write_json(staged.path(rel), obj)
            copied = copy_support_files(layout.support_files, staged.path(), _uniform_dtype(plans))
            if card:
                write_card(plan, staged.path())
        path = staged.commit()
    if not quiet:
        nbytes = sum(p.data_bytes for p in plans)
        line = write_summary(
            path,
            tensors=len(tensors),
            nbytes=nbytes,
            files=len(plans),
            seconds=time.monotonic() - started,
            copied=copied,
            source=layout.source,
        )
        print(line, file=sys.stderr)
        for rel in unmerged_module_weights([(r, Path(r)) for r in copied]):
            print(
                f"note: {rel} is a module's weights copied from {layout.source}, not merged",
                file=sys.stderr,
            )
    return path


def _uniform_dtype(plans: list[FilePlan]) -> torch.dtype | None:
    floats = {t.dtype for p in plans for t in p.tensors if t.dtype.is_floating_point}
    return floats.pop() if len(floats) == 1 else None
