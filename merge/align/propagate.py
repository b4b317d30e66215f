"""How a permuted feature axis travels through one op: the transfer rules of spec inference.

Every traced value carries at most one *feature axis* (`Feat`), laid out as segments of
permutation variables (a concatenation gives several; a flatten of (C, H, W) gives block H·W),
or is (a view of) a parameter (`PRef`). Each rule here takes its operands' states and returns
the result's: it passes the feature through (elementwise ops, norms, pooling, softmax, reshapes
that keep the axis), creates a new variable (the output axis of Linear, Conv, Embedding), or
unites variables (residual adds, q·k contractions, tied weights). Each use of a parameter binds
*every* one of its axes (`bind`), either to a variable or to FIXED, so an axis is only permuted
when all its uses agree. Anything not known to be permutation-equivariant is FIXED, with the
reason kept for `--show-spec`.

Which rule an op gets is `merge.align.ops`'s table; the walk over the graph and the spec it
yields are `merge.align.infer`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from merge.align.trace import Traced, canonical_names
from merge.align.union_find import FIXED, UnionFind

KERNEL_AXES = {d: "spatial axis of a convolution kernel" for d in (2, 3, 4)}


@dataclass(frozen=True)
class Seg:
    """`size` units of permutation variable `var`, each unit `block` consecutive entries."""

    var: int
    size: int
    block: int = 1


@dataclass(frozen=True)
class Feat:
    """A value whose axis `axis` is the concatenation of `segs` (entry offset + c*block + s)."""

    axis: int
    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class PRef:
    """A value that is (a view of) parameter `name`: `dims[j]` is the parameter axis of dim j
    (None for inserted dims); `partial` holds parameter axes that were sliced."""

    name: str
    dims: tuple[int | None, ...]
    ndim: int
    partial: frozenset[int] = frozenset()


State = Any  # None | Feat | PRef | list[State]


def _nz(shape: Sequence[int]) -> list[int]:
    return [i for i, s in enumerate(shape) if s != 1]


def op_name(target: Any) -> str:
    """A canonical op name shared by torch functions, Tensor methods and ATen overloads."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target._opname
    else:
        name = getattr(target, "__name__", str(target))
    return name.strip("_")


