"""BatchNorm statistics reset and REPAIR on in-memory modules."""

from __future__ import annotations

import copy

import pytest
import torch
from align_helpers import MLP_KW, TrainedPair, randomize_norms
from torch import nn

from merge.align import align_state_dicts, repair, reset_batchnorm
from merge.align.repair import repair_points
from merge.errors import MergeWarning
from merge.toy import evaluate_loss, make_mlp, make_resnet, make_vgg, synthetic_images


def test_reset_batchnorm_recomputes_the_average_statistics() -> None:
    model = randomize_norms(make_vgg(seed=0))
    model.train()
    model.features[1].momentum = 0.3
    data = [(x, None) for x in synthetic_images(0, 96)[0].split(32)]
    inputs: list[torch.Tensor] = []
    hook = model.features[1].register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    reset_batchnorm(model, data)
    hook.remove()
    bn = model.features[1]
    mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(
        0
    )  # BatchNorm's running_var
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and model.training and bn.training  # restored
    assert int(bn.num_batches_tracked) == 3


def test_reset_batchnorm_honours_num_batches_and_leaves_other_models_alone() -> None:
    model = make_resnet(8, seed=0).eval()
    data = [(x, None) for x in synthetic_images(0, 64)[0].split(16)]
    reset_batchnorm(model, data, num_batches=2)
    assert int(model.bn1.num_batches_tracked) == 2 and not model.training
    plain = make_mlp(**MLP_KW, seed=0)
    before = copy.deepcopy(plain.state_dict())
    reset_batchnorm(plain, data)  # no BatchNorm: nothing to do, data never touched
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def _interpolate(a: nn.Module, b_state: dict, alpha: float) -> nn.Module:
    model = copy.deepcopy(a)
    sa = a.state_dict()
    model.load_state_dict(
        {
            k: (1 - alpha) * sa[k] + alpha * b_state[k] if v.is_floating_point() else v
            for k, v in sa.items()
        }
    )
    return model


def _channel_stats(
    model: nn.Module, name: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out: list[torch.Tensor] = []
    mod = dict(model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    y = (
        out[0]
        .movedim(-1 if isinstance(mod, nn.Linear) else 1, -1)
        .reshape(-1, out[0].shape[-1 if isinstance(mod, nn.Linear) else 1])
    )
    return y.mean(0), y.std(0, unbiased=False)


def test_repair_matches_the_interpolated_endpoint_statistics(mlp_pair: TrainedPair) -> None:
    sa, sb = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    aligned, _ = align_state_dicts(make_mlp(**MLP_KW), sa, sb)
    model_b = copy.deepcopy(mlp_pair.a)
    model_b.load_state_dict(aligned)
    x = torch.cat([b[0] for b in mlp_pair.data])
    data = [(x, None)]  # one batch: batch statistics are the statistics
    alpha = 0.5
    mid = _interpolate(mlp_pair.a, aligned, alpha)
    loss_before = evaluate_loss(mid, mlp_pair.data)[0]
    repair(mid, mlp_pair.a, model_b, alpha, data)
    assert repair_points(mid) == ["layers.0", "layers.1"]  # the output layer is left alone
    for name in repair_points(mid):
        ma, sa_ = _channel_stats(mlp_pair.a, name, x)
        mb, sb_ = _channel_stats(model_b, name, x)
        m, s = _channel_stats(mid, name, x)
        torch.testing.assert_close(m, (1 - alpha) * ma + alpha * mb, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(s, (1 - alpha) * sa_ + alpha * sb_, rtol=1e-3, atol=1e-3)
    assert evaluate_loss(mid, mlp_pair.data)[0] <= loss_before


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_repair_at_an_endpoint_changes_nothing(mlp_pair: TrainedPair, alpha: float) -> None:
    end = mlp_pair.a if alpha == 0 else mlp_pair.b
    model = copy.deepcopy(end)
    data = [(torch.cat([b[0] for b in mlp_pair.data]), None)]
    repair(model, mlp_pair.a, mlp_pair.b, alpha, data)
    x = data[0][0][:64]
    torch.testing.assert_close(model(x), end(x), rtol=1e-4, atol=1e-4)


def test_repair_corrects_batchnorm_layers() -> None:
    a, b = randomize_norms(make_resnet(8, seed=0), 1), randomize_norms(make_resnet(8, seed=1), 2)
    x = synthetic_images(0, 64)[0]
    mid = _interpolate(a, b.state_dict(), 0.5)
    points = repair_points(mid)
    assert "bn1" in points and "layer2.0.shortcut.1" in points and "fc" not in points
    repair(mid, a, b, 0.5, [(x, None)])
    m, s = _channel_stats(mid, "layer3.0.bn2", x)
    ma, sa = _channel_stats(a, "layer3.0.bn2", x)
    mb, sb = _channel_stats(b, "layer3.0.bn2", x)
    torch.testing.assert_close(s, (sa + sb) / 2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m, (ma + mb) / 2, rtol=1e-3, atol=1e-3)


class HeadFirst(nn.Module):
    """A classifier head registered before the body: registration order is not execution order."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_repair_leaves_the_head_that_runs_last_alone() -> None:
    a, b = HeadFirst(0).eval(), HeadFirst(1).eval()
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    data = [(x, None)]
    assert repair_points(a, data) == [
        "body.0",
        "body.2",
    ]  # was ["head", "body.0"]: body.2 last registered
    mid = _interpolate(a, b.state_dict(), 0.5)
    head_before = mid.head.weight.clone()
    repair(mid, a, b, 0.5, data)
    assert torch.equal(mid.head.weight, head_before)
    _, s = _channel_stats(mid, "body.2", x)
    _, sa = _channel_stats(a, "body.2", x)
    _, sb = _channel_stats(b, "body.2", x)
    torch.testing.assert_close(s, (sa + sb) / 2, rtol=1e-3, atol=1e-3)


class NoBias(nn.Module):
    """LayerNorm and bias-free Linears (Llama-style): nothing for REPAIR to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16, bias=False)
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.out = nn.Linear(16, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.up(x)))


def test_repair_says_when_it_has_nothing_to_correct() -> None:
    model = NoBias()
    with pytest.warns(MergeWarning, match="REPAIR has nothing to correct in this model"):
        repair(model, NoBias(), NoBias(), 0.5, [(torch.randn(8, 6), None)])


def test_repair_moves_batches_to_the_models_device() -> None:
    # A model on the meta device cannot take CPU inputs: the batch must follow the model.
    model = HeadFirst(0).to("meta")
    assert repair_points(model, [(torch.randn(4, 6), None)]) == ["body.0", "body.2"]
