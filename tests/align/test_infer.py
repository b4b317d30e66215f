"""Spec inference from torch.fx / torch.export: the groups hand-written specs would give, and more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from align_helpers import MLP_KW, randomize_norms, toy_cases
from torch import Tensor, nn

from merge.align import PermutationSpec, infer_spec, load_spec, verify_spec
from merge.toy import make_mlp, make_resnet, make_transformer, make_vgg

Groups = set[frozenset[tuple[str, int]]]


def groups_of(spec: PermutationSpec) -> Groups:
    return {frozenset((m.tensor, m.axis) for m in g.members) for g in spec.groups.values()}


def mlp_permutation_spec(depth: int) -> Groups:
    """Git Re-Basin's `mlp_permutation_spec`, with PyTorch's (out, in) weight layout."""
    return {
        frozenset(
            {(f"layers.{i}.weight", 0), (f"layers.{i}.bias", 0), (f"layers.{i + 1}.weight", 1)}
        )
        for i in range(depth)
    }


def resnet_permutation_spec(blocks: int) -> Groups:
    """Git Re-Basin's `resnet20_permutation_spec` for our ResNet (BatchNorm instead of LayerNorm,
    so every norm also carries its running statistics): one permutation per stage's residual
    stream, one per block for the hidden channels."""

    def norm(name: str) -> set[tuple[str, int]]:
        return {(f"{name}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")}

    stream: set[tuple[str, int]] = {("conv1.weight", 0)} | norm("bn1")
    out: Groups = set()
    for s in (1, 2, 3):
        for b in range(blocks):
            blk = f"layer{s}.{b}"
            inner = {(f"{blk}.conv1.weight", 0), (f"{blk}.conv2.weight", 1)} | norm(f"{blk}.bn1")
            out.add(frozenset(inner))
            if b == 0 and s > 1:  # shortcut conv: the block maps the previous stream to a new one
                stream |= {(f"{blk}.conv1.weight", 1), (f"{blk}.shortcut.0.weight", 1)}
                out.add(frozenset(stream))
                stream = {(f"{blk}.shortcut.0.weight", 0)} | norm(f"{blk}.shortcut.1")
            else:
                stream.add((f"{blk}.conv1.weight", 1))
            stream |= {(f"{blk}.conv2.weight", 0)} | norm(f"{blk}.bn2")
    stream.add(("fc.weight", 1))
    out.add(frozenset(stream))
    return out


def test_mlp_spec_equals_git_rebasin() -> None:
    for depth in (1, 3):
        model = make_mlp(**{**MLP_KW, "depth": depth})
        assert groups_of(infer_spec(model)) == mlp_permutation_spec(depth)


def test_resnet_spec_equals_git_rebasin() -> None:
    spec = infer_spec(make_resnet(14, seed=0), torch.randn(2, 3, 8, 8))
    assert groups_of(spec) == resnet_permutation_spec(2)
    assert spec.source == "inferred by torch.fx"


def test_vgg_flatten_into_linear_is_a_block_layout() -> None:
    spec = infer_spec(make_vgg(seed=0), torch.randn(2, 3, 8, 8))  # (B, 32, 2, 2) flattened
    [last_conv] = [
        g
        for g in spec.groups.values()
        if ("features.7.weight", 0) in {(m.tensor, m.axis) for m in g.members}
    ]
    [fc_in] = [m for m in last_conv.members if m.tensor == "classifier.0.weight"]
    assert (fc_in.axis, fc_in.block, fc_in.offset) == (1, 4, 0)
    assert last_conv.size == 32


def test_transformer_residual_stream_tied_embedding_and_fixed_heads() -> None:
    spec = infer_spec(make_transformer(n_layers=2, seed=0))
    groups = groups_of(spec)
    stream = next(g for g in groups if ("wte.weight", 1) in g)
    assert {
        ("lm_head.weight", 1),
        ("wpe", 1),
        ("ln_f.weight", 0),
        ("blocks.1.attn.o.weight", 0),
    } <= stream
    assert {
        ("blocks.0.attn.q.weight", 1),
        ("blocks.1.mlp.fc2.bias", 0),
        ("blocks.0.ln2.bias", 0),
    } <= stream
    for i in range(2):
        hidden = frozenset(
            {
                (f"blocks.{i}.mlp.fc1.weight", 0),
                (f"blocks.{i}.mlp.fc1.bias", 0),
                (f"blocks.{i}.mlp.fc2.weight", 1),
            }
        )
        assert hidden in groups
    assert len(groups) == 3
    fixed = {(f.tensor, f.axis): f.reason for f in spec.fixed}
    assert "attention heads are not permuted" in fixed[("blocks.0.attn.q.weight", 0)]
    assert "reaches the model output" in fixed[("lm_head.weight", 0)]
    assert "reaches the model output" in fixed[("wte.weight", 0)]  # tied: one tensor, one reason


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "transformer"])
def test_every_inferred_group_is_a_symmetry_and_breaking_it_is_seen(name: str) -> None:
    model, x = toy_cases()[name]
    spec = infer_spec(model, x)
    report = verify_spec(model, spec, ((x,), {}))
    assert report.dtype == "float64"
    assert max(report.max_change) < 1e-12
    assert set(report.broken_change) == set(spec.groups)
    assert min(report.broken_change.values()) > 1e-3


def test_show_spec_lists_members_sizes_and_reasons() -> None:
    text = infer_spec(make_resnet(8, seed=0), torch.randn(2, 3, 8, 8)).format()
    assert "permutation spec (inferred by torch.fx): 6 groups" in text
    assert "P_conv1  size 16, 13 members" in text
    assert "bn1.running_mean[axis 0]  (statistic: permuted, not matched)" in text
    assert "reaches the model output (output order is part of the function):" in text
    assert "spatial axis of a convolution kernel" in text


def test_spec_round_trips_through_yaml_and_json(tmp_path: Path) -> None:
    spec = infer_spec(make_vgg(seed=0), torch.randn(2, 3, 8, 8))
    for suffix in (".yaml", ".json"):
        spec.save(tmp_path / f"spec{suffix}")
        loaded = load_spec(tmp_path / f"spec{suffix}")
        assert loaded.to_dict() == spec.to_dict()
        assert groups_of(loaded) == groups_of(spec)


# -- individual rules ------------------------------------------------------------------------


class Concat(nn.Module):
    """Two branches concatenated along channels, then a 1x1 conv: segments with offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(10, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)).mean((2, 3))


