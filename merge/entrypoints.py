"""Turn the user's `module:function` strings into the callables alignment and evaluation need.

Fixed signatures (see DESIGN.md):
- `--model`: `make_model() -> nn.Module`, whose `state_dict()` names match the checkpoint's;
- `--data`:  `make_data() -> Iterable[batch]`, a batch being `(inputs, targets)` or a dict of
  keyword arguments for the model (Hugging Face style, with `labels`);
- `--eval`:  `evaluate(model) -> dict[str, float]` returning at least `loss`.
A module part may be an importable module (`pkg.models`) or a path to a `.py` file
(`./models.py:make_mlp`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.errors import FormatError, UsageError, did_you_mean


def resolve(spec: str | Callable[..., Any], what: str = "entry point") -> Callable[..., Any]:
    """`module:function` (or `path/to/file.py:function`) -> the callable; callables pass through."""
    if callable(spec):
        return spec
    if ":" not in spec:
        raise UsageError(
            f"{what} `{spec}` must look like `module:function` or `path/to/file.py:function`"
        )
    module_part, _, attr = spec.rpartition(":")
    module = _import(module_part, what, spec)
    target: Any = module
    for piece in attr.split("."):
        if not hasattr(target, piece):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise UsageError(
                f"{what} `{spec}`: `{module_part}` has no attribute `{piece}`{did_you_mean(piece, names)}"
            )
        target = getattr(target, piece)
    if not callable(target):
        raise UsageError(f"{what} `{spec}` is not callable (it is a {type(target).__name__})")
    return target  # type: ignore[no-any-return]


def _import(module_part: str, what: str, spec: str) -> Any:
    path = Path(module_part)
    if module_part.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UsageError(f"{what} `{spec}`: file `{module_part}` does not exist")
        name = f"_merge_user_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"{what} `{spec}`: cannot import `{module_part}`")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        # The user's file may import its siblings.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise UsageError(
                f"{what} `{spec}`: importing `{module_part}` failed: {type(e).__name__}: {e}"
            ) from e
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as e:
        raise UsageError(
            f"{what} `{spec}`: cannot import module `{module_part}` ({e}); "
            "install it, add its folder to PYTHONPATH, or give a path to a .py file"
        ) from e


def make_model(spec: str | Callable[[], nn.Module]) -> nn.Module:
    """Call the user's model factory and check that it returned an `nn.Module`."""
    fn = resolve(spec, "--model")
    try:
        model = fn()
    except Exception as e:
        raise UsageError(f"--model `{_name(spec)}` raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model `{_name(spec)}` returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def make_data(spec: str | Callable[[], Iterable[Any]]) -> Iterable[Any]:
    """Call the user's data factory; the result must be iterable more than once (a list or loader)."""
    fn = resolve(spec, "--data")
    try:
        data = fn()
    except Exception as e:
        raise UsageError(f"--data `{_name(spec)}` raised {type(e).__name__}: {e}") from e
    if not isinstance(data, Iterable):
        raise UsageError(
            f"--data `{_name(spec)}` returned {type(data).__name__}, which is not iterable"
        )
    return data


def make_evaluator(
    spec: str | Callable[[nn.Module], Mapping[str, float]],
) -> Callable[[nn.Module], Mapping[str, float]]:
    return resolve(spec, "--eval")


def load_weights(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Copy `tensors` into `model` in place; every missing, unexpected or mis-shaped name is listed."""
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    shapes = [
        f"{k}: model {tuple(state[k].shape)} vs {source} {tuple(tensors[k].shape)}"
        for k in sorted(set(state) & set(tensors))
        if tuple(state[k].shape) != tuple(tensors[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"missing from {source} ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if unexpected:
            parts.append(
                f"not in the model ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:8]))
        raise FormatError(
            f"the model from --model does not match {source}:\n  "
            + "\n  ".join(parts)
            + "\n  check that --model builds the architecture the checkpoint was saved from"
        )
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))


def _name(spec: object) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
