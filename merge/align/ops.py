"""Which transfer rule each traced op gets: op names and module types -> handlers.

A handler reads the call's arguments as its op lays them out (torch function, Tensor method or
ATen overload: positions and keywords differ) and applies a rule of `merge.align.propagate`.
Ops found in no table are not known to be permutation-equivariant: every axis they touch is
fixed. To teach inference a new op, add its name to a table below, or register a handler:

    @function_rule("my_op")
    def _my_op(inf: Inference, call: Call) -> State:
        return inf.unary(call.args[0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from merge.align.propagate import Feat, Inference, PRef, State, op_name

# f(x) entry by entry, or a copy or cast: the feature passes through (in-place
# variants too: `op_name` strips their trailing underscore).
UNARY = frozenset({
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu",
    "hardtanh", "hardswish", "hardsigmoid", "mish", "softplus", "softsign", "logsigmoid",
    "tanhshrink", "exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "abs", "neg",
    "negative", "square", "sin", "cos", "erf", "erfc", "reciprocal", "sign", "floor", "ceil",
    "round", "trunc", "clamp", "clip", "clamp_min", "clamp_max", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous", "clone",
    "detach", "to", "to_copy", "type", "type_as", "float", "double", "half", "bfloat16", "cpu",
    "cuda", "alias", "lift_fresh_copy", "nan_to_num", "identity", "logical_not", "bitwise_not",
    "isnan", "isinf",
})  # fmt: skip

# Normalised over one axis, equivariant along every other.
SOFTMAX = frozenset({"softmax", "log_softmax", "softmin"})

# Broadcasting ops of several tensors: their features unite.
ELEMENTWISE = frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "truediv", "floordiv", "floor_divide",
    "maximum", "minimum", "where", "masked_fill", "pow", "fmod", "remainder", "atan2", "lerp",
    "addcmul", "addcdiv", "eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or",
    "logical_xor", "bitwise_and", "bitwise_or", "iadd", "isub", "imul", "itruediv", "copysign",
    "hypot", "xlogy",
})  # fmt: skip

# Views that may merge or split dims.
RESHAPE = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    "unsafe_view",
})  # fmt: skip

# Broadcast copies.
EXPAND = frozenset({"expand", "expand_as", "broadcast_to", "repeat"})

# Pooling and resampling over dims >= 2.
SPATIAL = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "interpolate", "upsample", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_linear1d", "upsample_trilinear3d", "upsample_nearest2d_vec",
    "upsample_bilinear2d_vec",
})  # fmt: skip

# (input, dim, keepdim); `max`, `min` and the norms have rules of their own.
REDUCE = frozenset({
    "sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "all", "any", "nansum",
    "nanmean", "var_mean", "std_mean",
})  # fmt: skip

# (input, dim, keepdim), returning positions along dim.
ARGREDUCE = frozenset({"argmax", "argmin"})

# Dims reordered.
TRANSPOSE = frozenset({"transpose", "swapaxes", "swapdims", "t", "permute", "movedim"})

# (input, sizes, dim): pieces along dim.
SPLIT = frozenset({"chunk", "split", "split_with_sizes", "unbind", "tensor_split"})

# Functional and ATen convolutions.
CONV = frozenset({
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d",
})  # fmt: skip

# Per-channel normalisation on axis 1.
BATCH_NORM = frozenset(
    {"batch_norm", "native_batch_norm_legit_no_training", "native_batch_norm", "instance_norm"}
)

# Module classes whose output is f(x) entry by entry.
MODULE_UNARY = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
# Pooling and resampling modules.
MODULE_SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One call_function node: its canonical name and its arguments as written."""

    node: fx.Node
    name: str
    aten: bool  # an ATen overload (torch.export), whose argument order can differ
    args: list[Any]
    kwargs: dict[str, Any]
    out_shape: Any  # a tuple, a list of tuples (several outputs) or None (not a tensor)

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        """Argument `i`, else keyword `key`, else `default`."""
        return self.args[i] if len(self.args) > i else self.kwargs.get(key, default)

    def several(self, out: State, n: int) -> State:
        """`out` for the first of `n` outputs when the op returns several (native_* norms)."""
        return [out, *[None] * (n - 1)] if isinstance(self.out_shape, list) else out