class Inference:
    """One inference over `traced`: the state of every graph value (`env`), the permutation
    variables (`uf`), every use of every parameter axis (`uses`), and the rules. `node` is the
    graph node being visited, named in the reasons a rule gives for fixing an axis."""

    def __init__(self, model: nn.Module, traced: Traced, heads: bool = False):
        self.model = model
        self.heads = heads
        self.traced = traced
        self.gm = traced.gm
        self.shapes = traced.shapes
        self.uf = UnionFind()
        self.canon = canonical_names(model)
        self.model_tensors = model.state_dict(keep_vars=True)
        by_id = {id(t): n for n, t in self.model_tensors.items()}
        self.gm_names: dict[str, str] = {}  # graph attribute name -> canonical state-dict name
        for n, t in list(self.gm.named_parameters(remove_duplicate=False)) + list(
            self.gm.named_buffers(remove_duplicate=False)
        ):
            if n in self.canon:
                self.gm_names[n] = self.canon[n]
            elif id(t) in by_id:
                self.gm_names[n] = self.canon[by_id[id(t)]]
        self.param_ndim = {n: t.dim() for n, t in self.model_tensors.items()}
        # (canonical tensor, axis) -> list of uses: a layout (tuple of Seg) or a reason it is fixed
        self.uses: dict[tuple[str, int], list[tuple[Sequence[Seg], int] | str]] = {}
        self.env: dict[fx.Node, State] = {}
        self.node: fx.Node | None = None

    # -- helpers -------------------------------------------------------------------------------

    def where(self) -> str:
        n = self.node
        if n is None:
            return ""
        if n.op == "call_module":
            return f"module `{n.target}`"
        return f"`{op_name(n.target)}` (node {n.name})"

    def label(self) -> str:
        """The module a node belongs to (torch.export keeps the module stack), else its name."""
        n = self.node
        if n is None:
            return "?"
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                return str(path)
        return n.name

    def new_var(self, size: int, label: str) -> Seg:
        return Seg(self.uf.new(size, label), size)

    def fix(self, state: State, reason: str) -> None:
        if isinstance(state, Feat):
            for s in state.segs:
                self.uf.fix(s.var, reason)
        elif isinstance(state, PRef):
            self.bind(state, {}, reason)
        elif isinstance(state, list):
            for s in state:
                self.fix(s, reason)

    def bind(
        self,
        ref: PRef,
        layouts: dict[int, Sequence[Seg]],
        reason: str,
        others: dict[int, str] | None = None,
    ) -> None:
        """One use of parameter `ref`: current dim j -> layout; every other parameter axis FIXED
        (with `others[j]` or `reason` as the reason)."""
        by_axis = {ref.dims[j]: segs for j, segs in layouts.items() if ref.dims[j] is not None}
        why = {
            ref.dims[j]: r
            for j, r in (others or {}).items()
            if j < len(ref.dims) and ref.dims[j] is not None
        }
        for axis in range(ref.ndim):
            use: Any = why.get(axis, reason)
            if axis in by_axis:
                if axis in ref.partial:
                    use = f"a slice of `{ref.name}` is used by {self.where()}"
                    for s in by_axis[axis]:
                        self.uf.fix(s.var, use)
                else:
                    use = (tuple(by_axis[axis]), 0)
            self.uses.setdefault((ref.name, axis), []).append(use)

    def union_segs(self, a: Sequence[Seg], b: Sequence[Seg]) -> bool:
        """Make two layouts one permutation; a single segment in blocks of k and one in blocks of
        k·r (grouped-query attention: r query heads per KV head) unite by coarsening the first."""
        if [(s.size, s.block) for s in a] == [(s.size, s.block) for s in b]:
            for x, y in zip(a, b):
                self.uf.union(x.var, y.var)
            return True
        if len(a) == len(b) == 1 and a[0].size * a[0].block == b[0].size * b[0].block:
            x, y = sorted((a[0], b[0]), key=lambda s: s.block)
            if y.block % x.block == 0:
                self.uf.union(self.uf.coarsen(x.var, y.block // x.block), y.var)
                return True
        return False

    def shape(self, n: Any) -> Any:
        return self.shapes.get(n) if isinstance(n, fx.Node) else None

    def state(self, a: Any) -> State:
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def pref(self, module: str, attr: str) -> PRef | None:
        name = f"{module}.{attr}" if module else attr
        if name not in self.gm_names:
            return None
        canon = self.gm_names[name]
        nd = self.param_ndim[canon]
        return PRef(canon, tuple(range(nd)), nd)

    def args_of(self, node: fx.Node) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))  # type: ignore[arg-type,return-value]
        return out

    def unknown(self, node: fx.Node | None, what: str | None = None) -> State:
        reason = what or f"{self.where()} is not known to be permutation-equivariant"
        for a in self.args_of(node) if node is not None else []:
            self.fix(self.state(a), reason)
        return None

    # -- rules ---------------------------------------------------------------------------------

    def mha(self, node: fx.Node, mod: nn.MultiheadAttention, q: str) -> State:
        """nn.MultiheadAttention: the input axis of in_proj and the output of out_proj (heads fixed)."""
        args = list(node.args) + [
            node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs
        ]
        qkv = args[:3]
        x = self.state(qkv[0])
        heads = "attention heads are not permuted"
        same = len({id(a) for a in qkv}) == 1 and mod._qkv_same_embed_dim
        in_w, in_b = self.pref(q, "in_proj_weight"), self.pref(q, "in_proj_bias")
        out_w, out_b = self.pref(q, "out_proj.weight"), self.pref(q, "out_proj.bias")
        shape = self.shape(qkv[0])
        if not (
            same and in_w and out_w and isinstance(x, Feat) and shape and x.axis == len(shape) - 1
        ):
            for ref in (in_w, in_b, out_w, out_b):
                if ref:
                    self.bind(
                        ref,
                        {},
                        f"{self.where()}: only self-attention on the last axis is supported",
                    )
            return self.unknown(node)
        self.bind(in_w, {1: x.segs}, heads)
        if in_b:
            self.bind(in_b, {}, heads)
        seg = self.new_var(mod.embed_dim, f"{q}.out_proj")
        self.bind(out_w, {0: [seg]}, heads)
        if out_b:
            self.bind(out_b, {0: [seg]}, heads)
        for k in ("key_padding_mask", "attn_mask"):
            self.fix(self.state(node.kwargs.get(k)), heads)
        return [Feat(len(shape) - 1, (seg,)), None]

    def feat_at(self, x: Any, axis: int | None = None) -> Feat | None:
        """x's Feat if it is on `axis` (negative counts from the end); otherwise x is fixed."""
        st = self.state(x)
        if isinstance(st, PRef):
            self.fix(st, f"parameter `{st.name}` used as data by {self.where()}")
            return None
        if not isinstance(st, Feat):
            return None
        shape = self.shape(x)
        if axis is not None and shape is not None and st.axis != axis % len(shape):
            self.fix(st, f"feature axis is not where {self.where()} expects it")
            return None
        return st

    def weight_ref(self, w: Any) -> PRef | None:
        if isinstance(w, PRef):
            return w
        st = self.state(w) if isinstance(w, fx.Node) else None
        if isinstance(st, PRef):
            return st
        self.fix(st, f"computed weight in {self.where()}")
        return None

    def linear(self, x: Any, w: Any, b: Any, label: str) -> State:
        shape = self.shape(x)
        W, B = self.weight_ref(w), (self.weight_ref(b) if b is not None else None)
        f = self.feat_at(x, -1)
        if W is None:
            if f:
                self.fix(f, f"{self.where()} has a weight that is not a parameter")
            if B:
                self.bind(B, {}, f"{self.where()} has a weight that is not a parameter")
            return None
        if shape is None:
            return None
        if len(W.dims) != 2 or W.dims[0] is None:
            return self.unknown(
                self.node, f"{self.where()} has a weight that is not a 2-d parameter"
            )
        out = self.new_var(self.model_tensors[W.name].shape[W.dims[0]], label)
        self.bind(
            W, {0: [out], **({1: f.segs} if f else {})}, f"input of {self.where()} is not permuted"
        )
        if B:
            self.bind(B, {0: [out]}, "")
        return Feat(len(shape) - 1, (out,))

    def conv(self, x: Any, w: Any, b: Any, groups: int, transposed: bool, label: str) -> State:
        W, B = self.weight_ref(w), (self.weight_ref(b) if b is not None else None)
        f = self.feat_at(x, 1)
        if W is None:
            return None
        shape = self.model_tensors[W.name].shape
        c_in = shape[1] * groups if not transposed else shape[0]
        c_out = shape[0] if not transposed else shape[1] * groups
        in_axis, out_axis = (1, 0) if not transposed else (0, 1)
        if groups == 1:
            out = self.new_var(c_out, label)
            layouts: dict[int, Sequence[Seg]] = {out_axis: [out]}
            if f:
                layouts[in_axis] = f.segs
            self.bind(W, layouts, f"input of {self.where()} is not permuted", KERNEL_AXES)
            if B:
                self.bind(B, {0: [out]}, "")
            return Feat(1, (out,))
        if not transposed and groups == c_in == c_out:  # depthwise: channel c only sees channel c
            why = f"input of depthwise {self.where()} is not permuted"
            if f is None:
                self.bind(W, {}, why)
                if B:
                    self.bind(B, {}, why)
                return None
            self.bind(W, {0: f.segs}, why, KERNEL_AXES)
            if B:
                self.bind(B, {0: f.segs}, why)
            return f
        why = f"grouped convolution {self.where()} (groups={groups}) mixes channels within groups"
        if f:
            self.fix(f, why)
        self.bind(W, {}, why)
        if B:
            self.bind(B, {}, why)
        return None

    def channel_norm(self, x: Any, params: list[Any]) -> State:
        """BatchNorm / InstanceNorm: per-channel on axis 1; weight, bias and statistics follow."""
        f = self.feat_at(x, 1)
        for p in params:
            ref = self.weight_ref(p) if p is not None else None
            if ref:
                self.bind(ref, {0: f.segs} if f else {}, f"input of {self.where()} is not permuted")
        return f

    def layer_norm(self, x: Any, k: int, params: list[Any]) -> State:
        """Normalisation over the last k dims: equivariant in every axis; affine params follow."""
        st, shape = self.state(x), self.shape(x)
        f = st if isinstance(st, Feat) else self.feat_at(x)
        for p in params:
            ref = self.weight_ref(p) if p is not None else None
            if ref is None:
                continue
            j = (f.axis - (len(shape) - k)) if f and shape else -1
            self.bind(
                ref,
                {j: f.segs} if f and 0 <= j < ref.ndim else {},
                f"input of {self.where()} is not permuted",
            )
        return f

    def group_norm(self, x: Any, groups: int, params: list[Any]) -> State:
        """GroupNorm(G, C) normalises blocks of C/G channels: only whole groups may move."""
        f = self.feat_at(x, 1)
        c = sum(s.size * s.block for s in f.segs) if f else 0
        if f and groups != 1 and not self.require_blocks(f, c // groups):
            self.fix(
                f,
                f"{self.where()} normalises groups of channels ({groups} groups) that the layout splits",
            )
            f = None
        for p in params:
            ref = self.weight_ref(p) if p is not None else None
            if ref:
                self.bind(ref, {0: f.segs} if f else {}, f"input of {self.where()} is not permuted")
        return f

    def require_blocks(self, f: Feat, k: int) -> bool:
        """Constrain f's variables to move whole blocks of k entries; False if the layout cannot."""
        offset = 0
        for s in f.segs:
            if offset % k or (s.size * s.block) % k or (s.block % k and k % s.block):
                return False
            offset += s.size * s.block
        for s in f.segs:
            if s.block % k:
                self.uf.coarsen(s.var, k // s.block)
        return True

    def embedding(self, idx: Any, w: Any, label: str) -> State:
        self.fix(self.state(idx), f"indices of {self.where()} are permuted")
        W = self.weight_ref(w)
        shape = self.shape(idx)
        if W is None or shape is None:
            return None
        if len(W.dims) != 2 or W.dims[1] is None:
            return self.unknown(
                self.node, f"{self.where()} has a weight that is not a 2-d parameter"
            )
        out = self.new_var(self.model_tensors[W.name].shape[W.dims[1]], label)
        self.bind(W, {1: [out]}, "the vocabulary axis is an index")
        return Feat(len(shape), (out,))

    def unary(self, x: Any) -> State:
        return self.state(x)

    def spatial(self, x: Any) -> State:
        """Pooling / resampling over dims >= 2: the channel (or batch) axis passes through."""
        st = self.state(x)
        if isinstance(st, Feat) and st.axis >= 2:
            self.fix(st, f"{self.where()} acts on the feature axis")
            return None
        if isinstance(st, PRef):
            self.fix(st, f"parameter used as data by {self.where()}")
            return None
        return st

    def elementwise(
        self, node: fx.Node, operands: list[Any], extra: Sequence[PRef | None] = ()
    ) -> State:
        """Broadcasting elementwise op: operands' features must line up and are unioned; a
        parameter operand is bound to the feature; an unpermuted full-width operand fixes it."""
        out_shape = self.shape(node)
        if not isinstance(out_shape, tuple):
            return None
        nd = len(out_shape)
        tensors = [
            (a, self.state(a), self.shape(a)) for a in operands if isinstance(self.shape(a), tuple)
        ]
        tensors += [
            (None, r, tuple(self.model_tensors[r.name].shape)) for r in extra if r is not None
        ]
        feats = [(st, st.axis + nd - len(sh)) for _, st, sh in tensors if isinstance(st, Feat)]
        refs = [(st, sh) for _, st, sh in tensors if isinstance(st, PRef)]
        if not feats:
            if (
                len(refs) == 1 and len(tensors) == 1
            ):  # f(param, scalars): still a view of the parameter
                ref, sh = refs[0]
                return PRef(ref.name, (None,) * (nd - len(sh)) + ref.dims, ref.ndim, ref.partial)
            for ref, _ in refs:
                self.fix(
                    ref, f"parameter `{ref.name}` combined with other tensors by {self.where()}"
                )
            return None
        axes = {a for _, a in feats}
        first = feats[0][0]
        ok = len(axes) == 1 and all(self.union_segs(first.segs, f.segs) for f, _ in feats[1:])
        axis = feats[0][1]
        why = f"{self.where()} combines features on different axes or layouts"
        for _, st, sh in tensors if ok else []:
            j = axis - (nd - len(sh))
            if st is None and 0 <= j < len(sh) and sh[j] != 1:
                ok = False
                why = f"combined with an unpermuted tensor by {self.where()}"
        if not ok:
            for f, _ in feats:
                self.fix(f, why)
            for ref, _ in refs:
                self.fix(ref, why)
            return None
        for ref, sh in refs:
            j = axis - (nd - len(sh))
            if 0 <= j < len(sh) and sh[j] != 1:
                self.bind(
                    ref, {j: first.segs}, f"broadcast against an unpermuted axis by {self.where()}"
                )
            else:
                self.bind(ref, {}, f"broadcast along the feature axis by {self.where()}")
        return Feat(axis, first.segs)

    def reshape(self, x: Any, node: fx.Node) -> State:
        st, a, b = self.state(x), self.shape(x), self.shape(node)
        if isinstance(st, PRef):
            if isinstance(a, tuple) and a == b:
                return st
            self.fix(st, f"parameter `{st.name}` reshaped by {self.where()}")
            return None
        if not isinstance(st, Feat) or not isinstance(a, tuple) or not isinstance(b, tuple):
            return None
        chunk = reshape_chunk(a, b, st.axis)
        if chunk is None:
            self.fix(st, f"{self.where()} reshapes the feature axis")
            return None
        ins, outs = chunk
        if len(ins) == 1 and len(outs) == 1:
            return Feat(outs[0], st.segs)
        if ins[0] == st.axis and len(outs) == 1:  # (C, H, W) -> C·H·W: block layout
            k = math.prod(a[i] for i in ins[1:])
            return Feat(outs[0], tuple(Seg(s.var, s.size, s.block * k) for s in st.segs))
        sizes = tuple(b[i] for i in outs)
        if len(ins) == 1 and len(st.segs) == 1:  # C -> (H, D...): blocks of D move together
            s, rest = st.segs[0], math.prod(b[i] for i in outs[1:])
            if rest % s.block == 0 and (rest == s.block or self.heads):
                h = self.uf.coarsen(s.var, rest // s.block)
                return Feat(outs[0], (Seg(h, b[outs[0]], 1),)) if h != FIXED else None
            if rest % s.block == 0:
                self.fix(
                    st,
                    f"{self.where()} splits the feature axis into {sizes} (attention heads are not permuted; heads=True permutes them)",
                )
                return None
        self.fix(st, f"{self.where()} splits the feature axis into {sizes}")
        return None

    def expand(self, x: Any, node: fx.Node) -> State:
        st, a, b = self.state(x), self.shape(x), self.shape(node)
        if not isinstance(st, Feat | PRef) or not isinstance(a, tuple) or not isinstance(b, tuple):
            return None
        shift = len(b) - len(a)
        if isinstance(st, PRef):
            if all(a[i] == b[i + shift] or a[i] == 1 for i in range(len(a))):
                return PRef(st.name, (None,) * shift + st.dims, st.ndim, st.partial)
            self.fix(st, f"parameter `{st.name}` repeated by {self.where()}")
            return None
        if b[st.axis + shift] != a[st.axis]:
            self.fix(st, f"{self.where()} repeats the feature axis")
            return None
        return Feat(st.axis + shift, st.segs)

    def pad(self, x: Any, pad: Sequence[int]) -> State:
        st, shape = self.state(x), self.shape(x)
        if isinstance(st, Feat) and shape:
            padded = [
                len(shape) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]
            ]
            if st.axis in padded:
                self.fix(st, f"{self.where()} pads the feature axis")
                return None
        elif isinstance(st, PRef):
            self.fix(st, f"parameter `{st.name}` padded by {self.where()}")
            return None
        return st

    def permute_dims(self, x: Any, order: Sequence[int]) -> State:
        """Transpose, permute, movedim: output dim j is input dim `order[j]`."""
        st = self.state(x)
        if not isinstance(st, Feat | PRef):
            return None
        if isinstance(st, PRef):
            return PRef(st.name, tuple(st.dims[o] for o in order), st.ndim, st.partial)
        return Feat(list(order).index(st.axis), st.segs)

    def reduce(
        self, node: fx.Node, x: Any, dim: Any, keepdim: bool, positions: bool = False
    ) -> State:
        """Sum, mean, max... over `dim` (None: all); `positions`: argmax/argmin, whose result
        indexes the reduced axis."""
        st, shape = self.state(x), self.shape(x)
        out_shape = self.shape(node)
        if isinstance(st, PRef):
            self.fix(st, f"parameter `{st.name}` reduced by {self.where()}")
            return None
        if not isinstance(st, Feat) or not isinstance(shape, tuple):
            return None
        nd = len(shape)
        dims = (
            set(range(nd))
            if dim is None or dim == []
            else {d % nd for d in (dim if isinstance(dim, list | tuple) else [dim])}
        )
        if st.axis in dims:
            if positions:
                self.fix(st, f"{self.where()} returns positions along the feature axis")
            return [None, None] if isinstance(out_shape, list) else None
        axis = st.axis if keepdim else st.axis - sum(1 for d in dims if d < st.axis)
        out = Feat(axis, st.segs)
        return [out, out] if isinstance(out_shape, list) else out

    def cat(self, node: fx.Node, tensors: list[Any], dim: int, stack: bool) -> State:
        shapes = [self.shape(t) for t in tensors]
        states = [self.state(t) for t in tensors]
        if not shapes or not all(isinstance(s, tuple) for s in shapes):
            return self.unknown(node)
        nd = len(shapes[0])
        dim = dim % (nd + 1 if stack else nd)
        feats = [s for s in states if isinstance(s, Feat)]
        if not stack and feats and all(isinstance(s, Feat) and s.axis == dim for s in states):
            return Feat(dim, tuple(seg for s in feats for seg in s.segs))  # concatenated layout
        if not stack and any(isinstance(s, Feat) and s.axis == dim for s in states):
            for s in states:
                self.fix(s, f"{self.where()} concatenates permuted and unpermuted features")
            return None
        out = self.elementwise_like(node, tensors)
        if stack and isinstance(out, Feat):
            return Feat(out.axis + (1 if out.axis >= dim else 0), out.segs)
        return out

    def elementwise_like(self, node: fx.Node, tensors: list[Any]) -> State:
        """cat/stack along a non-feature axis: the operands' features must agree, like an add."""
        saved = self.shapes.get(node)
        first = self.shape(tensors[0])
        self.shapes[node] = first  # align operands against each other, not the stacked shape
        try:
            return self.elementwise(node, tensors)
        finally:
            self.shapes[node] = saved

    def split(self, node: fx.Node, x: Any, dim: Any, *, drops_dim: bool = False) -> State:
        """chunk / split / unbind (`drops_dim`) along `dim`: each piece keeps the feature."""
        st, shape, out = self.state(x), self.shape(x), self.shape(node)
        n = len(out) if isinstance(out, list) else 0
        if isinstance(st, PRef):
            self.fix(st, f"parameter `{st.name}` split by {self.where()}")
            return [None] * n
        if not isinstance(st, Feat) or not isinstance(shape, tuple):
            return [None] * n
        d = (dim if isinstance(dim, int) else 0) % len(shape)
        if d == st.axis:
            self.fix(st, f"{self.where()} splits the feature axis")
            return [None] * n
        axis = st.axis - 1 if drops_dim and d < st.axis else st.axis
        return [Feat(axis, st.segs)] * n

    def view_operand(
        self, x: Any, node: fx.Node
    ) -> tuple[Feat | PRef, tuple[int, ...], tuple[int, ...]] | None:
        """x's state with x's and `node`'s shapes, when there is a feature or parameter to track."""
        st, shape, out = self.state(x), self.shape(x), self.shape(node)
        if isinstance(st, Feat | PRef) and isinstance(shape, tuple) and isinstance(out, tuple):
            return st, shape, out
        return None

    def select(
        self, node: fx.Node, x: Any, dim: int, *, drops_dim: bool = False, by_index: bool = False
    ) -> State:
        """Part of `dim`: slice / narrow, select (`drops_dim`), index_select (`by_index`: even
        every entry may come in another order)."""
        view = self.view_operand(x, node)
        if view is None:
            return None
        st, shape, out = view
        d = dim % len(shape)
        removed = drops_dim
        full = not removed and out[d] == shape[d] and not by_index
        if isinstance(st, PRef):
            dims = list(st.dims)
            partial = set(st.partial)
            if dims[d] is not None and not full:
                partial.add(dims[d])  # type: ignore[arg-type]
            if removed:
                dims.pop(d)
            return PRef(st.name, tuple(dims), st.ndim, frozenset(partial))
        if d == st.axis:
            if full:
                return st
            self.fix(st, f"{self.where()} selects part of the feature axis")
            return None
        return Feat(st.axis - 1 if removed and d < st.axis else st.axis, st.segs)

    def index(self, node: fx.Node, x: Any, idx: Any) -> State:
        """Python indexing `x[...]` with ints, slices, None and Ellipsis."""
        view = self.view_operand(x, node)
        if view is None:
            return None
        st, shape, out = view
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, fx.Node) for i in items):
            return self.unknown(node, f"{self.where()} indexes with a tensor")
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in items:
            expanded.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
        expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
        mapping: dict[int, int] = {}  # input dim -> output dim
        full: dict[int, bool] = {}
        d_in = d_out = 0
        for i in expanded:
            if i is None:
                d_out += 1
            elif isinstance(i, int):
                d_in += 1
            else:
                mapping[d_in] = d_out
                full[d_in] = out[d_out] == shape[d_in]
                d_in += 1
                d_out += 1
        if isinstance(st, PRef):
            dims: list[int | None] = [None] * len(out)
            partial = set(st.partial)
            for d, pa in enumerate(st.dims):
                if pa is None:
                    continue
                if d in mapping:
                    dims[mapping[d]] = pa
                    if not full[d]:
                        partial.add(pa)
                else:
                    partial.add(pa)
            return PRef(st.name, tuple(dims), st.ndim, frozenset(partial))
        if st.axis not in mapping or not full[st.axis]:
            self.fix(st, f"{self.where()} selects part of the feature axis")
            return None
        return Feat(mapping[st.axis], st.segs)

    def sdpa(self, node: fx.Node, q: Any, k: Any, v: Any, mask: Any, gqa: bool) -> State:
        """Attention: on the head-dim axis, q·k contracts (q, k one permutation; the output is
        v's); on the head axis, q, k and v share one head permutation (the output's)."""
        states = [self.state(t) for t in (q, k, v)]
        shapes = [self.shape(t) for t in (q, k, v)]
        if not all(isinstance(sh, tuple) for sh in shapes):
            return self.unknown(node)
        nd = len(shapes[0])
        feats = [st if isinstance(st, Feat) else None for st in states]
        for st in states:
            if isinstance(st, PRef):
                self.fix(st, f"parameter `{st.name}` used as data by {self.where()}")
        axis = feats[0].axis if feats[0] else None
        if (
            axis is not None
            and axis < nd - 2
            and all(f and f.axis == axis and len(sh) == nd for f, sh in zip(feats, shapes))
        ):
            fq, fk, fv = feats
            assert fq and fk and fv
            mask_shape = self.shape(mask)
            j = axis - (nd - len(mask_shape)) if isinstance(mask_shape, tuple) else -1
            mask_ok = not (
                isinstance(mask_shape, tuple) and 0 <= j < len(mask_shape) and mask_shape[j] != 1
            )
            r = shapes[0][axis] // shapes[1][axis] if gqa else 1  # query heads per KV head
            kv = [tuple(Seg(s.var, s.size, s.block * r) for s in f.segs) for f in (fk, fv)]
            if mask_ok and self.union_segs(fq.segs, kv[0]) and self.union_segs(fq.segs, kv[1]):
                return Feat(axis, fq.segs)
            for f in feats:
                self.fix(
                    f,
                    f"{self.where()}: the heads of query, key, value or a per-head mask do not line up",
                )
            return None
        fq, fk, fv = (self.feat_at(t, -1) for t in (q, k, v))
        self.fix(self.state(mask), f"attention mask of {self.where()}")
        if (fq is None) != (fk is None) or (fq and fk and not self.union_segs(fq.segs, fk.segs)):
            for f in (fq, fk):
                self.fix(f, f"query and key of {self.where()} are permuted differently")
        return fv

    def matmul(self, node: fx.Node, a: Any, b: Any) -> State:
        sa, sb = self.shape(a), self.shape(b)
        out = self.shape(node)
        if (
            not isinstance(sa, tuple)
            or not isinstance(sb, tuple)
            or not isinstance(out, tuple)
            or len(sa) < 2
            or len(sb) < 2
        ):
            return self.unknown(node)
        fa, fb = self.state(a), self.state(b)
        why = f"{self.where()} contracts a permuted axis with an unpermuted one"
        nd = len(out)
        if isinstance(fb, PRef) and len(sb) == 2:
            W = fb
            a_feat = self.feat_at(a, -1)
            seg = self.new_var(sb[1], self.label())
            self.bind(W, {1: [seg], **({0: a_feat.segs} if a_feat else {})}, why)
            return Feat(nd - 1, (seg,))
        for st in (fa, fb):
            if isinstance(st, PRef):
                self.fix(st, f"parameter `{st.name}` used as data by {self.where()}")
        ca = fa if isinstance(fa, Feat) and fa.axis == len(sa) - 1 else None  # contracted
        cb = fb if isinstance(fb, Feat) and fb.axis == len(sb) - 2 else None
        if ca and cb:
            if not self.union_segs(ca.segs, cb.segs):
                self.fix(ca, why)
                self.fix(cb, why)
        elif ca or cb:
            self.fix(ca or cb, why)
        result = None
        if isinstance(fa, Feat) and fa.axis == len(sa) - 2:
            result = Feat(nd - 2, fa.segs)
        if isinstance(fb, Feat) and fb.axis == len(sb) - 1:
            if result is None:
                result = Feat(nd - 1, fb.segs)
            else:
                self.fix(fb, f"{self.where()} would carry two permuted axes")
        batch = [
            (st, st.axis + nd - len(sh))
            for st, sh in ((fa, sa), (fb, sb))
            if isinstance(st, Feat) and st.axis < len(sh) - 2
        ]
        if batch:  # a feature on a batch axis (attention heads): both operands must carry it
            axis = batch[0][1]
            carried = {id(st) for st, _ in batch}
            others = [sh for st, sh in ((fa, sa), (fb, sb)) if id(st) not in carried]
            broadcast = all(
                axis - (nd - len(sh)) < 0 or sh[axis - (nd - len(sh))] == 1 for sh in others
            )
            same = len({a for _, a in batch}) == 1 and (
                len(batch) == 1 or self.union_segs(batch[0][0].segs, batch[1][0].segs)
            )
            if result is None and same and broadcast:
                return Feat(axis, batch[0][0].segs)
            for st, _ in batch:
                self.fix(st, f"{self.where()} batches over the feature axis")
        return result


def reshape_chunk(
    a: Sequence[int], b: Sequence[int], axis: int
) -> tuple[list[int], list[int]] | None:
    """The smallest runs of input dims `ins` (containing `axis`) and output dims `outs` with equal
    products, ignoring size-1 dims; None when the sizes do not line up."""
    if math.prod(a) != math.prod(b) or a[axis] == 1:
        return None
    ia, ib = _nz(a), _nz(b)
    i = j = 0
    while i < len(ia):
        ins, outs = [ia[i]], [ib[j]] if j < len(ib) else []
        pa, pb = a[ia[i]], b[ib[j]] if j < len(ib) else 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                ins.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            elif pb < pa and j < len(ib):
                outs.append(ib[j])
                pb *= b[ib[j]]
                j += 1
            else:
                return None
        if axis in ins:
            return ins, outs
    return None
