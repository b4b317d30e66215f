"""arcee_fusion against mergekit 0.1.5: exact where mergekit sorts every importance score (at
most 10^6 of them), in float32 and in bf16; above that mergekit sorts a random sample of 10^6
scores, and we take the exact quartiles that sample estimates."""

from __future__ import annotations

import pytest
import torch

from merge.methods import get_method
from merge.methods.arcee_fusion import importance, outlier_threshold

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g) * 0.02
    return base, base + torch.randn(*shape, generator=g) * 0.002  # a fine-tune's scale


def _mergekit(base: torch.Tensor, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # mergekit samples from torch's global generator
    group = TensorGroup.from_tensors([base, x], base_index=0)
    return mk_registry.get("arcee_fusion").merge_group(group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000, 1000), (7, 33), (500,)])
def test_exact_when_mergekit_sorts_every_score(shape, dtype):
    base, x = (t.to(dtype) for t in _pair(shape, 1))
    ours = get_method("arcee_fusion").fn([x], base=base)
    ref = _mergekit(base, x)  # float32: mergekit's float mask promotes; same values
    assert ours.dtype == dtype
    assert torch.equal(ours, ref.to(dtype))


def test_above_a_million_scores_only_the_sample_differs():
    base, x = _pair((1200, 1000), 2)
    scores = importance(x, base)
    # On the very scores mergekit draws, our quartile rule gives its threshold exactly.
    torch.manual_seed(7)
    drawn = scores.reshape(-1)[torch.randint(scores.numel(), (SAMPLE,))]
    torch.manual_seed(7)
    theirs = DynamicThresholdFusion().calculate_dynamic_threshold(scores)
    assert torch.equal(outlier_threshold(drawn), theirs)
    # Over the whole tensor we keep the entries the exact quartiles select; three mergekit
    # runs (three draws) keep other entries at the margin, among themselves as much as from us.
    ours = get_method("arcee_fusion").fn([x], base=base) != base
    runs = [_mergekit(base, x, seed) != base for seed in (1, 2, 3)]
    n = base.numel()
    to_us = [float((ours != r).sum()) / n for r in runs]
    among = [float((runs[i] != runs[j]).sum()) / n for i, j in ((0, 1), (0, 2), (1, 2))]
    assert max(to_us) < 1e-3, to_us
    assert sum(to_us) <= 1.5 * sum(among), (to_us, among)