FunctionRule = Callable[[Inference, Call], State]
FUNCTION_RULES: dict[str, FunctionRule] = {}


def function_rule(*names: str) -> Callable[[FunctionRule], FunctionRule]:
    """Register a handler for the ops called `names` (canonical names, `op_name`)."""

    def register(fn: FunctionRule) -> FunctionRule:
        for name in names:
            if name in FUNCTION_RULES:
                raise ValueError(f"op `{name}` already has a rule")
            FUNCTION_RULES[name] = fn
        return fn

    return register


def call_function(inf: Inference, node: fx.Node) -> State:
    """The state of `node`'s result, by the rule its op name is registered under."""
    call = Call(
        node,
        op_name(node.target),
        isinstance(node.target, torch._ops.OpOverload),
        list(node.args),
        dict(node.kwargs),
        inf.shape(node),
    )
    if call.name == "getitem":  # one output of a multi-output op, or Python indexing
        return _getitem(inf, call)
    if call.out_shape is None:
        return None  # sizes, dtypes and other non-tensor values
    rule = FUNCTION_RULES.get(call.name)
    return rule(inf, call) if rule is not None else inf.unknown(node)


def _getitem(inf: Inference, c: Call) -> State:
    st = inf.state(c.args[0])
    if isinstance(st, list):
        i = c.args[1]
        return st[i] if isinstance(i, int) and i < len(st) else None
    return inf.index(c.node, c.args[0], c.args[1])


def _params(inf: Inference, values: list[Any]) -> list[Any]:
    """Parameter arguments as their states (None for absent or constant ones)."""
    return [inf.state(p) if isinstance(p, fx.Node) else None for p in values]


@function_rule(*UNARY, *SOFTMAX)
def _unary(inf: Inference, c: Call) -> State:
    return inf.unary(c.args[0])


@function_rule("native_dropout")  # (output, mask)
def _native_dropout(inf: Inference, c: Call) -> State:
    return [inf.state(c.args[0]), None]


