"""The one streaming loop: read the few tensors an output tensor needs, compute in float32, write.

Weighted sums ("affine" jobs) and plain copies stream in chunks through three buffer slots: a
reader thread fills one while the main thread computes another and a writer thread writes the
third, so memory is a few chunks whatever the tensor or model size. Jobs with method calls
("graph" jobs) read whole tensors, since methods such as TIES or SLERP need the whole tensor.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge import __version__
from merge.dtypes import guard_float16
from merge.errors import ExecutionError, MergeError, PlanError, UsageError
from merge.expr import Affine
from merge.io.output import check_output
from merge.io.sources import TensorSource
from merge.io.support_files import unmerged_module_weights
from merge.io.writer import (
    DEFAULT_SHARD_SIZE,
    FilePlan,
    OutputTensor,
    StagedOutput,
    TensorFileWriter,
    check_free_space,
    parse_size,
    plan_files,
    write_json,
)
from merge.methods import get_method
from merge.plan import DTYPE_NAMES, Job, Plan, ResolvedCall
from merge.progress import byte_progress, write_summary

# 8M elements per read: 16 MiB of bf16 per input, large enough for sequential reads at disk speed.
CHUNK_ELEMENTS = 1 << 23
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


def estimate_peak_bytes(plan: Plan, chunk: int = CHUNK_ELEMENTS) -> int:
    """Rough peak of our own buffers: the read slots and the accumulators, or whole fp32 tensors."""
    peak = 0
    for j in plan.jobs:
        if j.mode == "graph":
            peak = max(peak, (len(j.inputs) * 2 + 3) * j.numel * 4)
        else:
            n = min(j.numel, chunk)
            peak = max(peak, SLOTS * (len(j.inputs) + 1) * n * 8 + 2 * BLOCK_ELEMENTS * 8)
    return peak


@dataclass
class _Item:
    job: Job
    start: int
    stop: int
    slot: int = 0


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


def combine_blocked(inputs: list[Tensor], coefs: list[float], out: Tensor, work: Tensor) -> Tensor:
    """out = Σ c_i·x_i, computed in `work`'s dtype block by block (`work` holds two blocks:
    accumulator and scratch) and cast once into `out`."""
    block = work.numel() // 2
    acc_buf, scratch_buf = work[:block], work[block:]
    n = out.numel()
    for s in range(0, n, block):
        e = min(n, s + block)
        acc = acc_buf[: e - s]
        weighted_sum_into([x[s:e] for x in inputs], coefs, acc, scratch_buf[: e - s])
        out[s:e].copy_(acc)
    return out


def _work_dtype(job: Job) -> torch.dtype:
    return torch.float64 if job.out_dtype == torch.float64 else torch.float32


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
        from merge.model_scope import resolve_model_scope

        resolve_model_scope(plan, quiet=quiet)  # a first pass, only for `scope: model` methods
        self.plan = plan
        self.device = pick_device(device)
        self.seed = plan.program.recipe.options.seed if seed is None else seed
        self.chunk = chunk
        self.quiet = quiet
        self._slots = _Slots()
        self._buffers: dict[str, Tensor] = {}  # reused: the accumulator and one output per slot
        self._coefs: dict[str, list[float]] = {}

    # -- reading -----------------------------------------------------------------------------------
    def _items(self) -> Iterator[_Item]:
        for j in self.plan.jobs:
            if j.mode == "graph" or j.numel == 0:
                yield _Item(j, 0, j.numel)
            else:
                for s in range(0, j.numel, self.chunk):
                    yield _Item(j, s, min(j.numel, s + self.chunk))

    def _load(self, item: _Item, slot: int) -> dict[str, Tensor]:
        """One item's inputs in their own dtype: a view of the file's pages for this chunk where
        the source can map it (no copy; unmapped when the item is dropped), else read into the
        slot's reused buffers; whole tensors for graph jobs. The main thread converts."""
        job = item.job
        out: dict[str, Tensor] = {}
        for pos, name in enumerate(job.inputs):
            src = self.plan.sources[name]
            meta = src.meta(job.name)
            if job.mode == "graph":
                out[name] = src.read(job.name)
            else:
                mapped = src.map_range(job.name, item.start, item.stop)
                if mapped is None:
                    buf = self._slots.view(slot, pos, item.stop - item.start, meta.dtype)
                    mapped = src.read_range(job.name, item.start, item.stop, out=buf)
                out[name] = mapped
        return out

    # -- computing ---------------------------------------------------------------------------------
    def _buffer(self, key: str, n: int, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(key)
        need = n * dtype.itemsize
        if buf is None or buf.numel() < need:
            buf = torch.empty(
                max(need, 8 * min(self.chunk, n)),
                dtype=torch.uint8,
                device=self.device if key == "acc" else "cpu",
            )
            self._buffers[key] = buf
        return buf[:need].view(dtype)

    def _compute_chunk(self, item: _Item, data: dict[str, Tensor]) -> Tensor:
        job = item.job
        n = item.stop - item.start
        if job.mode == "copy":
            (name,) = job.inputs
            x = data[name]
            if x.dtype == job.out_dtype:
                return x
            out = self._buffer(f"out{item.slot}", n, job.out_dtype)
            return out.copy_(x)
        coefs = self._coefs.get(job.name)
        if coefs is None:
            by_input = dict(job.form.terms)
            coefs = [float(by_input[i]) for i in job.inputs]
            self._coefs = {job.name: coefs}
        inputs = [data[i] for i in job.inputs]
        out = self._buffer(f"out{item.slot}", n, job.out_dtype)
        if self.device.type == "cpu":
            combine_blocked(
                inputs, coefs, out, self._buffer("acc", 2 * BLOCK_ELEMENTS, _work_dtype(job))
            )
        else:
            work = _work_dtype(job)
            acc = self._buffer("acc", n, work)
            on_device = [x.to(self.device, dtype=work, non_blocking=True) for x in inputs]
            out.copy_(weighted_sum_into(on_device, coefs, acc, None))
        return out

    def _compute_graph(self, job: Job, data: dict[str, Tensor]) -> Tensor:
        work = torch.float64 if job.out_dtype == torch.float64 else torch.float32
        options = self.plan.program.recipe.options
        if options.compat == "mergekit" and options.compute_dtype:  # mergekit's arithmetic
            work = DTYPE_NAMES[options.compute_dtype]
        cache: dict[str, Tensor] = {}
        for k in list(data):
            # Pop as we convert, so each input's raw copy is freed before the next is converted.
            cache[k] = data.pop(k).to(device=self.device, dtype=work).reshape(job.shape)
        result = self._eval_form(job.form, cache, job)
        return result.to(job.out_dtype).cpu()

    def _eval_form(self, form: Affine, cache: dict[str, Tensor], job: Job) -> Tensor:
        total: Tensor | None = None
        for leaf, c in form.terms:
            if isinstance(leaf, str):
                value = cache[leaf]
            else:
                value = self._call(leaf, cache, job)  # type: ignore[arg-type]
            term = value if c == 1.0 else value * c
            total = (
                term.clone()
                if total is None and term is value
                else (term if total is None else total + term)
            )
        if total is None:
            return torch.zeros(job.shape, dtype=torch.float32, device=self.device)
        return total

    def _call(self, call: ResolvedCall, cache: dict[str, Tensor], job: Job) -> Tensor:
        spec = get_method(call.method)
        models = [self._eval_form(m, cache, job) for m in call.models]
        kwargs: dict[str, Any] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in call.params
        }
        if call.base is not None:
            kwargs["base"] = self._eval_form(call.base, cache, job)
        if spec.random:
            g = torch.Generator(device=self.device)
            g.manual_seed(tensor_seed(self.seed, job.name))
            kwargs["generator"] = g
        if "tensor_name" in spec.signature.parameters:
            kwargs["tensor_name"] = job.name
        try:
            return spec.fn(models, **kwargs)
        except MergeError:
            raise
        except Exception as e:
            raise ExecutionError(
                f"while merging tensor `{job.name}` in step `{call.step}` with `{call.method}`: {type(e).__name__}: {e}"
            ) from e

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, write: Callable[[str, Tensor], None]) -> None:
        """Three stages overlap: a reader thread loads item i+1, the main thread computes item i,
        and a writer thread writes item i-1. Item i's buffers belong to slot i mod SLOTS, so a
        slot is reused only after the item that last held it has been written."""
        items = list(self._items())
        for i, it in enumerate(items):
            it.slot = i % SLOTS
        total = sum(self._item_bytes(it) for it in items)
        bar = byte_progress(total, "merging", quiet=self.quiet)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write")
        pending: deque[tuple[_Item, Future[None]]] = deque()  # submitted writes, oldest first
        # Streaming math is memory-bound: a second intra-op thread gains little and its spinning
        # takes the CPU from the reader and writer threads (measured: 3 GB task arithmetic
        # 7.4 s with one thread, 8.3 s with two). Method calls (TIES...) keep every thread.
        threads = torch.get_num_threads()

        def wait_written(keep: int) -> None:
            while len(pending) > keep:
                done, fut = pending.popleft()
                fut.result()
                bar.update(self._item_bytes(done))

        try:
            loading: Future[dict[str, Tensor]] | None = (
                reader.submit(self._load, items[0], 0) if items else None
            )
            for i, item in enumerate(items):
                assert loading is not None
                data = loading.result()
                # Item i+1 goes into the slot of item i+1-SLOTS: that write must be done.
                wait_written(SLOTS - 2)
                if i + 1 < len(items):
                    loading = reader.submit(self._load, items[i + 1], items[i + 1].slot)
                want = threads if item.job.mode == "graph" else 1
                if torch.get_num_threads() != want:
                    torch.set_num_threads(want)
                out = self._compute(item, data)
                del data
                pending.append((item, writer.submit(write, item.job.name, out)))
            wait_written(0)
        finally:
            torch.set_num_threads(threads)
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _compute(self, item: _Item, data: dict[str, Tensor]) -> Tensor:
        job = item.job
        try:
            if job.mode == "graph":
                return self._compute_graph(job, data)
            return self._compute_chunk(item, data)
        except MergeError:
            raise
        except Exception as e:
            raise ExecutionError(
                f"while merging tensor `{job.name}`: {type(e).__name__}: {e}"
            ) from e

    def _item_bytes(self, item: _Item) -> int:
        """Bytes read and written for one item (what the progress bar counts)."""
        n = item.stop - item.start
        read = sum(self.plan.sources[i].meta(item.job.name).dtype.itemsize for i in item.job.inputs)
        return (read + item.job.out_dtype.itemsize) * n

    def to_memory(self) -> dict[str, Tensor]:
        """Run the plan into an in-memory dict (for sweeps and tests on small models)."""
        parts: dict[str, list[Tensor]] = {}
        self.run(lambda name, t: parts.setdefault(name, []).append(t.detach().clone()))
        shapes = {j.name: j.shape for j in self.plan.jobs}
        return {
            k: torch.cat([p.reshape(-1) for p in v]).reshape(shapes[k]) for k, v in parts.items()
        }


