"""Infer a permutation spec from a traced graph (reference §11.2).

The model is traced (`merge.align.trace`: torch.fx, torch.export as fallback); `_walk` visits
the graph once, giving each node's value its state by the rule `merge.align.ops` names for the
op (the rules themselves are `merge.align.propagate`'s, over the permutation variables of
`merge.align.union_find`); `_spec` then turns every parameter axis's uses into permutation
groups and fixed axes, each fixed axis with its reason (`--show-spec`). Everything reaching the
model output is fixed: output order is part of the function.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from merge.align.ops import call_function, call_module
from merge.align.propagate import Feat, Inference
from merge.align.spec import FixedAxis, Group, Member, PermutationSpec
from merge.align.trace import Args, Traced, first_batch, guess_example, trace
from merge.align.union_find import FIXED


def infer_spec(
    model: nn.Module, example_input: Any = None, *, data: Any = None, heads: bool = False
) -> PermutationSpec:
    """Infer the permutation groups of `model` from a torch.fx trace (torch.export as fallback).

    Args:
        example_input: what the model is called with: a tensor, a tuple of positional inputs,
            or a dict of keyword inputs. Without it, the first batch of `data` is used, or an
            input is guessed from the first layer (Linear, Embedding or Conv).
        heads: also permute attention heads (whole heads; query, key, value and the output
            projection's input together; a KV head with its block of query heads under grouped
            -query attention). Dimensions within a head are never permuted, so RoPE is safe.
    """
    return _spec(_infer(model, example_args(model, example_input, data), heads))


def example_args(model: nn.Module, example_input: Any, data: Any) -> Args:
    if example_input is not None:
        if isinstance(example_input, dict):
            return (), dict(example_input)
        return (
            tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
        ), {}
    if data is not None:
        return first_batch(data)
    return guess_example(model)


def _infer(model: nn.Module, args: Args, heads: bool = False) -> Inference:
    inf = Inference(model, trace(model, args), heads)
    _walk(inf)
    return inf


def inferred_graph(model: nn.Module, args: Args) -> tuple[Traced, PermutationSpec]:
    """The traced graph and its spec (with `probes` naming graph nodes), for activation matching."""
    inf = _infer(model, args, heads=True)
    return inf.traced, _spec(inf)


def _walk(inf: Inference) -> None:
    """Give every node of the graph its state, in order."""
    for node in inf.gm.graph.nodes:
        inf.node = node
        if node.op == "placeholder":
            inf.env[node] = None
        elif node.op == "get_attr":  # a parameter or buffer (None for other attributes)
            inf.env[node] = inf.pref("", str(node.target))
        elif node.op == "output":
            for a in inf.args_of(node):
                inf.fix(
                    inf.state(a), "reaches the model output (output order is part of the function)"
                )
        elif node.op == "call_module":
            inf.env[node] = call_module(inf, node)
        else:
            inf.env[node] = call_function(inf, node)


def _spec(inf: Inference) -> PermutationSpec:
    """Every parameter axis's uses resolved into permutation groups and fixed axes (with reasons)."""
    uf = inf.uf
    for (tensor, axis), uses in inf.uses.items():
        layouts = [u[0] for u in uses if isinstance(u, tuple)]
        reasons = [u for u in uses if isinstance(u, str)]
        if reasons and layouts:
            for segs in layouts:
                for s in segs:
                    uf.fix(s.var, reasons[0] or f"`{tensor}` axis {axis} is also used unpermuted")
        for segs in layouts[1:]:
            if not inf.union_segs(layouts[0], segs):
                for s in list(layouts[0]) + list(segs):
                    uf.fix(s.var, f"`{tensor}` axis {axis} is used with two different layouts")
    uf.settle()
    aliases: dict[str, list[str]] = {}
    for name, canon in inf.canon.items():
        aliases.setdefault(canon, []).append(name)
    members: dict[int, list[Member]] = {}
    fixed: list[FixedAxis] = []
    order = {name: i for i, name in enumerate(inf.canon)}
    for (tensor, axis), uses in sorted(
        inf.uses.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
    ):
        layouts = [u[0] for u in uses if isinstance(u, tuple)]
        reasons = [u for u in uses if isinstance(u, str) and u]
        if inf.model_tensors[tensor].shape[axis] == 1:
            continue
        if not layouts:
            for alias in aliases[tensor]:
                fixed.append(FixedAxis(alias, axis, reasons[0] if reasons else "not permuted"))
            continue
        offset = 0
        for s in layouts[0]:  # segments of a concatenation are permuted (or not) one by one
            root, k = uf.resolve(s.var)
            span = s.size * s.block
            where = f" (entries {offset}-{offset + span - 1})" if len(layouts[0]) > 1 else ""
            for alias in aliases[tensor]:
                if root != FIXED:
                    members.setdefault(root, []).append(Member(alias, axis, s.block * k, offset))
                else:
                    why = uf.reason.get(s.var, "shares a permutation with a fixed axis")
                    fixed.append(FixedAxis(alias, axis, why + where))
            offset += span
    seen_canon = {t for t, _ in inf.uses}
    for name, t in inf.model_tensors.items():
        if inf.canon[name] not in seen_canon and t.dim() > 0 and t.is_floating_point():
            for axis in range(t.dim()):
                if t.shape[axis] > 1:
                    fixed.append(FixedAxis(name, axis, "not used by the traced forward pass"))
    groups: dict[str, Group] = {}
    root_names: dict[int, str] = {}
    for root in sorted(members):
        label = f"P_{uf.labels[root]}"
        name, i = label, 1
        while name in groups:
            i += 1
            name = f"{label}#{i}"
        groups[name] = Group(name, uf.sizes[root], members[root])
        root_names[root] = name
    probes: dict[str, list[tuple[str, int, int]]] = {}
    for node, st in inf.env.items():
        if isinstance(st, Feat) and len(st.segs) == 1:
            r, k = uf.resolve(st.segs[0].var)
            if r in root_names:
                probes.setdefault(root_names[r], []).append(
                    (node.name, st.axis, st.segs[0].block * k)
                )
    buffers = frozenset(n for n, _ in inf.model.named_buffers())
    return PermutationSpec(
        groups, fixed, buffers, source=f"inferred by {inf.traced.tracer}", probes=probes
    )
