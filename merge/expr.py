"""Task-vector expressions, parsed safely with `ast` and folded into affine forms.

Grammar: numbers, names (inputs, steps, vars), `+ - * /`, unary minus, parentheses and calls of
registered methods (`ties(math, code, base=base, density=0.5)`); nothing else is accepted.

Every tensor-valued expression folds into an *affine form* Σ c_k · leaf_k, where a leaf is an
input or a method call. `base + 0.7 * (math - base)` becomes {base: 0.3, math: 0.7}. The engine
then computes each output tensor with one fused accumulation into a reused buffer, and the
planner reads the checkpoints' coefficients straight off the form.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

from merge.errors import did_you_mean


class ExprError(ValueError):
    """A problem in one expression; the recipe layer adds the key path."""


class HiddenNameError(ExprError):
    """A name that is defined but broken (its own problem is reported elsewhere)."""


MAX_EXPR_CHARS = 100_000  # a recipe expression is a line or two; longer is generated or hostile


# ---- parsed syntax tree (no names resolved yet) -------------------------------------------------


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Name:
    id: str


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Node
    right: Node


@dataclass(frozen=True)
class Neg:
    operand: Node


@dataclass(frozen=True)
class CallExpr:
    method: str
    args: tuple[Node, ...]
    kwargs: tuple[tuple[str, Node | tuple[float, ...]], ...]


Node = Union[Num, Name, BinOp, Neg, CallExpr]  # noqa: UP007  (runtime alias)

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse(text: str) -> Node:
    """Parse an expression string into a Node tree, refusing anything outside the grammar."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(
            f"the expression is {len(text):,} characters long (at most {MAX_EXPR_CHARS:,}); "
            "split it into steps"
        )
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return _convert(tree.body, text)
    except SyntaxError as e:
        raise ExprError(f"cannot parse `{_short(text)}`: {e.msg} at column {e.offset}") from None
    except (RecursionError, MemoryError):
        # CPython's parser and our converter recurse per nesting level (a 5,000-term sum is
        # 5,000 levels deep); both give up long before memory is at risk.
        raise ExprError(
            "the expression is too deeply nested (thousands of terms or parentheses); "
            "split it into steps"
        ) from None


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


def _convert(n: ast.AST, text: str) -> Node:
    if (
        isinstance(n, ast.Constant)
        and isinstance(n.value, int | float)
        and not isinstance(n.value, bool)
    ):
        try:
            value = float(n.value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            literal = ast.get_source_segment(text, n) or str(n.value)
            raise ExprError(f"the number `{_short(literal)}` is too large for a float")
        return Num(value)
    if isinstance(n, ast.Name):
        return Name(n.id)
    if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
        return BinOp(_OPS[type(n.op)], _convert(n.left, text), _convert(n.right, text))
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
        inner = _convert(n.operand, text)
        return Neg(inner) if isinstance(n.op, ast.USub) else inner
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
        kwargs: list[tuple[str, Node | tuple[float, ...]]] = []
        for kw in n.keywords:
            if kw.arg is None:
                raise ExprError(f"`**` arguments are not allowed in `{text}`")
            if isinstance(kw.value, ast.List | ast.Tuple):
                kwargs.append((kw.arg, tuple(_number(e, text) for e in kw.value.elts)))
            else:
                kwargs.append((kw.arg, _convert(kw.value, text)))
        return CallExpr(n.func.id, tuple(_convert(a, text) for a in n.args), tuple(kwargs))
    snippet = ast.get_source_segment(text, n) or type(n).__name__
    raise ExprError(
        f"`{snippet}` is not allowed in an expression; use numbers, names, + - * /, "
        "parentheses and method calls such as `slerp(a, b, t=0.5)`"
    )


def _number(n: ast.AST, text: str) -> float:
    node = _convert(n, text)
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Neg) and isinstance(node.operand, Num):
        return -node.operand.value
    raise ExprError(f"list arguments must hold numbers in `{text}`")