class Depthwise(nn.Module):
    """Pointwise -> depthwise -> GroupNorm(1, C) -> pointwise: the depthwise conv keeps the group."""

    def __init__(self, gn_groups: int = 1) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(gn_groups, 8)
        self.pw2 = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.gn(F.silu(self.dw(self.pw1(x))))).flatten(1)


class Functional(nn.Module):
    """Raw parameters through F.linear, a SwiGLU gate (mul unions gate and up), RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(12, 6))
        self.gate = nn.Linear(12, 16, bias=False)
        self.up = nn.Linear(12, 16, bias=False)
        self.down = nn.Linear(16, 12, bias=False)
        self.norm = nn.RMSNorm(12)
        self.head = nn.Parameter(torch.randn(3, 12))

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.w_in)
        h = h + self.down(F.silu(self.gate(h)) * self.up(h))
        return F.linear(self.norm(h), self.head)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h + a)


class ShapeBranch(nn.Module):
    """A Python branch on a shape: symbolic_trace cannot follow it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l1(x))
        if h.shape[0] > 1:
            h = h * 2
        return self.l2(h)


def _members(spec: PermutationSpec) -> list[list[tuple[str, int, int, int]]]:
    return sorted(
        sorted((m.tensor, m.axis, m.block, m.offset) for m in g.members)
        for g in spec.groups.values()
    )


def _verified(model: nn.Module, x: Tensor) -> PermutationSpec:
    spec = infer_spec(model, x)
    verify_spec(model.eval(), spec, ((x,), {}))
    return spec


def test_concatenation_gives_offset_segments() -> None:
    spec = _verified(Concat(), torch.randn(2, 3, 5, 5))
    assert _members(spec) == [
        [("a.bias", 0, 1, 0), ("a.weight", 0, 1, 0), ("mix.weight", 1, 1, 0)],
        [("b.bias", 0, 1, 0), ("b.weight", 0, 1, 0), ("mix.weight", 1, 1, 4)],
    ]


@pytest.mark.parametrize("gn_groups", [1, 8, 4])
def test_depthwise_conv_and_group_norm(gn_groups: int) -> None:
    spec = _verified(randomize_norms(Depthwise(gn_groups)), torch.randn(2, 3, 5, 5))
    [group] = spec.groups.values()
    assert {(m.tensor, m.axis) for m in group.members} == {
        ("pw1.weight", 0), ("pw1.bias", 0), ("dw.weight", 0), ("dw.bias", 0),
        ("gn.weight", 0), ("gn.bias", 0), ("pw2.weight", 1),
    }  # fmt: skip
    # GroupNorm(4, 8) normalises pairs of channels: only whole pairs move
    block = 2 if gn_groups == 4 else 1
    assert (group.size, {m.block for m in group.members}) == (8 // block, {block})


def test_functional_linear_swiglu_and_rmsnorm() -> None:
    spec = _verified(Functional(), torch.randn(4, 6))
    groups = groups_of(spec)
    assert (
        frozenset(
            {
                ("w_in", 0),
                ("gate.weight", 1),
                ("up.weight", 1),
                ("down.weight", 0),
                ("norm.weight", 0),
                ("head", 1),
            }
        )
        in groups
    )
    assert frozenset({("gate.weight", 0), ("up.weight", 0), ("down.weight", 1)}) in groups


def test_multihead_attention_keeps_heads_fixed() -> None:
    spec = _verified(Attention(), torch.randn(2, 7, 5))
    [stream] = spec.groups.values()
    names = {(m.tensor, m.axis) for m in stream.members}
    assert {
        ("emb.weight", 0),
        ("mha.in_proj_weight", 1),
        ("mha.out_proj.weight", 0),
        ("out.weight", 1),
    } <= names
    assert ("mha.in_proj_weight", 0) not in names


def test_torch_export_fallback_when_symbolic_trace_fails() -> None:
    spec = _verified(ShapeBranch(), torch.randn(3, 4))
    assert spec.source == "inferred by torch.export"
    assert groups_of(spec) == {frozenset({("l1.weight", 0), ("l1.bias", 0), ("l2.weight", 1)})}
