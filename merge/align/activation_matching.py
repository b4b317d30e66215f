"""Activation matching: per group, match B's units to A's by the correlation of their activations.

For every group, the probes are the traced values whose feature axis carries the group (hidden
pre- and post-activations; every point of a residual stream, as Verma & Elbayad's `all`). Over
the data, with activations flattened over batch, positions and block entries:

    corr[i, j] = Cov(a_i, b_j) / (σ(a_i) σ(b_j) + eps)      (Pearson, as in REPAIR and ZipIt)
    perm = linear_sum_assignment(Σ_probes corr, maximize=True)

One LAP per group, no coordinate descent: B's activations do not depend on B's permutation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from merge.align.infer import inferred_graph
from merge.align.permute import Perms, identity_perms
from merge.align.spec import PermutationSpec
from merge.align.trace import Args, canonical_names, first_batch, replayable, split_batch
from merge.align.weight_matching import GroupResult, MatchReport, _check_pair
from merge.errors import UsageError

EPS = 1e-8


class _Recorder(fx.Interpreter):
    """Runs a traced graph and hands the values of the probed nodes to a callback."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


class _Moments:
    """Running first and second moments of paired activations (n units each), in float64."""

    def __init__(self, n: int):
        self.count = 0
        self.sa = torch.zeros(n, dtype=torch.float64)
        self.sb = torch.zeros(n, dtype=torch.float64)
        self.saa = torch.zeros(n, dtype=torch.float64)
        self.sbb = torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: Tensor, b: Tensor) -> None:  # (samples, n) each
        a, b = a.double(), b.double()
        if a.device != self.sab.device:  # the sums live beside the activations
            for k in ("sa", "sb", "saa", "sbb", "sab"):
                setattr(self, k, getattr(self, k).to(a.device))
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> Tensor:
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        sa = (self.saa / n - ma**2).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb**2).clamp_min(0).sqrt()
        return cov / (sa[:, None] * sb[None, :] + EPS)


def _units(x: Tensor, axis: int, n: int, block: int) -> Tensor:
    """Activations with the group's units last: (samples, n), block entries counted as samples."""
    x = x.movedim(axis, -1)  # (..., n*block)
    x = x.reshape(-1, n, block).transpose(1, 2)  # (samples, block, n)
    return x.reshape(-1, n)


def _load(gm: fx.GraphModule, model: nn.Module, state: Mapping[str, Tensor]) -> fx.GraphModule:
    gm = copy.deepcopy(gm)
    canon = canonical_names(model)
    by_canon = {canon.get(k, k): v for k, v in state.items()}
    own = gm.state_dict()
    missing = [k for k in own if canon.get(k, k) not in by_canon]
    if missing:
        raise UsageError(f"activation matching: the checkpoint lacks {', '.join(missing[:5])}")
    gm.load_state_dict({k: by_canon[canon.get(k, k)] for k in own}, strict=False)
    return gm.eval()


def route_probes(
    spec: PermutationSpec, inferred: PermutationSpec
) -> tuple[dict[str, list[tuple[str, int, int]]], list[str]]:
    """Which traced activations feed each group of `spec`, and notes on those that feed none.

    A traced group's activations go to the spec group that holds its members: the same tensor,
    axis *and* offset (two branches of a concatenation share a tensor axis at different offsets),
    and every member that the spec names must name the same group.
    """
    owner = {
        (m.tensor, m.axis, m.offset): name for name, g in spec.groups.items() for m in g.members
    }
    probes: dict[str, list[tuple[str, int, int]]] = {}
    notes = []
    for name, plist in inferred.probes.items():
        g = inferred.groups[name]
        targets = sorted(
            {owner[k] for m in g.members if (k := (m.tensor, m.axis, m.offset)) in owner}
        )
        if len(targets) > 1:
            notes.append(
                f"traced group `{name}` spans the spec's groups {', '.join(targets)}; "
                "its activations are not used"
            )
        elif targets and spec.groups[targets[0]].size == g.size:
            probes.setdefault(targets[0], []).extend(plist)
    return probes, notes


def activation_matching(
    model: nn.Module,
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[Perms, MatchReport]:
    """Permutations of B's units that best correlate with A's activations on `data`.

    `data` yields batches as `(inputs, targets)`, tensors or dicts of keyword inputs. Groups of a
    hand-written spec are matched to the traced graph by their members; groups with no probe
    stay the identity (listed in the report's notes).
    """
    _check_pair(spec, state_a, state_b)
    start = time.perf_counter()
    data = replayable(data)  # tracing looks at the first batch; the pass below still sees it
    args0 = first_batch(data)
    traced, inferred = inferred_graph(model, args0)
    probes, notes = route_probes(spec, inferred)
    wanted = {node for plist in probes.values() for node, _, _ in plist}
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gm_a, gm_b = (_load(traced.gm, model, s).to(dev) for s in (state_a, state_b))
    moments = {
        (g, node): _Moments(spec.groups[g].size)
        for g, plist in probes.items()
        for node, _, _ in plist
    }

    def flat(args: Args) -> list[Any]:
        return tree_leaves((args[0], args[1])) if traced.tracer == "torch.export" else list(args[0])

    batches = 0
    with torch.no_grad():
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            inputs = [x.to(dev) if isinstance(x, Tensor) else x for x in flat(split_batch(batch))]
            rec_a, rec_b = _Recorder(gm_a, wanted), _Recorder(gm_b, wanted)
            rec_a.run(*inputs, enable_io_processing=traced.tracer != "torch.export")
            rec_b.run(*inputs, enable_io_processing=traced.tracer != "torch.export")
            for group, plist in probes.items():
                n = spec.groups[group].size
                for node, axis, block in plist:
                    moments[(group, node)].add(
                        _units(rec_a.values[node], axis, n, block),
                        _units(rec_b.values[node], axis, n, block),
                    )
            batches += 1
    if batches == 0:
        raise UsageError(
            "activation matching saw no batch: the data (--data) yielded nothing"
            + (f" within max_batches={max_batches}" if max_batches is not None else "")
        )
    perms = identity_perms(spec)
    groups: dict[str, GroupResult] = {}
    total_before = total_after = 0.0
    for name, g in spec.groups.items():
        plist = probes.get(name, [])
        if not plist:
            notes.append(f"group `{name}`: no traced activation carries it; left as the identity")
            groups[name] = GroupResult(g.size, len(g.members), 0.0, 0.0, 0)
            continue
        C = (
            (torch.stack([moments[(name, node)].correlation() for node, _, _ in plist]).mean(0))
            .cpu()
            .numpy()
        )
        _, cols = linear_sum_assignment(C, maximize=True)
        idx = np.arange(g.size)
        before, after = float(np.trace(C)) / g.size, float(C[idx, cols].sum()) / g.size
        if after > before + 1e-12:
            perms[name] = cols
        else:
            after = before
        total_before += before
        total_after += after
        groups[name] = GroupResult(
            g.size, len(g.members), before, after, int((perms[name] != idx).sum())
        )
    report = MatchReport(
        method="activation",
        seed=0,
        objective_before=total_before,
        objective_after=total_after,
        groups=groups,
        seconds=time.perf_counter() - start,
        notes=notes,
        extra={
            "batches": batches,
            "objective": "mean Pearson correlation of matched units, summed over groups",
        },
    )
    return perms, report