@function_rule("linear")
def _linear(inf: Inference, c: Call) -> State:
    return inf.linear(c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias"), inf.label())


@function_rule(*CONV)
def _conv(inf: Inference, c: Call) -> State:
    if c.name == "convolution":
        # aten: (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        groups, transposed = c.arg(8, "groups", 1), bool(c.arg(6, "transposed", False))
    else:
        # conv2d: (input, weight, bias, stride, padding, dilation, groups);
        # conv_transpose2d: (input, weight, bias, stride, padding, output_padding, groups, dilation)
        groups, transposed = c.arg(6, "groups", 1), "transpose" in c.name
    return inf.conv(
        c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias"), groups, transposed, inf.label()
    )


@function_rule(*BATCH_NORM)
def _batch_norm(inf: Inference, c: Call) -> State:
    if c.aten or c.name == "instance_norm":  # (input, weight, bias, running_mean, running_var, ...)
        order = [("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)]
    else:  # F.batch_norm(input, running_mean, running_var, weight, bias, ...)
        order = [("weight", 3), ("bias", 4), ("running_mean", 1), ("running_var", 2)]
    params = _params(inf, [c.arg(i, key) for key, i in order])
    return c.several(inf.channel_norm(c.args[0], params), 3)


@function_rule("layer_norm", "native_layer_norm", "rms_norm")
def _layer_norm(inf: Inference, c: Call) -> State:
    k = len(c.arg(1, "normalized_shape"))
    params = [c.arg(2, "weight")] + ([c.arg(3, "bias")] if c.name != "rms_norm" else [])
    return c.several(inf.layer_norm(c.args[0], k, _params(inf, params)), 3)


@function_rule("group_norm", "native_group_norm")
def _group_norm(inf: Inference, c: Call) -> State:
    if c.name == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
        groups, params = int(c.arg(6, "group")), [c.args[1], c.args[2]]
    else:  # F.group_norm(input, num_groups, weight, bias, eps)
        groups, params = int(c.arg(1, "num_groups")), [c.arg(2, "weight"), c.arg(3, "bias")]
    return c.several(inf.group_norm(c.args[0], groups, _params(inf, params)), 3)


@function_rule("embedding")
def _embedding(inf: Inference, c: Call) -> State:
    # aten.embedding(weight, indices) vs F.embedding(input, weight)
    idx, w = (c.args[1], c.args[0]) if c.aten else (c.arg(0, "input"), c.arg(1, "weight"))
    return inf.embedding(idx, w, inf.label())


@function_rule(*ELEMENTWISE)
def _elementwise(inf: Inference, c: Call) -> State:
    return inf.elementwise(c.node, inf.args_of(c.node))


@function_rule("max", "min")
def _max_min(inf: Inference, c: Call) -> State:
    """Against another tensor: elementwise; over a dim: a reduction."""
    if isinstance(inf.shape(c.arg(1, "other")), tuple):
        return _elementwise(inf, c)
    return _reduce(inf, c)


@function_rule(*REDUCE)
def _reduce(inf: Inference, c: Call) -> State:
    return inf.reduce(c.node, c.args[0], c.arg(1, "dim"), bool(c.arg(2, "keepdim", False)))


@function_rule(*ARGREDUCE)
def _argreduce(inf: Inference, c: Call) -> State:
    dim, keepdim = c.arg(1, "dim"), bool(c.arg(2, "keepdim", False))
    return inf.reduce(c.node, c.args[0], dim, keepdim, positions=True)


@function_rule("norm", "linalg_vector_norm")  # (input, p, dim, keepdim)
def _norm(inf: Inference, c: Call) -> State:
    return inf.reduce(c.node, c.args[0], c.arg(2, "dim"), bool(c.arg(3, "keepdim", False)))


@function_rule(*RESHAPE)
def _reshape(inf: Inference, c: Call) -> State:
    return inf.reshape(c.args[0], c.node)


@function_rule(*EXPAND)
def _expand(inf: Inference, c: Call) -> State:
    return inf.expand(c.args[0], c.node)


@function_rule(*SPATIAL)
def _spatial(inf: Inference, c: Call) -> State:
    out = inf.spatial(c.args[0])
    return [out, out] if isinstance(c.out_shape, list) else out  # (values, indices)


@function_rule("pad", "constant_pad_nd")
def _pad(inf: Inference, c: Call) -> State:
    return inf.pad(c.args[0], c.arg(1, "pad"))


@function_rule(*TRANSPOSE)
def _transpose(inf: Inference, c: Call) -> State:
    shape = inf.shape(c.args[0])
    if not isinstance(inf.state(c.args[0]), Feat | PRef) or not isinstance(shape, tuple):
        return None
    return inf.permute_dims(c.args[0], dim_order(c, len(shape)))


def dim_order(c: Call, nd: int) -> list[int]:
    """Output dim j is input dim order[j], for t / transpose / permute / movedim."""
    args = c.args
    order = list(range(nd))
    if c.name == "t":
        order = order[::-1]
    elif c.name in ("transpose", "swapaxes", "swapdims"):
        i, j = args[1] % nd, args[2] % nd
        order[i], order[j] = order[j], order[i]
    elif c.name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
        order = [d % nd for d in (dims or c.kwargs.get("dims", ()))]
    elif c.name == "movedim":
        src, dst = args[1] % nd, args[2] % nd
        order.pop(src)
        order.insert(dst, src)
    return order


@function_rule("cat", "concat", "concatenate", "stack")
def _cat(inf: Inference, c: Call) -> State:
    return inf.cat(c.node, list(c.arg(0, "tensors")), c.arg(1, "dim", 0), c.name == "stack")


@function_rule(*SPLIT)
def _split(inf: Inference, c: Call) -> State:
    return inf.split(c.node, c.args[0], c.arg(2, "dim", 0), drops_dim=c.name == "unbind")


@function_rule("slice", "select", "narrow", "index_select")
def _select(inf: Inference, c: Call) -> State:
    return inf.select(
        c.node,
        c.args[0],
        c.arg(1, "dim", 0),
        drops_dim=c.name == "select",
        by_index=c.name == "index_select",
    )


@function_rule("scaled_dot_product_attention")
def _sdpa(inf: Inference, c: Call) -> State:
    q, k, v, mask = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value"), c.arg(3, "attn_mask")
    return inf.sdpa(c.node, q, k, v, mask, bool(c.arg(7, "enable_gqa", False)))


@function_rule("matmul", "mm", "bmm")
def _matmul(inf: Inference, c: Call) -> State:
    return inf.matmul(c.node, c.args[0], c.args[1])


# -- modules (fx.symbolic_trace keeps leaf modules as call_module nodes) -----------------------


@dataclass(frozen=True)
class ModuleCall:
    """One call_module node: the module, its qualified name and its input."""

    node: fx.Node
    module: nn.Module
    name: str
    x: Any  # the first argument

    def param(self, inf: Inference, attr: str) -> PRef | None:
        """The module's parameter or buffer `attr`, if it has one."""
        return inf.pref(self.name, attr) if getattr(self.module, attr, None) is not None else None


ModuleRule = Callable[[Inference, ModuleCall], State]
MODULE_RULES: dict[type, ModuleRule] = {}


def module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register a handler for modules of these classes (and their subclasses)."""

    def register(fn: ModuleRule) -> ModuleRule:
        for t in types:
            if t in MODULE_RULES:
                raise ValueError(f"module type `{t.__name__}` already has a rule")
            MODULE_RULES[t] = fn
        return fn

    return register


def call_module(inf: Inference, node: fx.Node) -> State:
    """The state of a leaf module's output, by the rule of its class (or nearest base class)."""
    name = str(node.target)
    mod = inf.gm.get_submodule(name)
    call = ModuleCall(node, mod, name, node.args[0] if node.args else None)
    rule = next((MODULE_RULES[t] for t in type(mod).__mro__ if t in MODULE_RULES), None)
    if rule is not None:
        return rule(inf, call)
    for pname, _ in mod.named_parameters():
        ref = inf.pref(name, pname)
        if ref:
            inf.bind(
                ref,
                {},
                f"parameter of {type(mod).__name__} module `{name}`, whose permutation rule is unknown",
            )
    return inf.unknown(
        node, f"module `{name}` ({type(mod).__name__}) is not known to be permutation-equivariant"
    )


@module_rule(nn.Linear)
def _linear_module(inf: Inference, m: ModuleCall) -> State:
    return inf.linear(m.x, m.param(inf, "weight"), m.param(inf, "bias"), m.name)


@module_rule(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
)
def _conv_module(inf: Inference, m: ModuleCall) -> State:
    conv: Any = m.module
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    return inf.conv(
        m.x, m.param(inf, "weight"), m.param(inf, "bias"), conv.groups, transposed, m.name
    )


@module_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _channel_norm_module(inf: Inference, m: ModuleCall) -> State:
    names = ("weight", "bias", "running_mean", "running_var")
    return inf.channel_norm(m.x, [m.param(inf, n) for n in names])


@module_rule(nn.LayerNorm, nn.RMSNorm)
def _layer_norm_module(inf: Inference, m: ModuleCall) -> State:
    norm: Any = m.module
    params = ["weight"] + (["bias"] if isinstance(norm, nn.LayerNorm) else [])
    return inf.layer_norm(m.x, len(norm.normalized_shape), [m.param(inf, n) for n in params])


@module_rule(nn.GroupNorm)
def _group_norm_module(inf: Inference, m: ModuleCall) -> State:
    groups: Any = m.module.num_groups
    return inf.group_norm(m.x, groups, [m.param(inf, "weight"), m.param(inf, "bias")])


@module_rule(nn.Embedding)
def _embedding_module(inf: Inference, m: ModuleCall) -> State:
    return inf.embedding(m.x, m.param(inf, "weight"), m.name)


@module_rule(*MODULE_UNARY, nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _unary_module(inf: Inference, m: ModuleCall) -> State:
    return inf.unary(m.x)


@module_rule(nn.PReLU)
def _prelu_module(inf: Inference, m: ModuleCall) -> State:
    """One slope per channel broadcasts against the feature like an elementwise operand."""
    if m.module.num_parameters > 1:  # type: ignore[operator]
        return inf.elementwise(m.node, [m.x], extra=[m.param(inf, "weight")])
    return inf.unary(m.x)


@module_rule(*MODULE_SPATIAL)
def _spatial_module(inf: Inference, m: ModuleCall) -> State:
    return inf.spatial(m.x)


@module_rule(nn.Flatten, nn.Unflatten)
def _reshape_module(inf: Inference, m: ModuleCall) -> State:
    return inf.reshape(m.x, m.node)


@module_rule(nn.MultiheadAttention)
def _mha_module(inf: Inference, m: ModuleCall) -> State:
    return inf.mha(m.node, m.module, m.name)  # type: ignore[arg-type]
