from __future__ import annotations

import pytest

from merge.expr import Affine, ExprError, fold, parse


def form(text: str, inputs: set[str] = {"base", "a", "b", "c"}, vars: dict | None = None) -> dict:  # noqa: B006
    v = fold(parse(text), inputs=inputs, steps={}, vars=vars or {}, step="s")
    assert isinstance(v, Affine)
    return dict(v.terms)


def test_task_vector_expression_folds_to_coefficients() -> None:
    # base + 0.7 (a - base) - 0.4 (b - base) = (1 - 0.7 + 0.4) base + 0.7 a - 0.4 b
    f = form("base + 0.7 * (a - base) - 0.4 * (b - base)")
    assert f == pytest.approx({"base": 0.7, "a": 0.7, "b": -0.4})


def test_analogy_negation_division_and_vars() -> None:
    assert form("a - b + c") == {"a": 1.0, "b": -1.0, "c": 1.0}
    assert form("-(a - base) / 2") == {"a": -0.5, "base": 0.5}
    assert form("base + lam * (a - base)", vars={"lam": 0.25}) == {"base": 0.75, "a": 0.25}
    assert form("(a + b) * 0.5") == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.__class__", "`a.__class__` is not allowed in an expression"),
        ("__import__('os')", "`'os'` is not allowed in an expression"),
        ("__import__(a)", "unknown merge method `__import__`"),
        ("a * b", "cannot multiply two models elementwise"),
        ("a + 1", "cannot add a number and a model"),
        ("1 / a", "can only divide by a number"),
        ("a / 0", "division by zero"),
        ("bse + a", "unknown name `bse` (did you mean `base`?)"),
        ("a +", "cannot parse `a +`"),
        ("[a, b]", "is not allowed in an expression"),
        ("lambda: a", "is not allowed in an expression"),
    ],
)
def test_refused_expressions(text: str, message: str) -> None:
    from merge.errors import UsageError

    with pytest.raises((ExprError, UsageError)) as e:
        form(text)
    assert message in str(e.value)


def test_method_call_in_expression() -> None:
    v = fold(
        parse("base + 0.5 * (linear(a, b, weight=[1, 3]) - base)"),
        inputs={"base", "a", "b"},
        steps={},
        vars={},
        step="s",
    )
    assert isinstance(v, Affine)
    (call,) = v.calls()
    assert call.method == "linear" and call.model_params == ((("weight", 1.0),), (("weight", 3.0),))
    with pytest.raises(ExprError, match="has 3 values for 2 models"):
        fold(
            parse("linear(a, b, weight=[1, 2, 3])"), inputs={"a", "b"}, steps={}, vars={}, step="s"
        )
