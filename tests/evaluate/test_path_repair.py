"""`merge path --repair` on a net REPAIR cannot correct: a note, no +repair curve."""

from __future__ import annotations

import torch
from torch import nn

from merge.evaluate import interpolation_path


class NoBiasNet(nn.Module):
    """LayerNorm and bias-free Linears: REPAIR has nothing to fold its correction into."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.up(x))))


def test_path_repair_on_a_net_without_biases_says_so() -> None:
    torch.manual_seed(0)
    a, b = NoBiasNet().state_dict(), NoBiasNet().state_dict()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))]
    r = interpolation_path(NoBiasNet, a, b, data=data, steps=3, repair=True)
    assert [c.name for c in r.curves] == ["naive"]  # was also `naive+repair`, equal to `naive`
    assert any(n.startswith("--repair: REPAIR has nothing to correct") for n in r.notes)
