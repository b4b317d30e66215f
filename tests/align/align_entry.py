"""Entry points for the `merge align` CLI tests (`tests/align/align_entry.py:make_model` ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from merge.toy import batches, make_mlp, synthetic_classification

KW = {"in_features": 16, "hidden": 128, "out_features": 4, "depth": 2}


def make_model() -> nn.Module:
    return make_mlp(**KW)


def make_deeper_model() -> nn.Module:
    return make_mlp(**{**KW, "depth": 3})


def make_narrow_model() -> nn.Module:
    return make_mlp(**{**KW, "hidden": 64})


def make_data() -> list[tuple[Tensor, Tensor]]:
    X, y = synthetic_classification(0, 512, in_features=16, num_classes=4)
    return batches(X, y, 128)


class DataDependent(nn.Module):
    """A branch on tensor values: neither torch.fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l1(x))
        if h.sum() > 0:
            h = h * 2
        return self.l2(h)


def make_untraceable() -> nn.Module:
    return DataDependent()


def two_batches():  # type: ignore[no-untyped-def]
    """A one-shot generator of two batches (what a streaming loader hands over)."""
    yield from make_data()[:2]


def make_tiny_llama() -> nn.Module:
    """A tiny transformers Llama, for `merge align` on Hugging Face folders."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()