# ---- output ----------------------------------------------------------------------------------------


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
    recipe = plan.program.recipe
    size = parse_size(
        shard_size if shard_size is not None else recipe.output.shard_size or DEFAULT_SHARD_SIZE
    )
    tensors = [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs]
    meta = output_metadata(plan)
    single = output.suffix == ".safetensors"
    layout = plan.sources[plan.layout_input]
    indexes: dict[str, object] = {}
    if single:
        plans, _ = plan_files(tensors, single_file="", metadata=meta)
    else:
        plans, indexes = layout.plan_output(tensors, shard_size=size, metadata=meta)
    engine = Engine(plan, device=device, quiet=quiet)
    inputs = _input_paths(plan.sources)
    started, copied = time.monotonic(), []
    with StagedOutput(output, is_dir=not single, force=force, inputs=inputs) as staged:
        check_free_space(output, sum(p.data_bytes for p in plans))
        writer = TensorFileWriter(staged.path(), plans)
        engine.run(guard_float16(writer.write, plan))
        writer.finish()
        if not single:
            for rel, obj in indexes.items():
                write_json(staged.path(rel), obj)
            copied = _copy_support_files(layout, staged.path(), _uniform_dtype(plans))
            if card:
                from merge.card import write_card

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
            source=layout.path,
        )
        print(line, file=sys.stderr)
        for rel in unmerged_module_weights([(r, Path(r)) for r in copied]):
            print(
                f"note: {rel} is a module's weights copied from {layout.path}, not merged",
                file=sys.stderr,
            )
    return path


def _uniform_dtype(plans: list[FilePlan]) -> torch.dtype | None:
    floats = {t.dtype for p in plans for t in p.tensors if t.dtype.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def _copy_support_files(layout: TensorSource, dest: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy `layout`'s support files into `dest` (config.json gets the output dtype); their relpaths."""
    files = layout.support_files()
    for rel, src in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.name == "config.json" and dtype is not None:
            try:
                config = json.loads(src.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                shutil.copyfile(src, target)  # new files: the umask, not the input's mode
                continue
            if not isinstance(config, dict) or not {"model_type", "architectures"} & set(config):
                shutil.copyfile(src, target)  # module configs carry no dtype
                continue
            if "_diffusers_version" in config:  # diffusers configs carry no dtype
                shutil.copyfile(src, target)  # new files: the umask, not the input's mode
                continue
            name = str(dtype).replace("torch.", "")
            if "dtype" in config:
                config["dtype"] = name
            else:
                config["torch_dtype"] = name
            target.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(src, target)  # new files: the umask, not the input's mode
    return [rel for rel, _ in files]
