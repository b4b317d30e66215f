"""Tiny models and synthetic data for alignment, evaluation, demos and tests (fast on CPU).

    X, y = synthetic_classification(seed=0, n=2048)
    a = train(make_mlp(in_features=X.shape[1], seed=1), batches(X, y, 128), steps=300, lr=3e-3, seed=1)

Every factory takes an optional `seed` for its initialisation, so two models "trained from
different seeds" differ both in their starting point and in their batch order. State-dict names
are stable (tests and hand-written specs refer to them):

- MLP: `layers.{i}.weight|bias`, `depth` hidden layers, then the output layer `layers.{depth}`;
- VGG: `features.{i}` (Conv2d, BatchNorm2d, ReLU, MaxPool2d), `classifier.{i}` (Linear);
- ResNet: `conv1`, `bn1`, `layer{s}.{b}.conv1|bn1|conv2|bn2|shortcut.0|shortcut.1`, `fc`;
- Transformer: `wte`, `wpe`, `blocks.{i}.ln1|attn.q|attn.k|attn.v|attn.o|ln2|mlp.fc1|mlp.fc2`,
  `ln_f`, `lm_head` (its weight is `wte.weight`, tied).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge.threads import threads as intra_op_threads

Batch = tuple[Tensor, Tensor]


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run a block under `torch.manual_seed(seed)` without touching the caller's global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """`depth` hidden Linear+ReLU layers of width `hidden`, then a Linear to `out_features`."""

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int):
        super().__init__()
        widths = [in_features] + [hidden] * depth + [out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)  # type: ignore[no-any-return]


def make_mlp(
    in_features: int = 16,
    hidden: int = 128,
    out_features: int = 4,
    depth: int = 3,
    *,
    seed: int | None = None,
) -> nn.Module:
    """An MLP `in -> hidden x depth -> out` with ReLU (Git Re-Basin's MNIST MLP is 784-512x3-10)."""
    with _seeded(seed):
        return MLP(in_features, hidden, out_features, depth)


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stages with max-pooling, flattened (C·H·W, spatial > 1) into two Linears."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[Sequence[int]],
        num_classes: int,
        image_size: int,
        hidden: int,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for stage in widths:
            for w in stage:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C, H, W)
        return self.classifier(torch.flatten(x, 1))  # type: ignore[no-any-return]


