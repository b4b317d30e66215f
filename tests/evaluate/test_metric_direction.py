"""Metric direction: declared by the evaluator or the CLI, known names, never guessed."""

from __future__ import annotations

import evaluate_entry as entry
import pytest
import torch
from click.testing import CliRunner
from conftest import ENTRY
from torch import nn

from merge.cli import cli
from merge.errors import UsageError
from merge.evaluate.barriers import curve_barriers, higher_is_better, metric_direction
from merge.evaluate.evaluators import ClassificationEvaluator
from merge.evaluate.soup import greedy_soup


@pytest.mark.parametrize(
    ("metric", "higher"),
    [
        ("top1_error", False),
        ("top5_error", False),
        ("val_loss", False),
        ("perplexity", False),
        ("wer", False),
        ("bleu", True),
        ("matthews_correlation", True),
        ("pearson", True),
        ("mIoU", True),
        ("eval_accuracy", True),
        ("target_top1", True),
        ("xyz", None),
        ("score_delta", None),
    ],
)
def test_metric_directions_by_name(metric: str, higher: bool | None) -> None:
    assert metric_direction(metric) is higher


def test_declared_direction_wins_and_unknown_is_refused() -> None:
    assert metric_direction("xyz", {"xyz": True}) is True
    assert metric_direction("target_xyz", {"xyz": False}) is False
    assert metric_direction("loss", {"loss": True}) is True  # the evaluator knows best
    with pytest.raises(UsageError) as e:
        higher_is_better("xyz")
    assert str(e.value) == (
        "cannot tell whether larger `xyz` is better: declare it in the evaluator "
        '(`evaluate.higher_is_better = {"xyz": True}`) or pass --higher-is-better xyz '
        "(or --lower-is-better xyz)"
    )


def test_barrier_signs_follow_the_direction() -> None:
    alphas = [0.0, 0.5, 1.0]
    points = [
        {"top1_error": e, "bleu": b, "xyz": 1.0} for e, b in ((0.1, 30.0), (0.5, 10.0), (0.1, 30.0))
    ]
    unknown: list[str] = []
    out = curve_barriers(alphas, points, unknown=unknown)
    # A bump of error and a dip of BLEU are both barriers, positive.
    assert out["top1_error"]["max_minus_mean"]["value"] == pytest.approx(0.4)
    assert out["bleu"]["max_minus_mean"]["value"] == pytest.approx(20.0)
    assert "xyz" not in out and unknown == ["xyz"]
    assert curve_barriers(alphas, points, {"xyz": True})["xyz"]["midpoint"]["value"] == 0.0


def test_soup_takes_the_direction_from_the_evaluator(mlp_pair) -> None:  # type: ignore[no-untyped-def]
    ingredients = {"a": mlp_pair.a.state_dict(), "b": mlp_pair.b.state_dict()}
    r = greedy_soup(entry.make_model, ingredients, evaluator=entry.quality, metric="quality")
    # Higher quality is better: the best ingredient is the one with the larger score.
    singles = {n: entry.quality(_loaded(sd))["quality"] for n, sd in ingredients.items()}
    assert singles["a"] != singles["b"]
    assert r.selection["best_single"] == max(singles, key=singles.__getitem__)
    with pytest.raises(UsageError, match="cannot tell whether larger `quality` is better"):
        greedy_soup(
            entry.make_model, ingredients, evaluator=entry.undeclared_quality, metric="quality"
        )


def _loaded(state: dict) -> nn.Module:
    m = entry.make_model()
    m.load_state_dict(state)
    return m.eval()


def test_cli_direction_override(mlp_pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = [
        "greedy-soup",
        str(mlp_pair.path_a),
        str(mlp_pair.path_b),
        "--model",
        f"{ENTRY}:make_model",
    ]
    args += ["--eval", f"{ENTRY}:undeclared_quality", "--metric", "quality", "--no-plot", "-q"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "s1")])
    assert r.exit_code == 2 and "cannot tell whether larger `quality` is better" in r.output
    r = CliRunner().invoke(
        cli, [*args, "-o", str(tmp_path / "s2"), "--higher-is-better", "quality"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        cli,
        [
            *args,
            "-o",
            str(tmp_path / "s3"),
            "--higher-is-better",
            "quality",
            "--lower-is-better",
            "quality",
        ],
    )
    assert r.exit_code == 2 and "given to both --higher-is-better and --lower-is-better" in r.output


class Echo(nn.Module):
    """Per-token logits that put all the mass on the label the input holds: a perfect tagger."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * nn.functional.one_hot(x.clamp(min=0), 5).float()  # (batch, tokens, classes)


def test_per_token_classification_ignores_minus_100() -> None:
    x = torch.tensor([[1, 2, 3], [4, 0, 0]])
    y = torch.tensor([[1, 2, 3], [4, -100, -100]])  # two padded positions
    out = ClassificationEvaluator([(x, y)])(Echo())
    assert out["accuracy"] == 1.0  # was 4/6 = 0.667: the -100 positions counted as wrong
    expected = float(
        nn.functional.cross_entropy(10.0 * torch.eye(5)[[1, 2, 3, 4]], torch.tensor([1, 2, 3, 4]))
    )
    assert out["loss"] == pytest.approx(expected)
    with pytest.raises(UsageError, match="no labelled example"):
        ClassificationEvaluator([(x, torch.full_like(y, -100))])(Echo())
