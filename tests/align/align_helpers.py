"""Helpers shared by the alignment tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from merge.toy import (
    evaluate_loss,
    make_mlp,
    make_resnet,
    make_transformer,
    make_vgg,
    synthetic_classification,
    synthetic_images,
    synthetic_tokens,
)

MLP_KW = {"in_features": 16, "hidden": 128, "out_features": 4, "depth": 2}


@dataclass
class TrainedPair:
    a: nn.Module
    b: nn.Module
    data: list[tuple[Tensor, Tensor]]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm/LayerNorm non-trivial statistics and affine parameters, so that forgetting
    to permute any of them changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def toy_cases() -> dict[str, tuple[nn.Module, Tensor]]:
    """Each toy architecture (untrained, seeded, with randomised norms) and an example input."""
    return {
        "mlp": (make_mlp(**MLP_KW, seed=0).eval(), synthetic_classification(0, 16)[0]),
        "vgg": (randomize_norms(make_vgg(seed=0)), synthetic_images(0, 8)[0]),
        "resnet": (randomize_norms(make_resnet(8, seed=0)), synthetic_images(0, 8)[0]),
        "transformer": (randomize_norms(make_transformer(seed=0)), synthetic_tokens(0, 4)[0]),
    }


ALPHAS = [i / 10 for i in range(11)]


def path_losses(sa: dict, sb: dict, data: list) -> list[float]:
    """Mean loss of the MLP along the linear path from `sa` to `sb`, 11 points."""
    model = make_mlp(**MLP_KW)
    out = []
    for alpha in ALPHAS:
        model.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] for k in sa})
        out.append(evaluate_loss(model, data)[0])
    return out


def barrier(losses: list[float]) -> float:
    """Git Re-Basin's loss barrier: max over the path minus the mean of the endpoints."""
    return max(losses) - 0.5 * (losses[0] + losses[-1])
