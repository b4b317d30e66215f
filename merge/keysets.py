"""Key-set reconciliation checks: an output must be a model that the copied config describes.

`--keys intersection` keeps the tensors every checkpoint has; `union` also passes through those
only some have. Both are meant for small differences (a tied `lm_head`, a buffer one save kept).
Between different architectures they write nonsense: an empty file, or one model's tensors
mixed into another's under the first one's `config.json`. So:

- an output with no tensor is refused whatever the flags ("nothing to merge");
- where the layout input (whose config.json is copied) has a config, an output that lacks more
  than half of that model's tensors (intersection) or holds tensors that model does not have
  (union) is refused unless the user says `mixed_architectures` (`--mixed-architectures`);
- the strict-mode error suggests intersection/union only when the key sets mostly overlap;
  otherwise it says the inputs look like different architectures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from merge.io.sources import TensorSource

SAME_MODEL_OVERLAP = 0.5  # share of the smaller key set two checkpoints of one model have in common


def _names(keys: AbstractSet[str], limit: int = 6) -> str:
    shown = sorted(keys)[:limit]
    return ", ".join(shown) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def overlap(keys_by: Mapping[str, AbstractSet[str]], checkpoints: Sequence[str]) -> float:
    """|common| / |smallest key set| over the checkpoints (1.0 for identical key sets)."""
    sets = [set(keys_by[n]) for n in checkpoints]
    common = set.intersection(*sets) if sets else set()
    smallest = min((len(s) for s in sets), default=0)
    return len(common) / smallest if smallest else 1.0


def strict_hint(keys_by: Mapping[str, AbstractSet[str]], checkpoints: Sequence[str]) -> str:
    """The last line of the strict-mode key error: how to go on, or why not to."""
    share = overlap(keys_by, checkpoints)
    if share < SAME_MODEL_OVERLAP:
        return (
            f"these look like different architectures (they share {share:.0%} of their tensor names): "
            "merge checkpoints of one architecture; `--keys intersection` or `union` would not make "
            "a model of them"
        )
    return (
        "if these are one architecture saved differently (a tied lm_head, an extra buffer), use "
        "`options: {keys: intersection}` (or --keys intersection) to merge only the common tensors, "
        "or `union` to pass the others through from the input that has them"
    )


def _has_config(source: TensorSource) -> bool:
    return any(rel == "config.json" for rel, _ in source.support_files())


def output_key_problems(
    names: Sequence[str],
    mode: str,
    layout: str,
    sources: Mapping[str, TensorSource],
    checkpoints: Sequence[str],
    *,
    mixed_architectures: bool,
) -> list[str]:
    """Why the reconciled output `names` is not a model its copied config describes ([] if it is)."""
    if not checkpoints or mode == "strict":
        return []
    if not names:
        paths = ", ".join(f"`{n}` ({sources[n].path})" for n in checkpoints)
        return [
            f"--keys {mode} leaves no tensor to write: {paths} share no tensor names (different "
            "architectures?); there is nothing to merge"
        ]
    if mixed_architectures or layout not in checkpoints or not _has_config(sources[layout]):
        return []
    own = sources[layout].key_set()
    out = set(names)
    flag = "pass --mixed-architectures (recipe: `options: {mixed_architectures: true}`) to write it anyway"
    if mode == "union":
        foreign = out - own
        if foreign:
            return [
                f"--keys union adds {len(foreign)} tensor(s) that `{layout}`'s model does not have "
                f"({_names(foreign)}), under `{layout}`'s config.json ({sources[layout].path}), which "
                f"does not describe them; merge checkpoints of one architecture, or {flag}"
            ]
    if mode == "intersection":
        lost = own - out
        if len(lost) > SAME_MODEL_OVERLAP * len(own):
            return [
                f"--keys intersection keeps {len(own) - len(lost)} of the {len(own)} tensors of "
                f"`{layout}` ({sources[layout].path}), whose config.json describes them all (dropped: "
                f"{_names(lost)}): that is not a model; merge checkpoints of one architecture, or {flag}"
            ]
    return []
