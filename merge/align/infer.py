"""Infer a permutation spec from a traced graph: union-find over feature axes (reference §11.2).

Every traced value carries at most one *feature axis*, laid out as segments of permutation
variables (a concatenation gives several; a flatten of (C, H, W) gives block H·W). Ops either
pass the feature through (elementwise ops, norms, pooling, softmax, reshapes that keep the axis),
create a new variable (the output axis of Linear, Conv, Embedding), or union variables (residual
adds, q·k contractions, tied weights). Each use of a parameter binds *every* one of its axes,
either to a variable or to FIXED, so an axis is only permuted when all its uses agree. Anything
not known to be permutation-equivariant, and everything reaching the model output, is FIXED;
the reason is kept for `--show-spec`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from merge.align.spec import FixedAxis, Group, Member, PermutationSpec
from merge.align.trace import (
    Args,
    Traced,
    canonical_names,
    first_batch,
    guess_example,
    trace,
)

FIXED = 0
_KERNEL_AXES = {d: "spatial axis of a convolution kernel" for d in (2, 3, 4)}


@dataclass(frozen=True)
class Seg:
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


class _UnionFind:
    """Union-find over permutation variables. `coarse[r] = (h, k)` says r's permutation moves
    whole blocks of k units, as h's (size / k) does: GroupNorm groups, attention heads."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.sizes = [0]
        self.labels = ["FIXED"]
        self.members: dict[int, list[int]] = {FIXED: [FIXED]}
        self.reason: dict[int, str] = {}
        self.coarse: dict[int, tuple[int, int]] = {}

    def new(self, size: int, label: str) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.sizes.append(size)
        self.labels.append(label)
        self.members[v] = [v]
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def fix(self, v: int, reason: str) -> None:
        r = self.find(v)
        if r == FIXED:
            return
        for m in self.members[r]:
            self.reason.setdefault(m, reason)
        link = self.coarse.pop(r, None)
        self._link(FIXED, r)
        if link:
            self.fix(link[0], reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED:
            ra, rb, a, b = rb, ra, b, a
        if ra == FIXED:
            self.fix(rb, self.reason.get(a, "shares a permutation with a fixed axis"))
            return
        if self.sizes[ra] != self.sizes[rb]:
            why = f"two axes of sizes {self.sizes[ra]} and {self.sizes[rb]} meet in one permutation"
            self.fix(ra, why)
            self.fix(rb, why)
            return
        la, lb = self.coarse.pop(ra, None), self.coarse.pop(rb, None)
        root = min(ra, rb)
        self._link(root, max(ra, rb))
        if la and lb:
            k = math.lcm(la[1], lb[1])
            h1, h2 = self.coarsen(la[0], k // la[1]), self.coarsen(lb[0], k // lb[1])
            self.union(h1, h2)
            if self.find(root) != FIXED:
                self.coarse[self.find(root)] = (h1, k)
        elif la or lb:
            self.coarse[root] = la or lb  # type: ignore[assignment]

    def coarsen(self, v: int, k: int) -> int:
        """A variable h with v's permutation = h's, each of h's units k consecutive units of v."""
        r = self.find(v)
        if k == 1 or r == FIXED:
            return r
        size = self.sizes[r]
        if size % k:
            self.fix(r, f"{size} units cannot move in blocks of {k}")
            return FIXED
        if r not in self.coarse:
            h = self.new(size // k, self.labels[r])
            self.coarse[r] = (h, k)
            return h
        h0, k0 = self.coarse[r]
        if k % k0 == 0:
            return self.coarsen(h0, k // k0)
        top = math.lcm(k, k0)
        if size % top:
            self.fix(r, f"{size} units cannot move in blocks of both {k} and {k0}")
            return FIXED
        h_top = self.coarsen(h0, top // k0)
        h = self.new(size // k, self.labels[r])
        self.coarse[h] = (h_top, top // k)
        return h

    def settle(self) -> None:
        """A fixed coarse variable fixes its fine one and vice versa, until nothing changes."""
        changed = True
        while changed:
            changed = False
            for r, (h, _) in list(self.coarse.items()):
                fr, fh = self.find(r), self.find(h)
                if (fr == FIXED) != (fh == FIXED):
                    if fr == FIXED:
                        self.fix(h, self.reason.get(r, "its blocks are fixed"))
                    else:
                        self.fix(r, self.reason.get(h, "its blocks are fixed"))
                    changed = True

    def resolve(self, v: int) -> tuple[int, int]:
        """(root, k): v's permutation is the root's, each root unit k units of v wide."""
        r, k = self.find(v), 1
        while r in self.coarse:
            h, f = self.coarse[r]
            r, k = self.find(h), k * f
        return r, k

    def _link(self, root: int, child: int) -> None:
        self.parent[child] = root
        self.members[root].extend(self.members.pop(child))


def _nz(shape: Sequence[int]) -> list[int]:
    return [i for i, s in enumerate(shape) if s != 1]


def _name(target: Any) -> str:
    """A canonical op name shared by torch functions, Tensor methods and ATen overloads."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target._opname
    else:
        name = getattr(target, "__name__", str(target))
    return name.strip("_")


_UNARY = set(
    [
        "relu",
        "relu6",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "mish",
        "softplus",
        "softsign",
        "logsigmoid",
        "tanhshrink",
        "exp",
        "exp2",
        "log",
        "log2",
        "log1p",
        "expm1",
        "sqrt",
        "rsqrt",
        "abs",
        "neg",
        "negative",
        "square",
        "sin",
        "cos",
        "erf",
        "erfc",
        "reciprocal",
        "sign",
        "floor",
        "ceil",
        "round",
        "trunc",
        "clamp",
        "clip",
        "clamp_min",
        "clamp_max",
        "dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "contiguous",
        "clone",
        "detach",
        "to",
        "to_copy",
        "type",
        "type_as",
        "float",
        "double",
        "half",
        "bfloat16",
        "cpu",
        "cuda",
        "alias",
        "lift_fresh_copy",
        "nan_to_num",
        "identity",
        "logical_not",
        "bitwise_not",
        "isnan",
        "isinf",
        "sigmoid_",
        "tanh_",
        "relu_",
        "gelu_",
        "silu_",
    ]
)
_ELEMENTWISE = set(
    [
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "true_divide",
        "truediv",
        "floordiv",
        "floor_divide",
        "maximum",
        "minimum",
        "where",
        "masked_fill",
        "pow",
        "fmod",
        "remainder",
        "atan2",
        "lerp",
        "addcmul",
        "addcdiv",
        "eq",
        "ne",
        "lt",
        "gt",
        "le",
        "ge",
        "logical_and",
        "logical_or",
        "logical_xor",
        "bitwise_and",
        "bitwise_or",
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "copysign",
        "hypot",
        "xlogy",
    ]
)
_RESHAPE = set(
    [
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "view_as",
        "reshape_as",
        "unsafe_view",
    ]
)
_EXPAND = set(["expand", "expand_as", "broadcast_to", "repeat"])
_SPATIAL = set(
    [
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "interpolate",
        "upsample",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_linear1d",
        "upsample_trilinear3d",
        "upsample_nearest2d_vec",
        "upsample_bilinear2d_vec",
    ]
)
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_REDUCE = set(
    [
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "norm",
        "linalg_vector_norm",
        "var",
        "std",
        "logsumexp",
        "prod",
        "all",
        "any",
        "nansum",
        "nanmean",
        "var_mean",
        "std_mean",
    ]
)
_ARGREDUCE = {"argmax", "argmin"}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", "t", "permute", "movedim"}
_SPLIT = {"chunk", "split", "split_with_sizes", "unbind", "tensor_split"}
_CONV = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"
}  # fmt: skip
_BATCH_NORM = {
    "batch_norm",
    "native_batch_norm_legit_no_training",
    "native_batch_norm",
    "instance_norm",
}

_MODULE_UNARY = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_MODULE_SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip


class _Inference:
    def __init__(self, model: nn.Module, traced: Traced, heads: bool = False):
        self.model = model
        self.heads = heads
        self.traced = traced
        self.gm = traced.gm
        self.shapes = traced.shapes
        self.uf = _UnionFind()
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
        return f"`{_name(n.target)}` (node {n.name})"

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

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = None
            elif node.op == "get_attr":
                name = str(node.target)
                if name in self.gm_names:
                    nd = self.param_ndim[self.gm_names[name]]
                    self.env[node] = PRef(self.gm_names[name], tuple(range(nd)), nd)
                else:
                    self.env[node] = None
            elif node.op == "output":
                for a in self.args_of(node):
                    self.fix(
                        self.state(a),
                        "reaches the model output (output order is part of the function)",
                    )
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            else:
                self.env[node] = self.call_function(node)

    def args_of(self, node: fx.Node) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))  # type: ignore[arg-type,return-value]
        return out

    def unknown(self, node: fx.Node | None, what: str | None = None) -> State:
        reason = what or f"{self.where()} is not known to be permutation-equivariant"
        for a in self.args_of(node) if node is not None else []:
            self.fix(self.state(a), reason)
        return None

    # -- modules -------------------------------------------------------------------------------

    def call_module(self, node: fx.Node) -> State:
        mod = self.gm.get_submodule(str(node.target))
        q = str(node.target)
        x = node.args[0] if node.args else None
        p = lambda attr: self.pref(q, attr) if getattr(mod, attr, None) is not None else None  # noqa: E731
        if isinstance(mod, nn.Linear):
            return self.linear(x, p("weight"), p("bias"), q)
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return self.conv(x, p("weight"), p("bias"), mod.groups, False, q)
        if isinstance(mod, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            return self.conv(x, p("weight"), p("bias"), mod.groups, True, q)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
            return self.channel_norm(
                x, [p("weight"), p("bias"), p("running_mean"), p("running_var")]
            )
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(x, len(mod.normalized_shape), [p("weight"), p("bias")])
        if isinstance(mod, nn.RMSNorm):
            return self.layer_norm(x, len(mod.normalized_shape), [p("weight")])
        if isinstance(mod, nn.GroupNorm):
            return self.group_norm(x, mod.num_groups, [p("weight"), p("bias")])
        if isinstance(mod, nn.Embedding):
            return self.embedding(x, p("weight"), q)
        if isinstance(mod, _MODULE_UNARY):
            return self.unary(x)
        if isinstance(mod, nn.PReLU):
            return (
                self.elementwise(node, [x], extra=[p("weight")])
                if mod.num_parameters > 1
                else self.unary(x)
            )
        if isinstance(mod, _MODULE_SPATIAL):
            return self.spatial(x)
        if isinstance(mod, nn.Flatten | nn.Unflatten):
            return self.reshape(x, node)
        if isinstance(mod, nn.Softmax | nn.LogSoftmax | nn.Softmin):
            return self.unary(x)
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(node, mod, q)
        for name, _ in mod.named_parameters():
            ref = self.pref(q, name)
            if ref:
                self.bind(
                    ref,
                    {},
                    f"parameter of {type(mod).__name__} module `{q}`, whose permutation rule is unknown",
                )
        return self.unknown(
            node, f"module `{q}` ({type(mod).__name__}) is not known to be permutation-equivariant"
        )

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

    # -- rules ---------------------------------------------------------------------------------

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
            self.bind(W, layouts, f"input of {self.where()} is not permuted", _KERNEL_AXES)
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
            self.bind(W, {0: f.segs}, why, _KERNEL_AXES)
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
        chunk = _reshape_chunk(a, b, st.axis)
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

    def call_function(self, node: fx.Node) -> State:
        name = _name(node.target)
        aten = isinstance(node.target, torch._ops.OpOverload)
        args, kw = list(node.args), dict(node.kwargs)

        def arg(i: int, key: str, default: Any = None) -> Any:
            return args[i] if len(args) > i else kw.get(key, default)

        out_shape = self.shape(node)
        if name == "getitem":
            st = self.state(args[0])
            if isinstance(st, list):
                return st[args[1]] if isinstance(args[1], int) and args[1] < len(st) else None
            return self.index(node, args[0], args[1])
        if out_shape is None:
            return None  # sizes, dtypes and other non-tensor values
        if name in _UNARY:
            return self.unary(args[0])
        if name in ("linear",):
            return self.linear(arg(0, "input"), arg(1, "weight"), arg(2, "bias"), self.label())
        if name in _CONV:
            groups = arg(8, "groups", 1) if name == "convolution" else arg(6, "groups", 1)
            transposed = (
                bool(arg(6, "transposed", False)) if name == "convolution" else "transpose" in name
            )
            if "transpose" in name:
                groups = arg(6, "groups", 1)
            return self.conv(
                arg(0, "input"), arg(1, "weight"), arg(2, "bias"), groups, transposed, self.label()
            )
        if name in _BATCH_NORM:
            if aten or name == "instance_norm":
                params = [
                    arg(1, "weight"),
                    arg(2, "bias"),
                    arg(3, "running_mean"),
                    arg(4, "running_var"),
                ]
            else:
                params = [
                    arg(3, "weight"),
                    arg(4, "bias"),
                    arg(1, "running_mean"),
                    arg(2, "running_var"),
                ]
            out = self.channel_norm(
                args[0], [self.state(p) if isinstance(p, fx.Node) else None for p in params]
            )
            return [out, None, None] if isinstance(out_shape, list) else out
        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            k = len(arg(1, "normalized_shape"))
            params = [arg(2, "weight")] + ([arg(3, "bias")] if name != "rms_norm" else [])
            out = self.layer_norm(
                args[0], k, [self.state(p) if isinstance(p, fx.Node) else None for p in params]
            )
            return [out, None, None] if isinstance(out_shape, list) else out
        if name in ("group_norm", "native_group_norm"):
            if name == "native_group_norm":
                g, params = int(arg(6, "group")), [args[1], args[2]]
            else:
                g, params = int(arg(1, "num_groups")), [arg(2, "weight"), arg(3, "bias")]
            out = self.group_norm(
                args[0], g, [self.state(p) if isinstance(p, fx.Node) else None for p in params]
            )
            return [out, None, None] if isinstance(out_shape, list) else out
        if name == "embedding":
            idx, w = (args[1], args[0]) if aten else (arg(0, "input"), arg(1, "weight"))
            return self.embedding(idx, w, self.label())
        if name in _ELEMENTWISE or (
            name in ("max", "min") and isinstance(self.shape(arg(1, "other")), tuple)
        ):
            return self.elementwise(node, [a for a in self.args_of(node)])
        if name in _RESHAPE:
            return self.reshape(args[0], node)
        if name in _EXPAND:
            return self.expand(args[0], node)
        if name in _SPATIAL:
            out = self.spatial(args[0])
            return [out, out] if isinstance(out_shape, list) else out
        if name in ("pad", "constant_pad_nd"):
            return self.pad(args[0], arg(1, "pad"))
        if name in _SOFTMAX:
            return self.unary(args[0])
        if name in _TRANSPOSE:
            return self.transpose(node, name, args, kw)
        if name in ("norm", "linalg_vector_norm"):  # (input, p, dim, keepdim)
            return self.reduce(node, name, args[0], arg(2, "dim"), bool(arg(3, "keepdim", False)))
        if name in _REDUCE or name in _ARGREDUCE:
            return self.reduce(node, name, args[0], arg(1, "dim"), bool(arg(2, "keepdim", False)))
        if name in ("cat", "concat", "concatenate", "stack"):
            return self.cat(node, list(arg(0, "tensors")), arg(1, "dim", 0), name == "stack")
        if name in _SPLIT:
            return self.split(node, name, args[0], arg(2, "dim", 0))
        if name in ("slice", "select", "narrow", "index_select"):
            return self.select(node, name, args[0], arg(1, "dim", 0))
        if name == "scaled_dot_product_attention":
            gqa = bool(arg(7, "enable_gqa", False))
            return self.sdpa(
                node, arg(0, "query"), arg(1, "key"), arg(2, "value"), arg(3, "attn_mask"), gqa
            )
        if name in ("matmul", "mm", "bmm"):
            return self.matmul(node, args[0], args[1])
        if name == "native_dropout":
            return [self.state(args[0]), None]
        return self.unknown(node)

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

    def transpose(self, node: fx.Node, name: str, args: list[Any], kw: dict[str, Any]) -> State:
        st, shape = self.state(args[0]), self.shape(args[0])
        if not isinstance(st, Feat | PRef) or not isinstance(shape, tuple):
            return None
        nd = len(shape)
        order = list(range(nd))
        if name == "t":
            order = order[::-1]
        elif name in ("transpose", "swapaxes", "swapdims"):
            i, j = args[1] % nd, args[2] % nd
            order[i], order[j] = order[j], order[i]
        elif name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
            order = [d % nd for d in (dims or kw.get("dims", ()))]
        elif name == "movedim":
            src, dst = args[1] % nd, args[2] % nd
            order.pop(src)
            order.insert(dst, src)
        if isinstance(st, PRef):
            return PRef(st.name, tuple(st.dims[o] for o in order), st.ndim, st.partial)
        return Feat(order.index(st.axis), st.segs)

    def reduce(self, node: fx.Node, name: str, x: Any, dim: Any, keepdim: bool) -> State:
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
            if name in _ARGREDUCE:
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

    def split(self, node: fx.Node, name: str, x: Any, dim: Any) -> State:
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
        axis = st.axis - 1 if name == "unbind" and d < st.axis else st.axis
        return [Feat(axis, st.segs)] * n

    def select(self, node: fx.Node, name: str, x: Any, dim: int) -> State:
        """aten.slice / select / narrow / index_select along one dim."""
        st, shape, out = self.state(x), self.shape(x), self.shape(node)
        if (
            not isinstance(st, Feat | PRef)
            or not isinstance(shape, tuple)
            or not isinstance(out, tuple)
        ):
            return None
        d = dim % len(shape)
        removed = name == "select"
        full = not removed and out[d] == shape[d] and name != "index_select"
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
        st, shape, out = self.state(x), self.shape(x), self.shape(node)
        if (
            not isinstance(st, Feat | PRef)
            or not isinstance(shape, tuple)
            or not isinstance(out, tuple)
        ):
            return None
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

    # -- result --------------------------------------------------------------------------------

    def resolve(self) -> PermutationSpec:
        uf = self.uf
        for (tensor, axis), uses in self.uses.items():
            layouts = [u[0] for u in uses if isinstance(u, tuple)]
            reasons = [u for u in uses if isinstance(u, str)]
            if reasons and layouts:
                for segs in layouts:
                    for s in segs:
                        uf.fix(
                            s.var, reasons[0] or f"`{tensor}` axis {axis} is also used unpermuted"
                        )
            for segs in layouts[1:]:
                if not self.union_segs(layouts[0], segs):
                    for s in list(layouts[0]) + list(segs):
                        uf.fix(s.var, f"`{tensor}` axis {axis} is used with two different layouts")
        uf.settle()
        aliases: dict[str, list[str]] = {}
        for name, canon in self.canon.items():
            aliases.setdefault(canon, []).append(name)
        members: dict[int, list[Member]] = {}
        fixed: list[FixedAxis] = []
        order = {name: i for i, name in enumerate(self.canon)}
        for (tensor, axis), uses in sorted(
            self.uses.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
        ):
            layouts = [u[0] for u in uses if isinstance(u, tuple)]
            reasons = [u for u in uses if isinstance(u, str) and u]
            if self.model_tensors[tensor].shape[axis] == 1:
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
                        members.setdefault(root, []).append(
                            Member(alias, axis, s.block * k, offset)
                        )
                    else:
                        why = uf.reason.get(s.var, "shares a permutation with a fixed axis")
                        fixed.append(FixedAxis(alias, axis, why + where))
                offset += span
        seen_canon = {t for t, _ in self.uses}
        for name, t in self.model_tensors.items():
            if self.canon[name] not in seen_canon and t.dim() > 0 and t.is_floating_point():
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
        for node, st in self.env.items():
            if isinstance(st, Feat) and len(st.segs) == 1:
                r, k = uf.resolve(st.segs[0].var)
                if r in root_names:
                    probes.setdefault(root_names[r], []).append(
                        (node.name, st.axis, st.segs[0].block * k)
                    )
        buffers = frozenset(n for n, _ in self.model.named_buffers())
        return PermutationSpec(
            groups, fixed, buffers, source=f"inferred by {self.traced.tracer}", probes=probes
        )


def _reshape_chunk(
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
    return _infer(model, example_args(model, example_input, data), heads).resolve()


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


def _infer(model: nn.Module, args: Args, heads: bool = False) -> _Inference:
    inf = _Inference(model, trace(model, args), heads)
    inf.run()
    return inf


def inferred_graph(model: nn.Module, args: Args) -> tuple[Traced, PermutationSpec]:
    """The traced graph and its spec (with `probes` naming graph nodes), for activation matching."""
    inf = _infer(model, args, heads=True)
    return inf.traced, inf.resolve()
