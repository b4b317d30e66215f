"""Tracing a user's model into a `torch.fx` graph with shapes: symbolic_trace, else torch.export.

Also the small helpers every alignment step shares: splitting a data batch into model inputs,
calling a model with a state dict (`torch.func.functional_call`, tied weights given once), and
mapping tied state-dict names onto one canonical name.
"""

from __future__ import annotations

import inspect
import io
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from merge.errors import MergeError, UsageError

Args = tuple[tuple[Any, ...], dict[str, Any]]


class TraceError(MergeError):
    """Neither torch.fx nor torch.export could trace the model."""


def without_cache(model: nn.Module, args: Args) -> Args:
    """Hugging Face models return a KV cache object unless told not to; tracing and the checks
    need plain tensors, so `use_cache=False` is passed when `forward` accepts it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return args
    if "use_cache" in params and "use_cache" not in args[1]:
        return args[0], {**args[1], "use_cache": False}
    return args


def split_batch(batch: Any) -> Args:
    """A data batch -> (args, kwargs) for the model: `(inputs, targets)`, a tensor, or HF-style dict."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        return (tuple(first) if isinstance(first, list | tuple) else (first,)), {}
    raise UsageError(
        f"cannot use a data batch of type {type(batch).__name__}: expected a tensor, "
        "an (inputs, targets) pair or a dict of model keyword arguments"
    )


class OneShotData:
    """A one-shot iterator (a generator) whose first batch can be looked at before its one pass.

    Tracing and the example input look at the first batch; the pass over the data then starts
    with that same batch, so a two-batch generator is matched on two batches, not zero.
    """

    def __init__(self, data: Iterable[Any]):
        self._it = iter(data)
        self._head: list[Any] = []
        self._used = False

    def first(self) -> Any:
        if not self._head:
            for batch in self._it:
                self._head.append(batch)
                break
        if not self._head:
            raise UsageError("the data (--data) yielded no batches")
        return self._head[0]

    def __iter__(self) -> Iterator[Any]:
        if self._used:
            raise UsageError(
                "the data (--data) is a one-shot iterator and was already used up; "
                "return a list or a DataLoader from make_data()"
            )
        self._used = True
        return itertools.chain(self._head, self._it)


def replayable(data: Iterable[Any]) -> Iterable[Any]:
    """`data` itself when iterating it twice is safe (a list, a DataLoader), else a `OneShotData`."""
    if isinstance(data, Iterator):
        return OneShotData(data)
    return data
    return OneShotData(data)


def first_batch(data: Iterable[Any]) -> Args:
    """The first batch as (args, kwargs), without using up a `OneShotData`."""
    if isinstance(data, OneShotData):
        return split_batch(data.first())
    for batch in data:
        return split_batch(batch)
    raise UsageError("the data (--data) yielded no batches")


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor inside (nested) args to `dtype`; integer inputs stay."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def guess_example(model: nn.Module) -> Args:
    """A plausible input from the first parameterised layer: Linear -> (2, in), Embedding -> tokens,
    Conv -> images of the first spatial size (8, 16, 28, 32, 64, 224) the model accepts."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            return (torch.randn(2, mod.in_features),), {}
        if isinstance(mod, nn.Embedding):
            return (torch.randint(0, mod.num_embeddings, (2, 8)),), {}
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(mod)]
            for size in (8, 16, 28, 32, 64, 224):
                x = torch.randn(2, mod.in_channels, *([size] * nd))
                try:
                    with torch.no_grad(), eval_mode(model):
                        model(x)
                    return (x,), {}
                except Exception:
                    continue
            break
    raise UsageError(
        "cannot guess an example input for this model: pass `example_input=` "
        "(or --data on the command line)"
    )


def canonical_names(model: nn.Module) -> dict[str, str]:
    """state-dict name -> the first name of the same tensor (tied weights share one canonical name)."""
    first: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return out


def call_with_state(model: nn.Module, state: Mapping[str, Tensor], args: Args) -> Any:
    """`model(*args, **kwargs)` with `state` swapped in (tied weights: the canonical name only)."""
    canon = canonical_names(model)
    given = {k: v for k, v in state.items() if canon.get(k, k) == k}
    return torch.func.functional_call(model, given, args[0], args[1])


@dataclass
class Traced:
    gm: fx.GraphModule
    shapes: dict[fx.Node, Any]  # node -> shape tuple, list of shapes (tuple outputs), or None
    tracer: str  # "torch.fx" or "torch.export"


def _shape_from(meta: Any) -> Any:
    if meta is None:
        return None
    if isinstance(meta, Tensor):
        return tuple(int(s) for s in meta.shape)
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):  # fx TensorMetadata
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, list | tuple):
        return [_shape_from(m) for m in meta]
    return None


def trace(model: nn.Module, args: Args) -> Traced:
    """fx.symbolic_trace + ShapeProp; when that fails, torch.export (ATen ops, real shapes)."""
    errors = []
    args = without_cache(model, args)
    with eval_mode(model):
        try:
            return _trace_fx(model, args)
        except Exception as e:
            errors.append(f"torch.fx.symbolic_trace: {_first_line(e)}")
        try:
            with _quiet_torch_logs():
                ep = torch.export.export(model, args[0], args[1], strict=False)
            gm = ep.module()
            shapes = {n: _shape_from(n.meta.get("val")) for n in gm.graph.nodes}
            return Traced(gm, shapes, "torch.export")
        except Exception as e:
            errors.append(f"torch.export: {_first_line(e)}")
    raise TraceError(
        f"cannot trace {type(model).__name__} to infer a permutation spec:\n  "
        + "\n  ".join(errors)
        + "\n  write the spec by hand (YAML or JSON, see docs/align.md) and pass it with --spec / spec="
    )


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs, and prints to stderr, whole graphs when it gives up; our error message
    says what matters."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.fx.experimental.symbolic_shapes",
            "torch.export",
            "torch._export",
            "torch._dynamo",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _trace_fx(model: nn.Module, args: Args) -> Traced:
    if args[1]:
        raise TraceError("keyword inputs: symbolic_trace takes positional inputs only")
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args[0])
    shapes = {n: _shape_from(n.meta.get("tensor_meta")) for n in gm.graph.nodes}
    return Traced(gm, shapes, "torch.fx")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
