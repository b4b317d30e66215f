"""Evaluation: interpolation paths and barriers, planes and sweeps, negation, linearity probes.

    from merge.evaluate import interpolation_path
    result = interpolation_path(make_model, "a/", "b/", data=test_batches, steps=25)
    write_result(result, "report/")  # path.json, path.csv, path.png, path.svg
    print(summary_table(result))

Models, data and metrics are callables here and `module:function` strings on the command line;
one model instance is reused for every point, its weights combined in place. See
docs/evaluate.md; the map of the whole package is docs/architecture.md.
"""

from merge.evaluate.barriers import barriers, max_minus_linear, max_minus_mean, midpoint
from merge.evaluate.evaluators import (
    CallableEvaluator,
    CausalLMEvaluator,
    ClassificationEvaluator,
    builtin_evaluator,
)
from merge.evaluate.grids import alpha_grid, linspace, parse_range
from merge.evaluate.paths import interpolation_path, plane, scale_grid, task_vector_path
from merge.evaluate.report import summary_table, write_result
from merge.evaluate.results import SCHEMA, Curve, Result, load_result
from merge.evaluate.weights import StateSpace

__all__ = [
    "SCHEMA",
    "CallableEvaluator",
    "CausalLMEvaluator",
    "ClassificationEvaluator",
    "Curve",
    "Result",
    "StateSpace",
    "alpha_grid",
    "barriers",
    "builtin_evaluator",
    "interpolation_path",
    "linspace",
    "load_result",
    "max_minus_linear",
    "max_minus_mean",
    "midpoint",
    "parse_range",
    "plane",
    "scale_grid",
    "summary_table",
    "task_vector_path",
    "write_result",
]