def make_vgg(
    in_channels: int = 3,
    widths: Sequence[Sequence[int]] = ((16,), (32, 32)),
    num_classes: int = 4,
    *,
    image_size: int = 8,
    hidden: int = 64,
    width: int = 1,
    seed: int | None = None,
) -> nn.Module:
    """A VGG-style CNN with BatchNorm; `widths` lists conv widths per pooling stage (times `width`)."""
    scaled = [[w * width for w in stage] for stage in widths]
    with _seeded(seed):
        return VGG(in_channels, scaled, num_classes, image_size, hidden * width)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or conv1x1+BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3 stages of `blocks` BasicBlocks at 16w, 32w, 64w channels."""

    def __init__(self, blocks: int, width: int, num_classes: int, in_channels: int):
        super().__init__()
        c = 16 * width
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        stages = []
        for s, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            stride = 1 if s == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c, c_out, stride if b == 0 else 1))
                c = c_out
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        return self.fc(x)  # type: ignore[no-any-return]


def make_resnet(
    depth: int = 20,
    width: int = 1,
    num_classes: int = 4,
    in_channels: int = 3,
    *,
    seed: int | None = None,
) -> nn.Module:
    """ResNet-`depth` (depth = 6n+2: 8, 14, 20, ...) at width multiplier `width`, conv shortcuts."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
    with _seeded(seed):
        return ResNet((depth - 2) // 6, width, num_classes, in_channels)


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H = self.n_heads
        q = self.q(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, H, C // H).transpose(1, 2)
        v = self.v(x).view(B, T, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, C))  # type: ignore[no-any-return]


class MLPBlock(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model, mlp_ratio * d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A GPT-style pre-LayerNorm decoder with a learned position embedding and a tied LM head."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        max_len: int,
        mlp_ratio: int,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # type: ignore[no-any-return]


def make_transformer(
    vocab_size: int = 32,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 2,
    *,
    max_len: int = 16,
    mlp_ratio: int = 4,
    seed: int | None = None,
) -> nn.Module:
    """A small pre-LN transformer language model with tied input/output embeddings."""
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    with _seeded(seed):
        return Transformer(vocab_size, d_model, n_heads, n_layers, max_len, mlp_ratio)


# ---------------------------------------------------------------------------------------------
# Data


def synthetic_classification(
    seed: int,
    n: int,
    in_features: int = 16,
    num_classes: int = 4,
    *,
    clusters_per_class: int = 8,
    noise: float = 0.6,
) -> tuple[Tensor, Tensor]:
    """Points around `clusters_per_class` random centres per class in `in_features` dims.

    A non-linear task (each class is a union of scattered clusters) that a small MLP fits well
    but not trivially: MLPs trained from different seeds find different solutions, and the
    naive linear path between them climbs a clear loss barrier. The centres depend only on
    `seed`, so two calls with the same seed and different `n` sample the same task.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes * clusters_per_class, in_features, generator=g) * 1.5
    labels = torch.arange(num_classes).repeat_interleave(clusters_per_class)
    pick = torch.randint(0, len(centres), (n,), generator=g)
    X = centres[pick] + noise * torch.randn(n, in_features, generator=g)
    return X, labels[pick]


def synthetic_images(
    seed: int,
    n: int,
    num_classes: int = 4,
    *,
    channels: int = 3,
    size: int = 8,
    noise: float = 0.8,
) -> tuple[Tensor, Tensor]:
    """`(n, channels, size, size)` images: a class prototype pattern, randomly shifted, plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, 2, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    variant = torch.randint(0, 2, (n,), generator=g)
    X = protos[y, variant]
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    X = torch.stack([torch.roll(x, (int(s[0]), int(s[1])), dims=(1, 2)) for x, s in zip(X, shifts)])
    return X + noise * torch.randn(X.shape, generator=g), y


def synthetic_tokens(
    seed: int, n: int, seq_len: int = 16, vocab_size: int = 32
) -> tuple[Tensor, Tensor]:
    """Next-token data `(inputs, targets)`, each `(n, seq_len)`, from a random sparse Markov chain."""
    g = torch.Generator().manual_seed(seed)
    # each token has 3 likely successors: learnable, but not deterministic
    succ = torch.randint(0, vocab_size, (vocab_size, 3), generator=g)
    seq = torch.empty(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab_size, (n,), generator=g)
    for t in range(seq_len):
        choice = torch.randint(0, 3, (n,), generator=g)
        seq[:, t + 1] = succ[seq[:, t], choice]
    return seq[:, :-1], seq[:, 1:]


def synthetic_tasks(
    seed: int, n: int, tasks: int = 4, num_classes: int = 4, block: int = 8
) -> tuple[Tensor, Tensor]:
    """Inputs `(n, tasks·block)` and labels `(n, tasks)`: label t is the argmax of a fixed random
    linear teacher on feature block t, so each task reads only its own block of the input.

    The teachers are the same for every `seed` (which draws only the inputs), so train, test
    and validation sets from different seeds sample the same tasks.
    """
    teachers = torch.randn(tasks, num_classes, block, generator=torch.Generator().manual_seed(1234))
    X = torch.randn(n, tasks * block, generator=torch.Generator().manual_seed(seed))
    y = torch.einsum("tcb,ntb->ntc", teachers, X.view(n, tasks, block)).argmax(-1)  # (n, tasks)
    return X, y


def batches(X: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    """Split `(X, y)` into consecutive `(x, y)` batches (the last one may be smaller)."""
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy; outputs `(B, ..., C)` with targets `(B, ...)` (LMs) are flattened."""
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def train(
    model: nn.Module,
    batches: Sequence[Batch],
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
    *,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = classification_loss,
    weight_decay: float = 0.0,
    threads: int | None = 1,
) -> nn.Module:
    """Adam on `batches` (shuffled each epoch under `seed`) for `steps` steps, cosine decay; in place.

    Deterministic under `seed` on CPU: the batch order comes from its own generator and the
    global RNG (dropout, if any) is seeded inside a forked RNG state. Runs on `threads` intra-op
    threads (None: torch's setting), then restores the previous count.
    """
    if not batches:
        raise ValueError("train() needs at least one batch")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with _seeded(seed), intra_op_threads(threads):
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            loss = loss_fn(model, batches[order.pop()])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `batches`, weighted by batch size, in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        out = model(x)
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        total += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        count += y.numel()
    model.train(was_training)
    return total / count, correct / count


__all__ = [
    "MLP",
    "VGG",
    "ResNet",
    "Transformer",
    "batches",
    "classification_loss",
    "evaluate_loss",
    "make_mlp",
    "make_resnet",
    "make_transformer",
    "make_vgg",
    "synthetic_classification",
    "synthetic_images",
    "synthetic_tasks",
    "synthetic_tokens",
    "train",
]
