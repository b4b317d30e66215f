"""Result files: the JSON schema is stable (and documented), the CSV has every point, plots exist."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import evaluate_entry as entry
import pytest

from merge.errors import UsageError
from merge.evaluate import SCHEMA, interpolation_path, load_result
from merge.evaluate.report import format_table, summary_table, write_result
from merge.evaluate.results import Curve, Result

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluate.md"
TOP_KEYS = [
    "schema",
    "kind",
    "merge_version",
    "created",
    "inputs",
    "settings",
    "axes",
    "curves",
    "endpoints",
    "selection",
    "notes",
    "files",
]


@pytest.fixture(scope="module")
def written(mlp_pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    r = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data(), steps=5
    )
    out = tmp_path_factory.mktemp("report")
    write_result(r, out)
    return r, out


def test_json_schema_is_stable(written) -> None:
    _, out = written
    data = json.loads((out / "path.json").read_text())
    assert list(data) == TOP_KEYS
    assert data["schema"] == SCHEMA == "merge.evaluate/1"
    assert data["kind"] == "path" and data["axes"] == ["alpha"]
    curve = data["curves"][0]
    assert list(curve) == ["name", "info", "points", "barriers"]
    assert list(curve["points"][0]) == ["coords", "metrics", "seconds"]
    assert curve["points"][0]["coords"] == {"alpha": 0.0}
    assert set(curve["barriers"]["loss"]) == {
        "direction",
        "endpoints",
        "max_minus_mean",
        "max_minus_linear",
        "midpoint",
    }
    assert set(curve["barriers"]["loss"]["max_minus_mean"]) == {"value", "alpha"}
    assert set(data["endpoints"]["a"]) == {
        "state",
        "curve",
        "coords",
        "reference",
        "path",
        "max_abs_diff",
        "tolerance",
        "ok",
    }
    assert data["settings"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data["files"]["csv"].endswith("path.csv")
    assert load_result(out / "path.json")["kind"] == "path"


def test_schema_is_documented() -> None:
    doc = DOCS.read_text()
    assert SCHEMA in doc
    for key in [
        *TOP_KEYS,
        "max_minus_mean",
        "max_minus_linear",
        "midpoint",
        "coords",
        "metrics",
        "seconds",
        "tolerance",
    ]:
        assert f"`{key}`" in doc, key


def test_csv_has_one_row_per_point(written) -> None:
    r, out = written
    rows = list(csv.DictReader((out / "path.csv").open()))
    assert len(rows) == 5 and list(rows[0]) == ["curve", "alpha", "loss", "accuracy", "seconds"]
    assert [float(x["alpha"]) for x in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (
        float(rows[0]["loss"]) == r.curve("naive").points[0]["metrics"]["loss"]
    )  # repr round-trips


def test_plots_are_written_and_not_empty(written) -> None:
    _, out = written
    png, svg = out / "path.png", out / "path.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert b"<svg" in svg.read_bytes()[:1000]


def test_summary_table_names_the_barriers(written) -> None:
    r, _ = written
    text = summary_table(r)
    assert (
        "barrier max−mean" in text
        and "naive" in text
        and "endpoint a (naive at alpha=0.0000): ok" in text
    )


def test_non_finite_values_become_null_and_other_files_are_refused(tmp_path: Path) -> None:
    r = Result(
        "sweep",
        ["lam"],
        [
            Curve(
                "sweep",
                [{"coords": {"lam": 0.0}, "metrics": {"loss": float("inf")}, "seconds": 0.1}],
            )
        ],
    )
    write_result(r, tmp_path, plots=False)
    assert (
        json.loads((tmp_path / "sweep.json").read_text())["curves"][0]["points"][0]["metrics"][
            "loss"
        ]
        is None
    )
    (tmp_path / "other.json").write_text('{"schema": "x"}')
    with pytest.raises(UsageError, match="not a merge evaluation result"):
        load_result(tmp_path / "other.json")


def test_format_table_aligns_numbers() -> None:
    text = format_table(["name", "value"], [["a", 1.0], ["bb", 0.00001]])
    assert text.splitlines() == [
        "name      value",
        "----  ---------",
        "a        1.0000",
        "bb    1.000e-05",
    ]
