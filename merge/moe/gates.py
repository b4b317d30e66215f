"""Router initialisation for an MoE built from dense experts: the math, as mergekit-moe defines it.

Every mode gives a tensor of gate vectors of shape (layers, gates, hidden); row g of layer l is
the router weight of expert g there (logit_g = h · row_g).

- `random`: standard normal entries; `uniform_random`: U(-1/√hidden, 1/√hidden), the default
  initialisation of `nn.Linear(hidden, experts)`. Drawn in one call from a generator seeded by
  `seed`, so `--random-seed s` equals mergekit's `--random-seed s`.
- `cheap_embed`: the sum of the base's token embeddings over every non-padding token of every
  prompt, normalised; the same vector in every layer.
- `hidden`/`hidden_last`: per layer, the hidden state entering that layer at each prompt's last
  token, averaged over the prompts; `hidden_avg`: averaged over every position (mergekit counts
  the left padding too). Not normalised before the negative prompts are subtracted.

Then, per gate: the positive prompts' vector minus the negative prompts' (when given), scaled
to unit L2 norm per layer (norms under 1e-8 are clamped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_FLOOR = 1e-8  # mergekit's clamp: a zero difference stays zero instead of dividing by 0


def random_gates(num_layers: int, num_gates: int, hidden: int, seed: int) -> Tensor:
    """N(0, 1) gate vectors, (layers, gates, hidden), from one seeded draw."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_layers, num_gates, hidden), generator=g)


def uniform_gates(num_layers: int, num_gates: int, hidden: int, seed: int) -> Tensor:
    """U(-1/√hidden, 1/√hidden) gate vectors (nn.Linear's default), from one seeded draw."""
    scale = math.sqrt(1.0 / hidden)
    g = torch.Generator().manual_seed(seed)
    return torch.rand((num_layers, num_gates, hidden), generator=g) * 2 * scale - scale


def cheap_embed_vector(embedded: Tensor, mask: Tensor) -> Tensor:
    """Σ over prompts and non-padding tokens of the token embeddings, normalised: (hidden,).

    Args:
        embedded: (prompts, tokens, hidden) float32 embedding rows of the tokenised prompts.
        mask: (prompts, tokens) attention mask, 1 on real tokens.
    """
    total = (embedded * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0)  # (hidden,)
    return total / total.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def prompt_summary(hidden: Tensor, *, average: bool) -> Tensor:
    """One layer's (prompts, tokens, hidden) states -> (hidden,): the mean over prompts of the
    last token's state, or with `average` of the mean over every position."""
    if average:
        per_prompt = hidden.sum(dim=1) / hidden.shape[1]  # (prompts, hidden)
    else:
        per_prompt = hidden[:, -1, :]  # left padding puts every prompt's last token here
    return per_prompt.sum(dim=0) / per_prompt.shape[0]


def gate_direction(positive: Tensor, negative: Tensor | None) -> Tensor:
    """(layers, hidden): positive − negative, each layer's row scaled to unit L2 norm."""
    v = positive - negative if negative is not None else positive
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def condition_numbers(gates: Tensor) -> list[float]:
    """Per layer, the condition number of its (gates, hidden) matrix: large when rows are nearly
    parallel, i.e. prompts too similar to route apart."""
    return [float(torch.linalg.cond(gates[i].float())) for i in range(gates.shape[0])]