def names_in(node: Node) -> set[str]:
    """Every name an expression mentions (inputs, steps and vars alike)."""
    if isinstance(node, Name):
        return {node.id}
    if isinstance(node, BinOp):
        return names_in(node.left) | names_in(node.right)
    if isinstance(node, Neg):
        return names_in(node.operand)
    if isinstance(node, CallExpr):
        out: set[str] = set()
        for a in node.args:
            out |= names_in(a)
        for _, v in node.kwargs:
            if not isinstance(v, tuple):
                out |= names_in(v)
        return out
    return set()


# ---- folded program ------------------------------------------------------------------------------


# eq=False: a call is itself (hashed by identity). Structural hashing recursed through every
# nested call, so chained steps that reuse a step cost 2^steps; two calls written separately
# are two calls (two random calls draw independent masks).
@dataclass(frozen=True, eq=False)
class Call:
    """A method call leaf: the method's inputs are themselves affine forms."""

    method: str
    models: tuple[Affine, ...]
    base: Affine | None
    params: tuple[tuple[str, object], ...]  # global params; a tuple value is a layer gradient
    model_params: tuple[
        tuple[tuple[str, object], ...], ...
    ]  # per-model params, one tuple per model
    step: str  # the recipe step it came from, for messages and overrides
    model_names: tuple[str, ...] = ()  # the input names of `models`, for per-input overrides


Leaf = Union[str, Call]  # noqa: UP007  (an input name, or a method call)


@dataclass(frozen=True)
class Affine:
    """Σ coef · leaf; `terms` keeps first-appearance order so results are deterministic."""

    terms: tuple[tuple[Leaf, float], ...] = field(default_factory=tuple)

    @staticmethod
    def leaf(x: Leaf) -> Affine:
        return Affine(((x, 1.0),))

    def scaled(self, k: float) -> Affine:
        return Affine(tuple((x, c * k) for x, c in self.terms))

    def plus(self, other: Affine) -> Affine:
        acc: dict[Leaf, float] = {}
        for x, c in (*self.terms, *other.terms):
            acc[x] = acc.get(x, 0.0) + c
        return Affine(tuple(acc.items()))

    def inputs(self) -> set[str]:
        """Input names this form reads, through method calls too (each shared call once)."""
        out: set[str] = set()
        seen: set[int] = set()
        stack: list[Affine] = [self]
        while stack:
            for x, _ in stack.pop().terms:
                if isinstance(x, str):
                    out.add(x)
                elif id(x) not in seen:
                    seen.add(id(x))
                    stack += [*x.models, *([x.base] if x.base else [])]
        return out

    def calls(self) -> list[Call]:
        return [x for x, _ in self.terms if isinstance(x, Call)]

    def single_input(self) -> str | None:
        """The input name if this form is exactly one input with coefficient 1."""
        if len(self.terms) == 1 and isinstance(self.terms[0][0], str) and self.terms[0][1] == 1.0:
            return self.terms[0][0]
        return None


Value = Union[float, Affine]  # noqa: UP007


def fold(
    node: Node,
    *,
    inputs: set[str],
    steps: Mapping[str, Affine],
    vars: Mapping[str, float],
    step: str,
    hidden: set[str] | frozenset[str] = frozenset(),
) -> Value:
    """Resolve names and fold a parsed expression into a float or an Affine form.

    Names in `hidden` are defined but broken: using one raises HiddenNameError, which callers
    skip (the name's own problem is reported). Every number it produces is finite.
    """
    value = _fold(node, inputs=inputs, steps=steps, vars=vars, step=step, hidden=hidden)
    coefs = [value] if isinstance(value, float) else [c for _, c in value.terms]
    if not all(math.isfinite(c) for c in coefs):
        raise ExprError(
            "a coefficient overflows to infinity or is not a number; use smaller numbers"
        )
    return value


