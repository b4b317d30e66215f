"""One call from two checkpoints to B aligned to A, verified before it is returned."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from merge.align.activation_matching import activation_matching
from merge.align.infer import example_args, infer_spec
from merge.align.permute import apply_permutation
from merge.align.spec import PermutationSpec
from merge.align.trace import replayable
from merge.align.verify import Checker, VerificationError, relative_change, verify_spec
from merge.align.weight_matching import MatchReport, weight_matching
from merge.entrypoints import load_weights, make_model
from merge.errors import UsageError

METHODS = ("weight", "activation")


def complete_tied(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fill names a checkpoint dropped because they are tied to one it kept (e.g. `lm_head.weight`)."""
    out = dict(state)
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    for names in by_id.values():
        present = [n for n in names if n in out]
        for n in names:
            if n not in out and present:
                out[n] = out[present[0]]
    return out


def align_state_dicts(
    model_factory_or_module: Callable[[], nn.Module] | nn.Module | str,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    method: str = "weight",
    data: Iterable[Any] | None = None,
    seed: int = 0,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    restarts: int = 3,
    max_sweeps: int = 100,
    heads: bool = False,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Tensor], MatchReport]:
    """B permuted into A's unit order, and the report; B's function is unchanged (checked).

    The spec is inferred from the model (or given); it is verified on B's weights before matching
    (random permutations must not change the outputs, breaking a group must), and the aligned B
    is compared with B at the end. Any failure raises a MergeError naming the group.

    Args:
        model_factory_or_module: an `nn.Module`, a no-argument function that builds one, or its
            `module:function` name; its state-dict names and shapes must match both checkpoints.
        method: "weight" (Git Re-Basin weight matching, no data) or "activation" (needs `data`).
        data: batches `(inputs, targets)` / tensors / dicts; also gives the example input.
        spec: a hand-written spec (`load_spec`) instead of the inferred one.
        heads: let the inferred spec permute attention heads (see `infer_spec`).
        device: where the matching runs (weight matching's cost matrices, activation matching's
            forward passes); the equivalence checks stay on the CPU.
    """
    if method not in METHODS:
        raise UsageError(f"unknown alignment method `{method}`: use one of {', '.join(METHODS)}")
    if method == "activation" and data is None:
        raise UsageError(
            "activation matching needs data: pass `data=` (--data on the command line)"
        )
    if data is not None:
        data = replayable(data)  # the example input and the matching pass share a generator
    if isinstance(model_factory_or_module, nn.Module):
        model = model_factory_or_module
    else:
        model = make_model(model_factory_or_module)  # a callable or a "module:function" string
    model = copy.deepcopy(model)
    keys_b = list(state_b)
    state_a, state_b = complete_tied(model, state_a), complete_tied(model, state_b)
    load_weights(model, state_a, source="checkpoint A")  # every name and shape checked, A then B
    load_weights(model, state_b, source="checkpoint B")
    args = example_args(model, example_input, data)
    if spec is None:
        spec = infer_spec(model, example_input=args[1] if args[1] else args[0], heads=heads)
    if progress:
        progress(f"spec ({spec.source}): {len(spec.groups)} groups, {len(spec.fixed)} fixed axes")
    if not spec.groups:
        raise VerificationError(
            "the permutation spec has no groups: nothing in this model can be permuted "
            "(run with --show-spec to see why every axis is fixed)"
        )
    checker = Checker(model, args)  # one float64 copy of the model serves both checks
    verification = verify_spec(model, spec, args, state_b, checker=checker)
    if progress:
        progress(
            f"spec verified in {verification.dtype}: max relative change {max(verification.max_change):.2g}"
        )
    if method == "weight":
        perms, report = weight_matching(
            spec,
            state_a,
            state_b,
            seed=seed,
            restarts=restarts,
            max_sweeps=max_sweeps,
            device=device,
            progress=progress,
        )
    else:
        assert data is not None
        perms, report = activation_matching(model, spec, state_a, state_b, data, device=device)
        report.seed = seed
    aligned = apply_permutation(spec, perms, state_b)
    change = relative_change(
        checker.outputs(checker.cast(state_b)), checker.outputs(checker.cast(aligned))
    )
    if change > checker.rtol:
        raise VerificationError(
            f"the aligned checkpoint computes a different function from B (relative change {change:.3g} > "
            f"{checker.rtol:g}); nothing was written"
        )
    report.extra.update(
        {
            "spec_source": spec.source,
            "fixed_axes": len(spec.fixed),
            "verification": {**verification.to_dict(), "aligned_vs_b": change},
        }
    )
    return {k: aligned[k] for k in keys_b}, report