def _fold(
    node: Node,
    *,
    inputs: set[str],
    steps: Mapping[str, Affine],
    vars: Mapping[str, float],
    step: str,
    hidden: set[str] | frozenset[str],
) -> Value:
    def go(n: Node) -> Value:
        if isinstance(n, Num):
            return n.value
        if isinstance(n, Name):
            if n.id in hidden:
                raise HiddenNameError(n.id)
            if n.id in vars:
                return float(vars[n.id])
            if n.id in steps:
                return steps[n.id]
            if n.id in inputs:
                return Affine.leaf(n.id)
            known = [*inputs, *steps, *vars]
            raise ExprError(
                f"unknown name `{n.id}`{did_you_mean(n.id, known)}; known inputs: {', '.join(sorted(inputs))}"
                + (f"; earlier steps: {', '.join(steps)}" if steps else "")
                + (f"; vars: {', '.join(vars)}" if vars else "")
            )
        if isinstance(n, Neg):
            v = go(n.operand)
            return -v if isinstance(v, float) else v.scaled(-1.0)
        if isinstance(n, BinOp):
            a, b = go(n.left), go(n.right)
            if isinstance(a, float) and isinstance(b, float):
                if n.op == "/" and b == 0:
                    raise ExprError("division by zero")
                out = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[n.op]
                if not math.isfinite(out):
                    raise ExprError(f"`{a:g} {n.op} {b:g}` overflows to infinity")
                return out
            if n.op in "+-":
                if isinstance(a, float) or isinstance(b, float):
                    raise ExprError(
                        f"cannot {'add' if n.op == '+' else 'subtract'} a number and a model; "
                        "scale a model with `*` (e.g. `0.5 * a`), or add models to models"
                    )
                return a.plus(b if n.op == "+" else b.scaled(-1.0))
            if n.op == "*":
                if isinstance(a, float):
                    return b.scaled(a) if isinstance(b, Affine) else a * b
                if isinstance(b, float):
                    return a.scaled(b)
                raise ExprError(
                    "cannot multiply two models elementwise; one side of `*` must be a number"
                )
            if isinstance(b, float):  # a / number
                if b == 0:
                    raise ExprError("division by zero")
                return a.scaled(1.0 / b)  # type: ignore[union-attr]
            raise ExprError("can only divide by a number")
        if isinstance(n, CallExpr):
            return Affine.leaf(_fold_call(n, go, step))
        raise ExprError(f"unexpected node {n!r}")  # pragma: no cover

    return go(node)


def _fold_call(n: CallExpr, go: object, step: str) -> Call:
    from merge.methods import get_method

    spec = get_method(n.method)
    models: list[Affine] = []
    names: list[str] = []
    for a in n.args:
        v = go(a)  # type: ignore[operator]
        if not isinstance(v, Affine):
            raise ExprError(
                f"`{n.method}(...)` takes models as positional arguments; got the number {v}"
            )
        models.append(v)
        names.append(v.single_input() or "")
    base: Affine | None = None
    params: list[tuple[str, object]] = []
    per_model: dict[str, list[object]] = {}
    for k, raw in n.kwargs:
        if k == "base":
            b = go(raw)  # type: ignore[operator]
            if not isinstance(b, Affine):
                raise ExprError(f"`base=` of `{n.method}` must be a model")
            base = b
            continue
        if isinstance(raw, tuple):
            value: object = raw
        else:
            value = go(raw)  # type: ignore[operator]
            if not isinstance(value, float):
                raise ExprError(
                    f"parameter `{k}` of `{n.method}` must be a number or a list of numbers"
                )
        if not all(math.isfinite(x) for x in (value if isinstance(value, tuple) else (value,))):  # type: ignore[arg-type]
            raise ExprError(f"parameter `{k}` of `{n.method}` must be finite, got {value}")
        if k in spec.per_model:
            # In a call, a list for a per-model parameter gives one value per model.
            if isinstance(value, tuple):
                if len(value) != len(models):
                    raise ExprError(
                        f"`{k}` of `{n.method}` has {len(value)} values for {len(models)} models; give one per model"
                    )
                per_model[k] = list(value)
            else:
                per_model[k] = [value] * len(models)
        else:
            params.append((k, value))
    if spec.needs_base and base is None:
        raise ExprError(f"method `{n.method}` needs a base: add `base=<input>`")
    model_params = tuple(
        tuple((k, vals[i]) for k, vals in per_model.items()) for i in range(len(models))
    )
    # Names, counts and values: the methods' one binder, as for YAML steps.
    from merge.methods._registry import bind_call

    problems = bind_call(
        spec,
        n_models=len(models),
        has_base=base is not None,
        params=dict(params),
        per_model_params=[dict(mp) for mp in model_params],
    )
    if problems:
        raise ExprError("; ".join(problems))
    return Call(n.method, tuple(models), base, tuple(params), model_params, step, tuple(names))
